"""The websockets edge against a real server on 127.0.0.1: the edge conformance suite
(wsbus_testing.edge_conformance: handshake, auth, HTTP, limits, slow consumers, shutdown,
the Python client), and how this edge gathers a burst's writes."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import msgspec
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed as WsClosed

from tests.wsbus_websockets.conftest import serve_websockets
from wsbus import ConnId, Envelope, Gateway, Recipients, ServiceAddress
from wsbus.envelope import EnvelopeId
from wsbus_testing.edge_conformance import EdgeConformance
from wsbus_testing.edges import ServeEdge
from wsbus_websockets import EdgeServer


class TestWebsocketsEdge(EdgeConformance):
    @pytest.fixture
    def wsbus_serve_edge(self) -> ServeEdge:
        return serve_websockets

    def edge_socket(self, connection: Any) -> socket.socket:
        sock: socket.socket = connection._ws.transport.get_extra_info("socket")
        return sock


async def test_a_burst_is_written_in_one_go_in_order_and_before_the_close(
    wsbus_server: EdgeServer, wsbus_gateway: Gateway
) -> None:
    async with ws_connect(wsbus_server.url) as ws:
        conn_id = ConnId(msgspec.json.decode(await ws.recv())["content"]["conn_id"])
        link: Any = wsbus_gateway._sessions[conn_id]._driver  # the gateway's driver of it
        conn = link.conn
        # The asyncio transport under the edge's counting one.
        transport = conn._ws.transport._t
        calls: list[str] = []
        write, writelines = transport.write, transport.writelines

        def counted_write(data: bytes) -> None:
            calls.append("write")
            write(data)

        def counted_writelines(chunks: list[bytes]) -> None:
            calls.append(f"writelines {len(chunks)}")
            writelines(chunks)

        transport.write, transport.writelines = counted_write, counted_writelines
        to = Recipients(conn_ids=(conn_id,))

        def burst(first: int, count: int) -> None:
            for i in range(first, first + count):
                wsbus_gateway.deliver(
                    Envelope(EnvelopeId(f"b{i}"), "burst", ServiceAddress("t"), {"i": i}, to)
                )

        received: list[int] = []

        async def read() -> WsClosed:
            try:
                while True:
                    received.append(msgspec.json.decode(await ws.recv())["content"]["i"])
            except WsClosed as exc:
                return exc

        reader = asyncio.create_task(read())
        # In one event-loop pass: the first frame at once, the rest together at its end.
        burst(0, 300)
        for _ in range(3):
            await asyncio.sleep(0)
        # (On Python 3.11, writelines joins its chunks and calls write once.)
        assert calls[0] == "write", calls
        assert [c for c in calls[1:] if c != "write"] == ["writelines 299"], calls
        burst(300, 100)
        # A close in the same pass as a burst: the burst still goes first.
        async with asyncio.timeout(5):
            await conn.close(4000, "bye")
            closed = await reader
        assert received == list(range(400))
        assert closed.rcvd is not None and closed.rcvd.code == 4000
