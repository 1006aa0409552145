"""The WebSocket edge against a real server on 127.0.0.1: handshake, auth, HTTP, limits,
slow consumers, shutdown, and the Python client."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed as WsClosed

from tests.conftest import assert_balanced
from wsbus import (
    Codec,
    ConnectionClosed,
    ConnId,
    Context,
    Envelope,
    Gateway,
    GatewayConfig,
    HandshakeRefused,
    MemoryBus,
    Service,
    TokenAuth,
    Unrouted,
    handles,
)
from wsbus_websockets import Client, EdgeConfig, EdgeServer, serve

WsConnect = Callable[..., Awaitable[Client]]
AUTH = (
    GatewayConfig(node="t", allow_anonymous=False, auth_timeout=0.3),
    [TokenAuth({"s3": "ann"})],
)


async def test_echo_round_trip_both_codecs(wsbus_ws_connect: WsConnect) -> None:
    for codec in Codec:
        client = await wsbus_ws_connect(codec=codec)
        assert client.welcome["codec"] == codec.value
        reply = await client.request("echo", {"n": [1, 2.5, "x"]})
        assert reply["type"] == "echo.reply"
        assert reply["content"]["content"] == {"n": [1, 2.5, "x"]}
        assert reply["content"]["sender"]["conn_id"] == client.conn_id
        ack = await client.request("echo", None, wait="ack")
        assert ack["type"] == "wsbus.ack"


async def test_request_raises_server_error(wsbus_ws_connect: WsConnect) -> None:
    client = await wsbus_ws_connect()
    with pytest.raises(Unrouted) as info:
        await client.request("nobody.handles.this")
    assert info.value.code == "no_route" and info.value.retry is False


@pytest.mark.parametrize(("wsbus_config", "wsbus_plugins"), [AUTH])
async def test_token_from_header_query_cookie_subprotocol_and_frame(
    wsbus_server: EdgeServer, wsbus_ws_connect: WsConnect
) -> None:
    client = await wsbus_ws_connect(token="s3")
    assert client.welcome["user"] == "ann"
    url = wsbus_server.url
    for kwargs in (
        {"uri": url + "?token=s3"},
        {"uri": url, "additional_headers": {"Cookie": "other=1; wsbus_token=s3"}},
        {"uri": url, "subprotocols": ["wsbus.v1.json", "wsbus.token.s3"]},
    ):
        async with ws_connect(**kwargs) as ws:
            welcome = msgspec.json.decode(await asyncio.wait_for(ws.recv(), 5))
            assert welcome["content"]["user"] == "ann", kwargs
            assert ws.subprotocol in (None, "wsbus.v1.json")
    async with ws_connect(url) as ws:
        await ws.send('{"type": "wsbus.auth", "content": {"token": "s3"}}')
        welcome = msgspec.json.decode(await asyncio.wait_for(ws.recv(), 5))
        assert welcome["content"]["user"] == "ann"


@pytest.mark.parametrize(("wsbus_config", "wsbus_plugins"), [AUTH])
async def test_bad_missing_and_late_tokens_close_4401_4408(wsbus_server: EdgeServer) -> None:
    url = wsbus_server.url
    reasons = set()
    for kwargs in (
        {"uri": url, "additional_headers": {"Authorization": "Bearer wrong"}},
        {"uri": url + "?token=nope"},
        {"uri": url, "additional_headers": {"Cookie": "wsbus_token=nope"}},
    ):
        async with ws_connect(**kwargs) as ws:
            with pytest.raises(WsClosed) as info:
                await asyncio.wait_for(ws.recv(), 5)
            assert info.value.rcvd is not None and info.value.rcvd.code == 4401
            reasons.add(info.value.rcvd.reason)
    async with ws_connect(url) as ws:
        await ws.send('{"type": "wsbus.auth", "content": {"token": "guess"}}')
        with pytest.raises(WsClosed) as info:
            await asyncio.wait_for(ws.recv(), 5)
        assert info.value.rcvd is not None and info.value.rcvd.code == 4401
        reasons.add(info.value.rcvd.reason)
    # One reason text for every cause: it tells an attacker nothing.
    assert reasons == {"authentication failed"}
    async with ws_connect(url) as ws:
        with pytest.raises(WsClosed) as info:
            await asyncio.wait_for(ws.recv(), 5)
        assert info.value.rcvd is not None and info.value.rcvd.code == 4408
    with pytest.raises(ConnectionClosed) as closed:
        from wsbus_websockets import connect

        await connect(url, token="wrong")
    assert closed.value.code == 4401


def _get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read(), response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers.get("Content-Type", "")


async def test_health_endpoint(wsbus_server: EdgeServer, wsbus_ws_connect: WsConnect) -> None:
    await wsbus_ws_connect()
    base = f"http://127.0.0.1:{wsbus_server.port}"
    status, body, content_type = await asyncio.to_thread(_get, base + "/healthz")
    assert status == 200 and content_type == "application/json"
    assert msgspec.json.decode(body) == {"status": "ok", "connections": 1}
    status, _, _ = await asyncio.to_thread(_get, base + "/anything")
    assert status == 426


async def test_static_directory(wsbus_gateway: Gateway, tmp_path: Path) -> None:
    root = tmp_path / "static"
    root.mkdir()
    (root / "index.html").write_text("<h1>wsbus</h1>")
    (root / "app.js").write_text("export const x = 1;")
    (tmp_path / "secret.txt").write_text("do not serve")
    server = await serve(wsbus_gateway, "127.0.0.1", 0, config=EdgeConfig(static_dir=str(root)))
    try:
        base = f"http://127.0.0.1:{server.port}"
        status, body, content_type = await asyncio.to_thread(_get, base + "/")
        assert (status, body) == (200, b"<h1>wsbus</h1>") and content_type.startswith("text/html")
        status, body, content_type = await asyncio.to_thread(_get, base + "/app.js")
        assert status == 200 and "javascript" in content_type
        for path in ("/../secret.txt", "/%2e%2e/secret.txt", "/missing.html", "/..%2fsecret.txt"):
            status, body, _ = await asyncio.to_thread(_get, base + path)
            assert status == 404 and b"do not serve" not in body, path
    finally:
        await server.close()


async def _raw_get(port: int, target: bytes) -> tuple[int, bytes]:
    """GET ``target`` as sent, byte for byte (no client library normalizes it); 0: no answer."""
    async with asyncio.timeout(5):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            response = await reader.read()  # the edge closes after one response
        finally:
            writer.close()
    if not response:
        return 0, b""
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


SERVED = [
    (b"/", b"<h1>wsbus</h1>"),
    (b"/index.html", b"<h1>wsbus</h1>"),
    (b"/my%20page.html", b"spaced"),
    (b"/caf%C3%A9.txt", b"accented"),
    (b"/sub/", b"sub index"),
    (b"//sub//index.html", b"sub index"),
    (b"/sub/inner.html?v=1", b"inner"),
    (b"/%73ub/inner.html", b"inner"),  # an encoded letter is the letter
    (b"/alias.html", b"<h1>wsbus</h1>"),  # a link that stays inside the directory
]

REFUSED = [
    b"/../secret.txt",
    b"/sub/../../secret.txt",
    b"/%2e%2e/secret.txt",
    b"/%2E%2E/secret.txt",
    b"/.%2e/secret.txt",
    b"/..%2fsecret.txt",
    b"/%2e%2e%2fsecret.txt",
    b"/sub/%2e%2e/%2e%2e/secret.txt",
    b"/%2fetc%2fpasswd",
    b"/..%5csecret.txt",
    b"/..\\secret.txt",
    b"/sub%5cinner.html",
    b"/index.html%00",
    b"/index.html%00.js",
    b"/%00",
    b"/sub/.",
    b"/%ff",
    b"/caf\xc3\xa9.txt",  # not percent-encoded: not ASCII
    b"/link-out.txt",  # a link to a file outside the directory
    b"/linked-dir/secret.txt",  # through a link to a directory outside it
    b"/trap/",  # a directory whose index.html is a link outside it
    b"/missing.html",
    b"/" + b"a" * 300,
]


async def test_static_paths_are_percent_decoded_and_never_leave_the_directory(
    wsbus_gateway: Gateway, tmp_path: Path
) -> None:
    root = tmp_path / "static"
    (root / "sub").mkdir(parents=True)
    (root / "trap").mkdir()
    (root / "index.html").write_text("<h1>wsbus</h1>")
    (root / "my page.html").write_text("spaced")
    (root / "café.txt").write_text("accented")
    (root / "sub" / "index.html").write_text("sub index")
    (root / "sub" / "inner.html").write_text("inner")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("do not serve")
    (tmp_path / "secret.txt").write_text("do not serve")
    (root / "alias.html").symlink_to(root / "index.html")
    (root / "link-out.txt").symlink_to(tmp_path / "secret.txt")
    (root / "linked-dir").symlink_to(outside, target_is_directory=True)
    (root / "trap" / "index.html").symlink_to(tmp_path / "secret.txt")
    server = await serve(wsbus_gateway, "127.0.0.1", 0, config=EdgeConfig(static_dir=str(root)))
    try:
        for target, body in SERVED:
            assert await _raw_get(server.port, target) == (200, body), target
        for target in REFUSED:
            status, body = await _raw_get(server.port, target)
            # 404 (or, for a request line the edge's parser refuses, 400 or no answer).
            assert status in (0, 400, 404) and b"do not serve" not in body, (target, status)
    finally:
        await server.close()


@pytest.mark.parametrize("wsbus_config", [GatewayConfig(node="t", max_connections=2)])
async def test_connection_cap_refuses_with_503(
    wsbus_server: EdgeServer, wsbus_ws_connect: WsConnect
) -> None:
    await wsbus_ws_connect()
    await wsbus_ws_connect()
    with pytest.raises(HandshakeRefused) as info:
        await wsbus_ws_connect()
    assert info.value.status == 503


async def test_slow_consumer_is_closed_4507_and_others_are_unaffected(
    wsbus_server: EdgeServer, wsbus_gateway: Gateway, wsbus_ws_connect: WsConnect
) -> None:
    fast = await wsbus_ws_connect()
    async with ws_connect(wsbus_server.url, max_queue=4) as slow:
        welcome = msgspec.json.decode(await slow.recv())
        slow_id = welcome["content"]["conn_id"]
        # The slow client asks for a flood of 8 KiB messages, then stops reading.
        await slow.send(
            msgspec.json.encode({"type": "flood", "content": {"n": 4000, "pad": 1}}).decode()
        )
        # Bounded generously: a busy machine may be slow, but a gateway that never decides
        # to close the slow client, or that stops serving the fast one, fails either way.
        async with asyncio.timeout(30):
            while (
                slow_id in wsbus_gateway._sessions
                and wsbus_gateway._sessions[slow_id].close_code is None
            ):
                reply = await fast.request("echo", "still here", timeout=10)
                assert reply["content"]["content"] == "still here"
                await asyncio.sleep(0.02)
        # The client reads again: what was queued, then the close that says it missed some.
        with pytest.raises(WsClosed) as info:
            async with asyncio.timeout(10):
                while True:
                    await slow.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == 4507
    assert (await fast.request("echo", 1))["type"] == "echo.reply"
    async with asyncio.timeout(10):
        while wsbus_gateway.stats().closes_by_code.get(4507) != 1:
            await asyncio.sleep(0.02)
    assert_balanced(wsbus_gateway.stats())


@pytest.mark.parametrize(
    "wsbus_config", [GatewayConfig(node="t", rate=20, burst=5, rate_limit_close_after=0.5)]
)
async def test_flood_over_the_rate_limit(wsbus_server: EdgeServer, wsbus_bus: MemoryBus) -> None:
    async with ws_connect(wsbus_server.url) as ws:
        await ws.recv()
        errors: list[str] = []
        started = time.monotonic()
        with pytest.raises(WsClosed) as info:
            async with asyncio.timeout(30):
                while True:
                    for _ in range(20):
                        await ws.send('{"type": "echo"}')
                    while True:
                        try:
                            frame = msgspec.json.decode(await asyncio.wait_for(ws.recv(), 0.05))
                        except TimeoutError:
                            break
                        if frame["type"] == "wsbus.error":
                            errors.append(frame["content"]["code"])
        assert info.value.rcvd is not None and info.value.rcvd.code == 4429
    flooded_for = time.monotonic() - started
    assert "rate_limited" in errors
    # What got through is what the bucket allows over the time the flood really took (a
    # busy machine stretches that time; the bound stretches with it): burst + rate x time.
    assert len(wsbus_bus.published) <= 5 + 20 * flooded_for + 1


async def test_25_bad_frames_in_a_minute_close_4400(
    wsbus_server: EdgeServer, wsbus_bus: MemoryBus
) -> None:
    async with ws_connect(wsbus_server.url) as ws:
        await ws.recv()
        for _ in range(25):
            await ws.send('{"type": "echo", "sender": "service:auth"}')
        codes = []
        with pytest.raises(WsClosed) as info:
            async with asyncio.timeout(5):
                while True:
                    codes.append(msgspec.json.decode(await ws.recv())["content"]["code"])
        assert info.value.rcvd is not None and info.value.rcvd.code == 4400
    assert codes == ["unknown_field"] * 21
    assert wsbus_bus.published == []


async def test_graceful_shutdown_with_messages_in_flight(
    wsbus_server: EdgeServer, wsbus_gateway: Gateway
) -> None:
    async with ws_connect(wsbus_server.url) as ws:
        await ws.recv()
        for i in range(100):
            await ws.send(
                msgspec.json.encode({"type": "echo", "content": i, "id": f"f{i}"}).decode()
            )
        # The gateway's close is the graceful one; the edge's closes only its port after.
        closing = asyncio.create_task(wsbus_gateway.close())
        sent = 100
        try:
            for i in range(100, 200):
                await ws.send(
                    msgspec.json.encode({"type": "echo", "content": i, "id": f"f{i}"}).decode()
                )
                sent += 1
        except WsClosed:
            pass
        answered: dict[str, str] = {}
        with pytest.raises(WsClosed) as info:
            async with asyncio.timeout(10):
                while True:
                    frame = msgspec.json.decode(await ws.recv())
                    if frame["type"] == "wsbus.ack":
                        answered[frame["content"]["ref"]] = "acked"
                    elif frame["type"] == "wsbus.error":
                        assert frame["content"]["code"] == "shutting_down"
                        answered[frame["content"]["ref"]] = "refused"
        assert info.value.rcvd is not None and info.value.rcvd.code == 1001
        await closing
        await wsbus_server.close()
    # Every frame the server read ends acked or refused; none was lost silently.
    stats = wsbus_gateway.stats()
    assert stats.frames_received == len(answered), (stats, answered)
    assert set(answered) == {f"f{i}" for i in range(len(answered))}
    assert_balanced(stats)
    with pytest.raises(OSError):
        async with ws_connect(wsbus_server.url, open_timeout=2):
            pass


async def test_upgrade_during_shutdown_gets_503(
    wsbus_server: EdgeServer, wsbus_gateway: Gateway, wsbus_ws_connect: WsConnect
) -> None:
    client = await wsbus_ws_connect()
    # Keep the gateway draining: a busy connection holds the shutdown open a moment.
    wsbus_gateway.config  # noqa: B018 - documents that the drain uses the gateway's settings
    wsbus_server._closing = True
    with pytest.raises(HandshakeRefused) as info:
        await wsbus_ws_connect()
    assert info.value.status == 503
    wsbus_server._closing = False
    assert (await client.request("echo", 1))["type"] == "echo.reply"


async def test_client_reconnects_after_going_away(
    wsbus_server: EdgeServer, wsbus_services: list[Any]
) -> None:
    from tests.conftest import Control
    from wsbus_websockets import connect

    control = next(s for s in wsbus_services if isinstance(s, Control))
    client = await connect(wsbus_server.url, backoff=(0.01, 0.1))
    first = client.conn_id
    await control.link.disconnect(ConnId(first or ""), 1001, "moving")
    async with asyncio.timeout(5):
        while client.reconnects == 0:
            await asyncio.sleep(0.01)
    assert client.conn_id != first
    assert (await client.request("echo", "back"))["content"]["content"] == "back"
    # A close that says the client is at fault is final.
    await control.link.disconnect(ConnId(client.conn_id or ""), 4403, "forbidden")
    with pytest.raises(ConnectionClosed) as info:
        async with asyncio.timeout(5):
            async for _ in client:
                pass
    assert info.value.code == 4403
    await client.close()


async def test_client_reports_a_refused_upgrade(wsbus_server: EdgeServer) -> None:
    from wsbus_websockets import connect

    with pytest.raises(HandshakeRefused) as info:
        await connect(wsbus_server.url, origin="https://evil.example")
    assert info.value.status == 403 and "origin" in info.value.body


@pytest.mark.parametrize(
    "wsbus_edge_config", [EdgeConfig(ping_interval=0.1, ping_timeout=0.2, close_timeout=0.2)]
)
async def test_keepalive_timeout_is_the_only_1011(
    wsbus_server: EdgeServer, wsbus_gateway: Gateway
) -> None:
    # A raw client that completes the handshake, then never answers a ping.
    reader, writer = await asyncio.open_connection("127.0.0.1", wsbus_server.port)
    writer.write(
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101")
        while True:
            if not await reader.read(65536):
                break
    writer.close()
    async with asyncio.timeout(5):
        while wsbus_gateway.stats().closes_by_code.get(1011) != 1:
            await asyncio.sleep(0.02)


async def _upgrade_status(port: int, host: str, origin: str) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"GET / HTTP/1.1\r\nHost: {host}\r\nOrigin: {origin}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    return int(head.split(b" ", 2)[1])


async def test_same_origin_means_this_scheme_and_a_loopback_name(
    wsbus_server: EdgeServer,
) -> None:
    port = wsbus_server.port
    own = f"127.0.0.1:{port}"
    assert await _upgrade_status(port, own, f"http://{own}") == 101
    assert await _upgrade_status(port, f"localhost:{port}", f"http://localhost:{port}") == 101
    # An https page is not this plain-ws server's origin.
    assert await _upgrade_status(port, own, f"https://{own}") == 403
    # DNS rebinding: a foreign name pointed at 127.0.0.1 is not same-origin on loopback.
    rebound = f"evil.example:{port}"
    assert await _upgrade_status(port, rebound, f"http://{rebound}") == 403


async def test_a_burst_is_written_in_one_go_in_order_and_before_the_close(
    wsbus_server: EdgeServer, wsbus_gateway: Gateway
) -> None:
    from wsbus import Envelope, Recipients, ServiceAddress
    from wsbus.envelope import EnvelopeId

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
        assert [c for c in calls if c != "write"] == ["writelines 1", "writelines 299"], calls
        burst(300, 100)
        # A close in the same pass as a burst: the burst still goes first.
        async with asyncio.timeout(5):
            await conn.close(4000, "bye")
            closed = await reader
        assert received == list(range(400))
        assert closed.rcvd is not None and closed.rcvd.code == 4000


async def _until_type(ws: Any, type: str) -> dict[str, Any]:
    """Read frames from a raw client until one of ``type``; bounded."""
    async with asyncio.timeout(10):
        while True:
            frame: dict[str, Any] = msgspec.json.decode(await ws.recv())
            if frame["type"] == type:
                return frame


async def test_closing_an_edge_leaves_its_gateway_serving_the_others(
    wsbus_gateway: Gateway, wsbus_server: EdgeServer, wsbus_connect: Any
) -> None:
    """The edge closes its port and its connections (1001); the gateway is its caller's."""
    second = await serve(wsbus_gateway, "127.0.0.1", 0)
    try:
        memory = await wsbus_connect()
        async with ws_connect(wsbus_server.url) as first_ws, ws_connect(second.url) as second_ws:
            await first_ws.recv()
            await second_ws.recv()
            await wsbus_server.close()
            with pytest.raises(WsClosed) as info:
                async with asyncio.timeout(10):
                    await first_ws.recv()
            assert info.value.rcvd is not None and info.value.rcvd.code == 1001
            with pytest.raises(OSError):
                async with ws_connect(wsbus_server.url, open_timeout=2):
                    pass
            # The gateway runs on: another edge's client and an in-memory one are served.
            assert not wsbus_gateway.closing
            await second_ws.send('{"type": "echo", "content": "second"}')
            reply = await _until_type(second_ws, "echo.reply")
            assert reply["content"]["content"] == "second"
            memory.send("echo", "memory")
            reply = await memory.receive_until("echo.reply")
            assert reply["content"]["content"] == "memory"
            # The gateway's own close still closes every connection it serves.
            async with asyncio.timeout(30):
                await wsbus_gateway.close()
            with pytest.raises(WsClosed) as info:
                await _until_type(second_ws, "never")
            assert info.value.rcvd is not None and info.value.rcvd.code == 1001
            assert await memory.wait_closed() == 1001
        # The edge still listening says so to a load balancer.
        health = f"http://127.0.0.1:{second.port}/healthz"
        status, body, _ = await asyncio.to_thread(_get, health)
        assert status == 503 and msgspec.json.decode(body)["status"] == "closing"
        assert_balanced(wsbus_gateway.stats())
    finally:
        await second.close()


