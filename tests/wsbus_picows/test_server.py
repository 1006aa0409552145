"""The picows edge against a real server on 127.0.0.1: the edge conformance suite
(wsbus_testing.edge_conformance, as the websockets edge runs it in
tests/wsbus_websockets/test_server.py; it holds the tests of tests/wsbus_picows/test_review.py
too, which is gone), and how this edge gathers a burst's writes (the websockets edge's
version of that test looks inside websockets)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import msgspec
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed as WsClosed

from tests.wsbus_picows.conftest import serve_picows
from wsbus import ConnId, Envelope, Gateway, Recipients, ServiceAddress
from wsbus.envelope import EnvelopeId
from wsbus_picows import PicowsServer
from wsbus_testing.edge_conformance import EdgeConformance
from wsbus_testing.edges import ServeEdge


class TestPicowsEdge(EdgeConformance):
    @pytest.fixture
    def wsbus_serve_edge(self) -> ServeEdge:
        return serve_picows

    def edge_socket(self, connection: Any) -> socket.socket:
        sock: socket.socket = connection._raw.get_extra_info("socket")
        return sock


async def test_a_burst_is_written_in_two_writes_in_order_and_before_the_close(
    wsbus_server: PicowsServer, wsbus_gateway: Gateway
) -> None:
    async with ws_connect(wsbus_server.url) as ws:
        conn_id = ConnId(msgspec.json.decode(await ws.recv())["content"]["conn_id"])
        link: Any = wsbus_gateway._sessions[conn_id]._driver  # the gateway's driver of it
        conn = link.conn
        raw = conn._raw
        calls: list[int] = []
        write = raw.write

        def counted_write(data: bytes) -> None:
            calls.append(len(data))
            write(data)

        raw.write = counted_write
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
        # In one event-loop pass: the first frame at once (picows writes it to the socket
        # itself), the other 299 in one write at the pass's end.
        burst(0, 300)
        for _ in range(3):
            await asyncio.sleep(0)
        assert len(calls) == 1, calls
        burst(300, 100)
        # A close in the same pass as a burst: the burst still goes first.
        async with asyncio.timeout(5):
            await conn.close(4000, "bye")
            closed = await reader
        assert received == list(range(400))
        assert closed.rcvd is not None and closed.rcvd.code == 4000
