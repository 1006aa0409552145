"""What ``wsbus_asgi.server`` adds to uvicorn against hostile peers, on a real uvicorn server
on 127.0.0.1: raw sockets play the peers, so each test sends exactly the bytes it means.

Every wait is bounded; none compares a duration with a constant: a test waits for the
server to act (a close, an answer) and fails if it never does within a generous bound.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from wsbus import Gateway, GatewayConfig, MemoryBus
from wsbus.wire import WireLimits
from wsbus_asgi import App, AsgiConfig, AsgiServer, serve

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


def _ping(payload: bytes = b"x" * 125) -> bytes:
    """A masked PING frame, as a client sends it."""
    mask = os.urandom(4)
    masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    return bytes([0x89, 0x80 | len(payload)]) + mask + masked


async def test_a_ping_flood_from_a_peer_that_does_not_read_is_held_back_or_dropped(
    gateway: Gateway,
) -> None:
    # uvicorn writes a pong per ping whatever its write buffer holds: without the edge's
    # back-pressure, the server reads the whole flood and buffers every pong.
    flood = 16 * 1024 * 1024
    # asyncio's default high-water mark, and what a write of the gateway's may add.
    bound = 64 * 1024 + gateway.config.outbound_bytes + 1024
    async with await _serve(gateway) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(UPGRADE + b"\r\n")
            async with asyncio.timeout(BOUND):
                await reader.readuntil(b"\r\n\r\n")
            # The peer's kernel takes few pongs: the rest stays in the server's buffer.
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            [protocol] = _protocols(server)
            chunk = _ping() * 2000
            sent = 0
            try:
                while sent < flood:
                    writer.write(chunk)
                    try:
                        async with asyncio.timeout(2.0):
                            await writer.drain()
                    except TimeoutError:
                        break  # held back by TCP: the server is not reading
                    sent += len(chunk)
                    assert protocol.transport.get_write_buffer_size() <= bound
            except ConnectionError:
                pass  # dropped
            transport = protocol.transport
            assert transport.is_closing() or not transport.is_reading()
            assert transport.get_write_buffer_size() <= bound
            assert sent < flood
        finally:
            writer.transport.abort()


async def test_a_ping_flood_past_the_write_bound_is_dropped() -> None:
    # With a small outbound_bytes the bound (64 KiB + outbound_bytes + 1 KiB) is below what
    # one read of a flood makes uvicorn write: the peer is dropped, as on the websockets edge.
    config = GatewayConfig(node="t", wire=WireLimits(max_frame_bytes=4096), outbound_bytes=4096)
    gateway = Gateway(MemoryBus([]), config=config, entry_points=False)
    await gateway.start()
    edge = App(gateway, AsgiConfig(), lifespan=False)
    disconnects: list[Any] = []

    async def host(scope: Any, receive: Any, send: Any) -> None:
        # What the application is told, in order.
        async def told() -> Any:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                disconnects.append(message)
            return message

        await edge(scope, told, send)

    server = AsgiServer(gateway, AsgiConfig(), app=edge, asgi=host)
    await server.start("127.0.0.1", 0)
    try:
        async with server:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
            reader, writer = await asyncio.open_connection(sock=sock)
            try:
                writer.write(UPGRADE + b"\r\n")
                async with asyncio.timeout(BOUND):
                    await reader.readuntil(b"\r\n\r\n")
                [protocol] = _protocols(server)
                writer.write(_ping() * 80000)  # 10 MiB
                with pytest.raises(ConnectionError):
                    async with asyncio.timeout(BOUND):
                        await writer.drain()
                        await reader.read()  # the drop may come after the last write
                        raise ConnectionResetError  # EOF: closed, as good as dropped
                assert protocol.transport.is_closing()
                async with asyncio.timeout(BOUND):
                    while not disconnects:
                        await asyncio.sleep(0.01)
                assert disconnects[0]["code"] == 1008  # as the websockets edge closes it
            finally:
                writer.transport.abort()
    finally:
        await server.close()
        await gateway.close()


@pytest.mark.parametrize(
    "headers",
    [b"X-Long: " + b"a" * 9000 + b"\r\n", b"".join(b"X-%d: a\r\n" % i for i in range(200))],
    ids=["a 9000-byte header line", "200 headers"],
)
async def test_an_upgrade_head_websockets_refuses_gets_431_and_is_closed(
    gateway: Gateway, headers: bytes
) -> None:
    # uvicorn's HTTP parser lets these heads through (under 16 KiB); websockets' refuses
    # them and queues a 431 that uvicorn never wrote, holding the socket.
    async with await _serve(gateway) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(UPGRADE + headers + b"\r\n")
            answer = await _read_to_eof(reader)
            assert answer.startswith(b"HTTP/1.1 431 ")
        finally:
            writer.transport.abort()


def _health(headers: bytes) -> bytes:
    return b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + headers + b"\r\n"


@pytest.mark.parametrize(
    "headers",
    [b"X-Long: " + b"a" * 60000 + b"\r\n", b"".join(b"X-%d: a\r\n" % i for i in range(8000))],
    ids=["a 60 KB header line", "8000 headers"],
)
async def test_a_request_head_over_max_request_head_in_one_read_gets_431(
    gateway: Gateway, headers: bytes
) -> None:
    # h11 bounds only a head that has not arrived whole: one sent at once was parsed (on
    # the loop, header by header) and answered 200.
    async with await _serve(gateway) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(_health(headers))
            answer = await _read_to_eof(reader)
            assert answer.startswith(b"HTTP/1.1 431 ")
        finally:
            writer.transport.abort()


async def test_a_request_head_under_max_request_head_is_answered_in_pieces(
    gateway: Gateway,
) -> None:
    # 15 KB of head, its empty line split over two writes: counted once, answered.
    head = _health(b"X-Long: " + b"a" * 15000 + b"\r\n")
    async with await _serve(gateway, max_request_head=16 * 1024) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(head[:-3])
            await writer.drain()
            await asyncio.sleep(0.05)  # two reads, most likely; either way the same count
            writer.write(head[-3:])
            answer = await _read_to_eof(reader)  # /healthz closes after its answer
            assert answer.startswith(b"HTTP/1.1 200 "), answer[:100]
        finally:
            writer.transport.abort()


@pytest.mark.parametrize("kind", ["no bytes", "a partial head", "a head dripped"])
async def test_a_connection_whose_head_does_not_arrive_in_open_timeout_is_closed(
    gateway: Gateway, kind: str
) -> None:
    # uvicorn has no deadline for a request head: these sockets stayed open for good.
    async with await _serve(gateway, open_timeout=0.3) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)

        async def drip() -> None:
            # One header line every 50 ms, for as long as the server keeps the socket open.
            for i in range(1000):
                writer.write(b"X-%d: a\r\n" % i)
                await asyncio.sleep(0.05)

        dripping = None
        try:
            if kind != "no bytes":
                writer.write(UPGRADE)
            if kind == "a head dripped":
                dripping = asyncio.create_task(drip())
            assert await _read_to_eof(reader) == b""
        finally:
            if dripping is not None:
                dripping.cancel()
            writer.transport.abort()


async def test_a_scope_whose_extensions_is_none_is_served(gateway: Gateway) -> None:
    # ASGI makes "extensions" optional; a server (here a host application) may set None.
    edge = App(gateway, AsgiConfig(), lifespan=False)

    async def host(scope: Any, receive: Any, send: Any) -> None:
        await edge({**scope, "extensions": None}, receive, send)

    server = AsgiServer(gateway, AsgiConfig(), app=edge, asgi=host)
    await server.start("127.0.0.1", 0)
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(UPGRADE + b"\r\n")
            async with asyncio.timeout(BOUND):
                head = await reader.readuntil(b"\r\n\r\n")
                first = await reader.readexactly(1)
            assert head.startswith(b"HTTP/1.1 101 ")
            assert first == b"\x81"  # the gateway's hello, not a close for an error
        finally:
            writer.transport.abort()
        # A refusal without the http.response extension: ASGI's plain one, a 403.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(UPGRADE + b"Origin: https://elsewhere.example\r\n\r\n")
            answer = await _read_to_eof(reader)
            assert answer.startswith(b"HTTP/1.1 403 ")
        finally:
            writer.transport.abort()


async def _keep_alive_server(gateway: Gateway, released: asyncio.Event) -> AsgiServer:
    """An edge whose host answers plain HTTP with keep-alive: /slow once ``released``."""
    config = AsgiConfig(open_timeout=0.3)
    edge = App(gateway, config, lifespan=False)

    async def host(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await edge(scope, receive, send)
            return
        if scope["path"] == "/slow":
            await released.wait()
        headers = [(b"content-length", b"2")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    server = AsgiServer(gateway, config, app=edge, asgi=host)
    await server.start("127.0.0.1", 0)
    return server


async def _response(reader: asyncio.StreamReader) -> bytes:
    async with asyncio.timeout(BOUND):
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(2)  # "ok"
    return head


async def test_a_kept_alive_connection_dripping_its_next_head_is_closed(gateway: Gateway) -> None:
    # Any byte stops uvicorn's keep-alive timer: the next head has its own deadline.
    async with await _keep_alive_server(gateway, asyncio.Event()) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert (await _response(reader)).startswith(b"HTTP/1.1 200 ")
            writer.write(b"GET / HTTP/1.1\r\n")

            async def drip() -> None:
                for i in range(1000):
                    writer.write(b"X-%d: a\r\n" % i)
                    await asyncio.sleep(0.05)

            dripping = asyncio.create_task(drip())
            try:
                assert await _read_to_eof(reader) == b""
            finally:
                dripping.cancel()
        finally:
            writer.transport.abort()


async def test_a_pipelined_request_answered_after_open_timeout_is_not_cut(
    gateway: Gateway,
) -> None:
    # The second request's head came with the first: its answer may take longer than
    # open_timeout without the connection being closed under it.
    released = asyncio.Event()
    async with await _keep_alive_server(gateway, released) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            get = b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            writer.write(get % b"/" + get % b"/slow")
            assert (await _response(reader)).startswith(b"HTTP/1.1 200 ")
            await asyncio.sleep(1.0)  # open_timeout is 0.3: a wrong timer would have fired
            released.set()
            assert (await _response(reader)).startswith(b"HTTP/1.1 200 ")
        finally:
            writer.transport.abort()


async def test_a_request_of_more_than_128_headers_gets_431(gateway: Gateway) -> None:
    # 200 short headers are well under max_request_head: the application refuses them, as
    # the websockets edge's parser does, before it decodes or searches any.
    async with await _serve(gateway) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(_health(b"".join(b"X-%d: a\r\n" % i for i in range(200))))
            answer = await _read_to_eof(reader)
            assert answer.startswith(b"HTTP/1.1 431 ")
        finally:
            writer.transport.abort()