class _Held(Service):
    """Takes ``held.take`` messages only once the test opens its gate; keeps their order."""

    name = "held"

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.taken: list[int] = []

    @handles("held.take")
    async def take(self, message: Envelope, ctx: Context) -> None:
        await self.gate.wait()
        self.taken.append(message.content)


class _Quick(Service):
    """Echoes ``quick.echo`` at once."""

    name = "quick"

    @handles("quick.echo")
    async def echo(self, message: Envelope, ctx: Context) -> None:
        ctx.reply(message.content)


async def test_a_burst_at_a_slow_service_holds_its_client_back_instead_of_refusing() -> None:
    """More frames than the inbox holds, at a service that takes none yet: none refused.

    The gateway stops reading the bursting client (TCP then holds it back) until the
    service takes them, and every frame is handled, in order. Another client's message to
    another service is answered meanwhile.
    """
    burst = 100
    held = _Held()
    # A timeout far beyond the test's own waits: the held service is slow, not stuck.
    bus = MemoryBus([held, _Quick()], inbox_size=8, timeout=600)
    gateway = Gateway(bus, config=GatewayConfig(node="t"), entry_points=False)
    await gateway.start()
    server = await serve(gateway, "127.0.0.1", 0)
    try:
        async with ws_connect(server.url) as burster, ws_connect(server.url) as other:
            await burster.recv()
            await other.recv()
            for i in range(burst):
                frame = {"type": "held.take", "content": i, "id": f"h{i}"}
                await burster.send(msgspec.json.encode(frame).decode())
            # The service holds one, its inbox is full, and the reader waits for room.
            async with asyncio.timeout(10):
                while (stats := gateway.stats()).frames_in_flight + stats.frames_rejected == 0:
                    await asyncio.sleep(0.01)
            assert stats.rejected_by_code == {} and stats.frames_in_flight == 1
            await other.send('{"type": "quick.echo", "content": "still here"}')
            reply = await _until_type(other, "quick.echo.reply")
            assert reply["content"] == "still here"
            # The burst is held back, not refused: the gateway read only part of it.
            assert held.taken == []
            assert gateway.stats().frames_received < burst
            held.gate.set()
            answers: dict[str, str] = {}
            async with asyncio.timeout(30):
                while len(answers) < burst:
                    frame = msgspec.json.decode(await burster.recv())
                    if frame["type"] == "wsbus.ack":
                        answers[frame["content"]["ref"]] = "acked"
                    elif frame["type"] == "wsbus.error":
                        answers[frame["content"]["ref"]] = frame["content"]["code"]
                while len(held.taken) < burst:
                    await asyncio.sleep(0.01)
        assert answers == {f"h{i}": "acked" for i in range(burst)}
        assert held.taken == list(range(burst))
        assert_balanced(gateway.stats())
    finally:
        held.gate.set()
        await gateway.close()
        await server.close()
