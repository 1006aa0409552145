"""The websockets edge's server tests (tests/wsbus_websockets/test_server.py), against the
picows edge: ``wsbus_server`` is the picows edge here (see conftest.py), and the three that
start a server of their own get this edge's ``serve`` in place of the websockets edge's.

One of them looks inside the websockets edge (its counting transport); this edge's own
version of it is below.
"""

from __future__ import annotations

import asyncio
import types
from typing import Any

import msgspec
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed as WsClosed

from tests.wsbus_picows.conftest import picows_config
from tests.wsbus_websockets import test_server as websockets_tests
from tests.wsbus_websockets.test_server import *  # noqa: F403
from wsbus import ConnId, Envelope, Gateway, Recipients, ServiceAddress
from wsbus.envelope import EnvelopeId
from wsbus_picows import PicowsServer, serve

del test_a_burst_is_written_in_one_go_in_order_and_before_the_close  # noqa: F821


async def _serve(gateway: Gateway, host: str, port: int, config: Any = None) -> PicowsServer:
    """This edge's serve, taking either edge's settings."""
    return await serve(gateway, host, port, config=picows_config(config) if config else None)


def _on_this_edge(test: Any) -> Any:
    """``test`` as it is, but with this edge's ``serve`` where it calls the other's."""
    scope = {**test.__globals__, "serve": _serve}
    moved = types.FunctionType(test.__code__, scope, test.__name__, test.__defaults__)
    moved.__dict__.update(test.__dict__)  # its pytest marks
    moved.__kwdefaults__ = test.__kwdefaults__
    moved.__annotations__ = test.__annotations__
    return moved


test_static_directory = _on_this_edge(websockets_tests.test_static_directory)
test_static_paths_are_percent_decoded_and_never_leave_the_directory = _on_this_edge(
    websockets_tests.test_static_paths_are_percent_decoded_and_never_leave_the_directory
)
test_closing_an_edge_leaves_its_gateway_serving_the_others = _on_this_edge(
    websockets_tests.test_closing_an_edge_leaves_its_gateway_serving_the_others
)
test_a_burst_at_a_slow_service_holds_its_client_back_instead_of_refusing = _on_this_edge(
    websockets_tests.test_a_burst_at_a_slow_service_holds_its_client_back_instead_of_refusing
)


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
