"""The websockets edge's write path (wsbus_websockets/_wsconn.py): frames made once per
payload, one end-of-pass callback for every connection, and websockets' own framing
when an extension (permessage-deflate) is on."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection as WsClientConnection
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.frames import Frame, Opcode
from websockets.typing import Subprotocol

from tests.wsbus_websockets import test_conformance
from wsbus import Codec, HandshakeRequest
from wsbus_websockets._wsconn import (
    EdgeConnection,
    HandshakeGuard,
    PassEnd,
    RateLimitedLog,
    connection_factory,
    server_frame,
)
from wsbus_websockets.server import _Connection

TIMEOUT = 5.0
CLOSE_TIMEOUT = 1.0


@given(
    data=st.one_of(
        st.binary(max_size=300),
        st.sampled_from([0, 125, 126, 127, 65535, 65536, 70000]).map(lambda n: b"x" * n),
    ),
    text=st.booleans(),
)
def test_server_frame_is_the_frame_websockets_would_send(data: bytes, text: bool) -> None:
    frame = Frame(Opcode.TEXT if text else Opcode.BINARY, data)
    assert server_frame(data, text) == frame.serialize(mask=False, extensions=[])


class _Loop:
    """What PassEnd asks of an event loop: call_soon, recorded."""

    def __init__(self) -> None:
        self.soon: list[Callable[[], None]] = []

    def call_soon(self, callback: Callable[[], None]) -> None:
        self.soon.append(callback)


class _Gatherer:
    """A connection as PassEnd sees one: told when the pass ended."""

    def __init__(self, fail: bool = False) -> None:
        self.ended = 0
        self.fail = fail
        self.peer = "127.0.0.1:1"

    def pass_ended(self) -> None:
        self.ended += 1
        if self.fail:
            raise RuntimeError("a bug")


def test_one_pass_end_callback_serves_every_connection_of_a_pass(
    caplog: pytest.LogCaptureFixture,
) -> None:
    passes = PassEnd()
    loop: Any = _Loop()
    for _ in range(1000):
        passes.wrote(loop)
    assert len(loop.soon) == 1
    gatherers = [_Gatherer(fail=i == 0) for i in range(3)]
    for gatherer in gatherers:
        passes.gathering(gatherer)  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR, "wsbus.websockets"):
        loop.soon.pop()()
    # One connection's failure keeps no other's frames back, and is logged.
    assert [g.ended for g in gatherers] == [1, 1, 1]
    assert "writing the frames gathered for 127.0.0.1:1 failed" in caplog.text
    assert passes.number == 1
    # The next pass schedules its own end, and lists only those that gather in it.
    passes.wrote(loop)
    assert len(loop.soon) == 1
    loop.soon.pop()()
    assert [g.ended for g in gatherers] == [1, 1, 1]
    assert passes.number == 2


@contextlib.asynccontextmanager
async def _edge(
    codecs: list[Codec], compression: str | None = None
) -> AsyncIterator[tuple[list[_Connection], list[WsClientConnection]]]:
    """A server on the edge's connection class, with one connection per codec.

    Yields the gateway-side connections and the clients, in the order of ``codecs``.
    """
    handed: asyncio.Queue[_Connection] = asyncio.Queue()
    finished = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        assert isinstance(ws, EdgeConnection) and ws.request is not None
        codec = Codec(ws.subprotocol) if ws.subprotocol else Codec.JSON
        request = HandshakeRequest(path=ws.request.path, headers={}, remote="test")
        await handed.put(_Connection(ws, codec, request))
        await finished.wait()

    guard = HandshakeGuard(1024, RateLimitedLog(logging.getLogger("test")))
    async with asyncio.timeout(TIMEOUT):
        server = await serve(
            handler,
            "127.0.0.1",
            0,
            subprotocols=[Subprotocol(codec) for codec in Codec],
            compression=compression,
            close_timeout=CLOSE_TIMEOUT,
            create_connection=connection_factory(guard, 1 << 20),
        )
    port = server.sockets[0].getsockname()[1]
    peers: list[WsClientConnection] = []
    connections: list[_Connection] = []
    try:
        async with asyncio.timeout(TIMEOUT):
            for codec in codecs:
                peers.append(
                    await connect(
                        f"ws://127.0.0.1:{port}/",
                        subprotocols=[Subprotocol(codec.value)],
                        compression=compression,
                        close_timeout=CLOSE_TIMEOUT,
                    )
                )
                connections.append(await handed.get())
        yield connections, peers
    finally:
        finished.set()
        async with asyncio.timeout(TIMEOUT):
            for peer in peers:
                await peer.close()
            server.close()
            await server.wait_closed()


async def _fan_out(compression: str | None) -> None:
    """Send the same payload objects, in bursts and one per pass, to JSON and msgpack peers:
    each gets every frame, in order, as text or binary as its codec says."""
    codecs = [Codec.JSON, Codec.MSGPACK, Codec.JSON, Codec.MSGPACK]
    payloads = [f'{{"i": {i}, "pad": "{"x" * (i * 37 % 300)}"}}'.encode() for i in range(40)]
    async with _edge(codecs, compression) as (connections, peers):
        for i, payload in enumerate(payloads):
            # The same bytes object to every connection, as a fan-out does.
            for connection in connections:
                assert connection.send_nowait(payload)
            if i % 5 == 4:
                await asyncio.sleep(0)  # a pass ends now and then: bursts and single frames
        async with asyncio.timeout(TIMEOUT):
            received = [[await peer.recv() for _ in payloads] for peer in peers]
            while any(connection.unsent() for connection in connections):
                await asyncio.sleep(0.01)
    expected_text = [payload.decode() for payload in payloads]
    assert received == [expected_text if codec.is_text else payloads for codec in codecs]


async def test_one_payload_sent_to_many_connections_arrives_whole_and_in_order() -> None:
    await _fan_out(None)


async def test_with_permessage_deflate_websockets_frames_what_the_edge_sends() -> None:
    await _fan_out("deflate")


@pytest.mark.parametrize("gathered", [False, True], ids=["at once", "gathered"])
async def test_frames_a_closing_transport_discards_are_counted_unsent(gathered: bool) -> None:
    async with _edge([Codec.JSON]) as (connections, _):
        connection = connections[0]
        ws: Any = connection._ws
        if gathered:
            assert connection.send_nowait(b'{"first": 1}')  # the rest of the pass gathers
        async with asyncio.timeout(TIMEOUT):
            while connection.unsent():
                await asyncio.sleep(0.01)
        # Closed under websockets' feet (as a failing socket is): the transport discards
        # writes until asyncio tells the protocol, a pass later.
        ws.transport._t.close()
        assert connection.send_nowait(b'{"lost": 1}')
        assert connection.send_nowait(b'{"lost": 2}')
        for _ in range(3):
            await asyncio.sleep(0)
        assert connection.unsent() == 2


class TestWebSocketsConnectionWithDeflate(test_conformance.TestWebSocketsConnection):
    """The connection conformance suite, with permessage-deflate on (websockets frames)."""

    compression = "deflate"
