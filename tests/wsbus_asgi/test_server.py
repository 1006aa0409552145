"""What ``wsbus_asgi.server`` adds to uvicorn against hostile peers, on a real uvicorn server
on 127.0.0.1: raw sockets play the peers, so each test sends exactly the bytes it means.

Every wait is bounded; none compares a duration with a constant: a test waits for the
server to act (a close, an answer) and fails if it never does within a generous bound.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from wsbus import Gateway, MemoryBus
from wsbus_asgi import AsgiConfig, AsgiServer, serve

UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)
"""An upgrade request head without its final empty line."""

BOUND = 8.0
"""Seconds a test waits for the server at most: below uvicorn's own 10 s timers, far above
the edge's settings here."""


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    gateway = Gateway(MemoryBus([]), entry_points=False)
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.close()


async def _serve(gateway: Gateway, **settings: Any) -> AsgiServer:
    return await serve(gateway, "127.0.0.1", 0, config=AsgiConfig(**settings))


def _protocols(server: AsgiServer) -> list[Any]:
    assert server._server is not None
    return list(server._server.server_state.connections)


async def _read_to_eof(reader: asyncio.StreamReader) -> bytes:
    """What the server sends until it closes; fails if it does not close within BOUND."""
    got = bytearray()
    async with asyncio.timeout(BOUND):
        while data := await reader.read(65536):
            got += data
    return bytes(got)


async def test_close_timeout_reaches_the_protocol_and_drops_a_silent_peer(
    gateway: Gateway,
) -> None:
    # The peer reads the close frame but never answers it: the connection is dropped after
    # the edge's close_timeout, not after uvicorn's 10 s.
    async with await _serve(gateway, close_timeout=0.3) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(UPGRADE + b"\r\n")
            async with asyncio.timeout(BOUND):
                head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101")
            [protocol] = _protocols(server)
            assert protocol.close_timeout == 0.3
            closing = asyncio.create_task(server.app.close_connections(1001, "going away"))
            got = await _read_to_eof(reader)
            assert b"\x88\x0c\x03\xe9going away" in got  # the close frame, then the drop
            await closing
        finally:
            writer.transport.abort()
