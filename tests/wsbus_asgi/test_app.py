"""The ASGI application's own behaviour: its frame cap under a server with a larger one, its
lifespan run alone, mounted in FastAPI (a mount and a WebSocket route), its plain HTTP
answers, and the refusal where a server has no HTTP responses for WebSockets. Real uvicorn
servers on 127.0.0.1, except where a server without an ASGI extension is the point."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import msgspec
import pytest
import pytest_asyncio
from fastapi import FastAPI
from starlette.routing import WebSocketRoute
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed as WsClosed
from websockets.typing import Subprotocol

from wsbus import Gateway, GatewayConfig, HandshakeRequest, MemoryBus, hookimpl
from wsbus.errors import BusUnavailable
from wsbus_asgi import App, AsgiConfig, AsgiServer, app
from wsbus_cli.demo_services import Echo
from wsbus_websockets import connect

MAX_FRAME = 64 * 1024
TIMEOUT = 20.0


def _request(url: str, method: str = "GET") -> tuple[int, bytes, dict[str, str]]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read(), dict(error.headers)


@pytest_asyncio.fixture
async def gateway() -> AsyncIterator[Gateway]:
    gateway = Gateway(MemoryBus([Echo()]), config=GatewayConfig(node="asgi"), entry_points=False)
    try:
        yield gateway
    finally:
        await gateway.close()


@pytest.mark.parametrize(
    ("subprotocol", "frame"),
    [
        ("wsbus.v1.json", "x" * (MAX_FRAME + 1)),
        # Fewer characters than the cap, more bytes: counted in bytes.
        ("wsbus.v1.json", "ü" * (MAX_FRAME // 2 + 1)),
        ("wsbus.v1.msgpack", b"\x00" * (MAX_FRAME + 1)),
    ],
    ids=["ascii", "two-byte-characters", "binary"],
)
async def test_a_frame_over_the_gateway_cap_closes_1009_under_a_server_that_took_it(
    gateway: Gateway, subprotocol: str, frame: str | bytes
) -> None:
    """Under a uvicorn left at its 16 MiB ws_max_size, the application's own cap closes 1009."""
    await gateway.start()
    server = AsgiServer(gateway, AsgiConfig())
    async with asyncio.timeout(TIMEOUT):
        await server.start("127.0.0.1", 0, ws_max_size=16 * 1024 * 1024)
        try:
            async with ws_connect(server.url, subprotocols=[Subprotocol(subprotocol)]) as ws:
                await ws.recv()  # the welcome
                await ws.send(frame)
                with pytest.raises(WsClosed) as closed:
                    await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
            stats = gateway.stats()
            assert stats.closes_by_code.get(1009) == 1
            # The gateway never read it.
            assert stats.frames_received == 0
        finally:
            await server.close()


async def test_a_frame_of_exactly_the_cap_in_two_byte_characters_is_read(
    gateway: Gateway,
) -> None:
    await gateway.start()
    server = AsgiServer(gateway, AsgiConfig())
    head, tail = '{"type": "echo", "content": "', '"}'
    # Exactly MAX_FRAME bytes, most of them two-byte characters.
    body = "ü" * ((MAX_FRAME - len(head) - len(tail)) // 2)
    text = head + body + "x" * (MAX_FRAME - len(head) - len(tail) - 2 * len(body)) + tail
    assert len(text.encode()) == MAX_FRAME
    async with asyncio.timeout(TIMEOUT):
        await server.start("127.0.0.1", 0, ws_max_size=16 * 1024 * 1024)
        try:
            async with ws_connect(server.url) as ws:
                await ws.recv()
                await ws.send(text)
                reply = msgspec.json.decode(await ws.recv())
            assert reply["type"] == "echo.reply", reply
            assert 1009 not in gateway.stats().closes_by_code
        finally:
            await server.close()


async def test_alone_its_lifespan_starts_and_closes_the_gateway(gateway: Gateway) -> None:
    """Run alone (lifespan events on), the application owns the gateway's start and close."""
    ws = app(gateway)
    server = AsgiServer(gateway, ws.config, ws)
    async with asyncio.timeout(TIMEOUT):
        await server.start("127.0.0.1", 0, lifespan="on")
        try:
            async with connect(server.url, reconnect=False) as client:
                reply = await client.request("echo", "alone")
                assert reply["content"]["content"] == "alone"
        finally:
            await server.close()
    assert gateway.closing  # closed by the lifespan's shutdown


async def test_a_failed_gateway_start_fails_the_lifespan_startup() -> None:
    class _Down(MemoryBus):
        async def start(self, gateway: Any) -> None:
            raise BusUnavailable("the bus is down for this test")

    ws = app(Gateway(_Down(), entry_points=False))
    sent: list[MutableMapping[str, Any]] = []
    events = iter([{"type": "lifespan.startup"}])

    async def receive() -> MutableMapping[str, Any]:
        return next(events)

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    async with asyncio.timeout(TIMEOUT):
        await ws({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    assert [m["type"] for m in sent] == ["lifespan.startup.failed"]
    assert "the bus is down" in sent[0]["message"]


async def test_mounted_in_fastapi_with_its_lifespan(gateway: Gateway) -> None:
    """A mount (``/ws/``, health below it) and a WebSocket route (``/live``), one gateway."""
    ws = app(gateway)
    host = FastAPI(lifespan=ws.lifespan)
    host.router.routes.append(WebSocketRoute("/live", ws))
    host.mount("/ws", ws)

    @host.get("/api")
    async def api() -> dict[str, bool]:
        return {"api": True}

    paths: list[str] = []

    class _Paths:
        @hookimpl
        def wsbus_client_connected(self, client: Any, request: HandshakeRequest) -> None:
            paths.append(request.path)

    gateway.hooks.register(_Paths())
    server = AsgiServer(gateway, ws.config, ws, asgi=host)
    async with asyncio.timeout(TIMEOUT):
        await server.start("127.0.0.1", 0, lifespan="on")
        try:
            base = f"127.0.0.1:{server.port}"
            status, body, _ = await asyncio.to_thread(_request, f"http://{base}/api")
            assert (status, msgspec.json.decode(body)) == (200, {"api": True})
            status, body, _ = await asyncio.to_thread(_request, f"http://{base}/ws/healthz")
            assert status == 200 and msgspec.json.decode(body)["status"] == "ok"
            for path in ("/ws/", "/live"):
                async with connect(f"ws://{base}{path}", reconnect=False) as client:
                    reply = await client.request("echo", path)
                    assert reply["content"]["content"] == path
        finally:
            await server.close()
    # The authentication hooks see the whole path, mount included.
    assert paths == ["/ws/", "/live"]
    assert gateway.closing


async def test_plain_http_answers(gateway: Gateway) -> None:
    await gateway.start()
    server = AsgiServer(gateway, AsgiConfig())
    async with asyncio.timeout(TIMEOUT):
        await server.start("127.0.0.1", 0)
        try:
            base = f"http://127.0.0.1:{server.port}"
            status, body, headers = await asyncio.to_thread(_request, f"{base}/healthz", "HEAD")
            assert (status, body, headers["content-length"]) == (200, b"", "31")
            status, _, _ = await asyncio.to_thread(_request, f"{base}/healthz", "POST")
            assert status == 405
            status, body, headers = await asyncio.to_thread(_request, f"{base}/elsewhere")
            assert status == 426 and headers["cache-control"] == "no-store"
        finally:
            await server.close()


async def test_a_refusal_without_the_http_response_extension_is_asgis_close(
    gateway: Gateway,
) -> None:
    """A server without ``websocket.http.response`` gets ASGI's close (it answers 403)."""
    ws = App(gateway, lifespan=False)
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> MutableMapping[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "websocket",
        "path": "/",
        "headers": [(b"host", b"127.0.0.1:1"), (b"origin", b"https://evil.example")],
        "subprotocols": [],
        "client": ("127.0.0.1", 2),
        "server": ("127.0.0.1", 1),
        "scheme": "ws",
        "extensions": {},
    }
    await gateway.start()
    async with asyncio.timeout(TIMEOUT):
        await ws(scope, receive, send)
    assert sent == [{"type": "websocket.close", "code": 1008}]
    with pytest.raises(ValueError, match="not 'webtransport'"):
        await ws({"type": "webtransport"}, receive, send)
