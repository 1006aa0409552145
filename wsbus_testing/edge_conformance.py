"""The edge conformance suite: what every WebSocket edge does, against a real server.

Subclass :class:`EdgeConformance` and provide ``wsbus_serve_edge``, your edge's factory
(see :mod:`wsbus_testing.edges`), and override :meth:`EdgeConformance.edge_socket` for the
tests of frames that waited in the transport::

    def edge_socket(self, connection):  # in your subclass
        return connection.transport.get_extra_info("socket")

It checks, on 127.0.0.1 with the ``websockets`` client, the Python client
(``wsbus_websockets.connect``) and raw sockets: echo in both codecs, tokens from every
source and the 4401/4408 closes, the health endpoint, the static directory (percent-decoded
paths, nothing outside it), the connection cap (503), slow consumers (4507, and what counts
as written), the rate limit (4429), bad frames (4400), graceful shutdown (1001, then no
port), 503 while shutting down, the client's reconnect, keepalive (1011), same-origin rules,
closing an edge while its gateway serves on, and back-pressure on a burst at a slow
service. It reads the gateway's counters and sessions; every wait is bounded. Needs the
``websockets`` extra.
"""

# Tests poll with short sleeps inside asyncio.timeout (bounded, and simpler to read) and
# read until a close inside pytest.raises, as wsbus's own tests do.
# ruff: noqa: ASYNC110, PT011, PT012

from __future__ import annotations

import asyncio
import socket
import struct
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed as WsClosed

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
from wsbus_websockets import Client

from .accounting import assert_balanced
from .edges import EdgeSuite, RunningEdge, ServeEdge
from .raw import masked_frame, open_upgraded, parse_frames
from .services import Flood

__all__ = ["EdgeConformance"]

WsConnect = Callable[..., Awaitable[Client]]
AUTH = (
    GatewayConfig(node="t", allow_anonymous=False, auth_timeout=0.3),
    [TokenAuth({"s3": "ann"})],
)


def _get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read(), response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers.get("Content-Type", "")


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


async def _until_type(ws: Any, type: str) -> dict[str, Any]:
    """Read frames from a raw client until one of ``type``; bounded."""
    async with asyncio.timeout(10):
        while True:
            frame: dict[str, Any] = msgspec.json.decode(await ws.recv())
            if frame["type"] == type:
                return frame


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


async def _poll(condition: Any, timeout: float = 30.0) -> None:  # noqa: ASYNC109
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


class _RawClient:
    """A client on a blocking socket with a small receive buffer, reading only on demand."""

    def __init__(self, port: int) -> None:
        self.sock, rest = open_upgraded(port, rcvbuf=4096)
        self.buffer = bytearray(rest)

    def send_text(self, frame: dict[str, Any]) -> None:
        self.sock.sendall(masked_frame(0x1, msgspec.json.encode(frame)))

    def read_all(self) -> list[tuple[int, bytes]]:
        """Read until the server closes the TCP connection (or resets it)."""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            self.buffer += chunk
        return parse_frames(self.buffer)


class _SlowReader:
    """A raw WebSocket client with a 2 KiB receive buffer that reads only when asked."""

    def __init__(self, port: int) -> None:
        self.sock, rest = open_upgraded(port, rcvbuf=2048)
        self.buffer = bytearray(rest)
        self.items = 0

    def send(self, frame: dict[str, Any]) -> None:
        self.sock.sendall(masked_frame(0x1, msgspec.json.encode(frame)))

    def read_for(self, seconds: float) -> None:
        """Read whatever comes for ``seconds``; count the flood items."""
        end = time.monotonic() + seconds
        self.sock.settimeout(0.05)
        while time.monotonic() < end:
            try:
                chunk = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            if not chunk:
                break
            self.buffer += chunk
            for opcode, payload in parse_frames(self.buffer):
                if opcode == 0x1 and b'"flood.item"' in payload:
                    self.items += 1


class EdgeConformance(EdgeSuite):
    """What every WebSocket edge does, on a real server; provide ``wsbus_serve_edge``.

    Override :meth:`edge_socket` too, for the tests of what waited in the transport.
    """

    def edge_socket(self, connection: Any) -> socket.socket:
        """The server's socket under ``connection`` (the gateway's ``ClientConnection``)."""
        pytest.skip("the suite's edge_socket is not provided for this edge")

    def mark_closing(self, server: Any, closing: bool) -> None:
        """Make ``server`` behave as it does once its close has begun, or not.

        wsbus's edges keep that in ``_closing``; override this for an edge that does not.
        """
        server._closing = closing

    async def test_echo_round_trip_both_codecs(self, wsbus_ws_connect: WsConnect) -> None:
        """The Python client's echo round trip, in JSON and in MessagePack."""
        for codec in Codec:
            client = await wsbus_ws_connect(codec=codec)
            assert client.welcome["codec"] == codec.value
            reply = await client.request("echo", {"n": [1, 2.5, "x"]})
            assert reply["type"] == "echo.reply"
            assert reply["content"]["content"] == {"n": [1, 2.5, "x"]}
            assert reply["content"]["sender"]["conn_id"] == client.conn_id
            ack = await client.request("echo", None, wait="ack")
            assert ack["type"] == "wsbus.ack"

    async def test_request_raises_server_error(self, wsbus_ws_connect: WsConnect) -> None:
        """A request nothing handles raises the error the gateway sent."""
        client = await wsbus_ws_connect()
        with pytest.raises(Unrouted) as info:
            await client.request("nobody.handles.this")
        assert info.value.code == "no_route" and info.value.retry is False

    @pytest.mark.parametrize(("wsbus_config", "wsbus_plugins"), [AUTH])
    async def test_token_from_header_query_cookie_subprotocol_and_frame(
        self, wsbus_server: RunningEdge, wsbus_ws_connect: WsConnect
    ) -> None:
        """A token is found in the header, the query, the cookie, a subprotocol, a frame."""
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
    async def test_bad_missing_and_late_tokens_close_4401_4408(
        self, wsbus_server: RunningEdge
    ) -> None:
        """A wrong token closes with 4401 (one reason for every cause), none in time with 4408."""
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

    async def test_health_endpoint(
        self, wsbus_server: RunningEdge, wsbus_ws_connect: WsConnect
    ) -> None:
        """The health endpoint answers 200 with the connections; another path gets 426."""
        await wsbus_ws_connect()
        base = f"http://127.0.0.1:{wsbus_server.port}"
        status, body, content_type = await asyncio.to_thread(_get, base + "/healthz")
        assert status == 200 and content_type == "application/json"
        assert msgspec.json.decode(body) == {"status": "ok", "connections": 1}
        status, _, _ = await asyncio.to_thread(_get, base + "/anything")
        assert status == 426

    async def test_static_directory(
        self, wsbus_gateway: Gateway, wsbus_serve_edge: ServeEdge, tmp_path: Path
    ) -> None:
        """Files of the static directory are served; nothing outside it is."""
        root = tmp_path / "static"
        root.mkdir()
        (root / "index.html").write_text("<h1>wsbus</h1>")
        (root / "app.js").write_text("export const x = 1;")
        (tmp_path / "secret.txt").write_text("do not serve")
        server = await wsbus_serve_edge(wsbus_gateway, static_dir=str(root))
        try:
            base = f"http://127.0.0.1:{server.port}"
            status, body, content_type = await asyncio.to_thread(_get, base + "/")
            assert (status, body) == (200, b"<h1>wsbus</h1>") and content_type.startswith(
                "text/html"
            )
            status, body, content_type = await asyncio.to_thread(_get, base + "/app.js")
            assert status == 200 and "javascript" in content_type
            for path in (
                "/../secret.txt",
                "/%2e%2e/secret.txt",
                "/missing.html",
                "/..%2fsecret.txt",
            ):
                status, body, _ = await asyncio.to_thread(_get, base + path)
                assert status == 404 and b"do not serve" not in body, path
        finally:
            await server.close()

    async def test_static_paths_are_percent_decoded_and_never_leave_the_directory(
        self, wsbus_gateway: Gateway, wsbus_serve_edge: ServeEdge, tmp_path: Path
    ) -> None:
        """Static paths are percent-decoded; no escape, NUL, backslash or link leaves the root."""
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
        server = await wsbus_serve_edge(wsbus_gateway, static_dir=str(root))
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
        self, wsbus_server: RunningEdge, wsbus_ws_connect: WsConnect
    ) -> None:
        """Upgrades beyond the connection cap get 503."""
        await wsbus_ws_connect()
        await wsbus_ws_connect()
        with pytest.raises(HandshakeRefused) as info:
            await wsbus_ws_connect()
        assert info.value.status == 503

    async def test_slow_consumer_is_closed_4507_and_others_are_unaffected(
        self, wsbus_server: RunningEdge, wsbus_gateway: Gateway, wsbus_ws_connect: WsConnect
    ) -> None:
        """A client that stops reading is closed with 4507; another is served meanwhile."""
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
    async def test_flood_over_the_rate_limit(
        self, wsbus_server: RunningEdge, wsbus_bus: MemoryBus
    ) -> None:
        """A flood over the rate limit gets rate_limited, then 4429; what got through is bounded."""
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
        self, wsbus_server: RunningEdge, wsbus_bus: MemoryBus
    ) -> None:
        """25 bad frames within a minute close with 4400; nothing is published."""
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
        self, wsbus_server: RunningEdge, wsbus_gateway: Gateway
    ) -> None:
        """The gateway's close answers every frame it read (acked or refused), then 1001."""
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
        self, wsbus_server: RunningEdge, wsbus_gateway: Gateway, wsbus_ws_connect: WsConnect
    ) -> None:
        """An upgrade while the edge shuts down gets 503."""
        client = await wsbus_ws_connect()
        # Keep the gateway draining: a busy connection holds the shutdown open a moment.
        wsbus_gateway.config  # noqa: B018 - documents that the drain uses the gateway's settings
        self.mark_closing(wsbus_server, True)
        with pytest.raises(HandshakeRefused) as info:
            await wsbus_ws_connect()
        assert info.value.status == 503
        self.mark_closing(wsbus_server, False)
        assert (await client.request("echo", 1))["type"] == "echo.reply"

    async def test_client_reconnects_after_going_away(
        self, wsbus_server: RunningEdge, wsbus_services: list[Any]
    ) -> None:
        """The Python client reconnects after 1001, and not after a close that blames it."""
        from wsbus_websockets import connect

        # Any service's link can disconnect a client.
        control = next(s for s in wsbus_services if isinstance(s, Flood))
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

    async def test_client_reports_a_refused_upgrade(self, wsbus_server: RunningEdge) -> None:
        """The Python client raises HandshakeRefused with the status and the body."""
        from wsbus_websockets import connect

        with pytest.raises(HandshakeRefused) as info:
            await connect(wsbus_server.url, origin="https://evil.example")
        assert info.value.status == 403 and "origin" in info.value.body

    @pytest.mark.parametrize(
        "wsbus_edge_settings", [{"ping_interval": 0.1, "ping_timeout": 0.2, "close_timeout": 0.2}]
    )
    async def test_keepalive_timeout_is_the_only_1011(
        self, wsbus_server: RunningEdge, wsbus_gateway: Gateway
    ) -> None:
        """A peer that never answers a ping is closed with 1011."""
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

    async def test_same_origin_means_this_scheme_and_a_loopback_name(
        self,
        wsbus_server: RunningEdge,
    ) -> None:
        """Same-origin means this scheme, and on loopback a loopback name."""
        port = wsbus_server.port
        own = f"127.0.0.1:{port}"
        assert await _upgrade_status(port, own, f"http://{own}") == 101
        assert await _upgrade_status(port, f"localhost:{port}", f"http://localhost:{port}") == 101
        # An https page is not this plain-ws server's origin.
        assert await _upgrade_status(port, own, f"https://{own}") == 403
        # DNS rebinding: a foreign name pointed at 127.0.0.1 is not same-origin on loopback.
        rebound = f"evil.example:{port}"
        assert await _upgrade_status(port, rebound, f"http://{rebound}") == 403

    async def test_closing_an_edge_leaves_its_gateway_serving_the_others(
        self,
        wsbus_gateway: Gateway,
        wsbus_server: RunningEdge,
        wsbus_connect: Any,
        wsbus_serve_edge: ServeEdge,
    ) -> None:
        """The edge closes its port and its connections (1001); the gateway is its caller's."""
        second = await wsbus_serve_edge(wsbus_gateway)
        try:
            memory = await wsbus_connect()
            async with (
                ws_connect(wsbus_server.url) as first_ws,
                ws_connect(second.url) as second_ws,
            ):
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

    async def test_a_burst_at_a_slow_service_holds_its_client_back_instead_of_refusing(
        self, wsbus_serve_edge: ServeEdge
    ) -> None:
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
        server = await wsbus_serve_edge(gateway)
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

    @pytest.mark.parametrize("wsbus_edge_settings", [{"close_timeout": 0.5}])
    async def test_a_slow_consumer_close_counts_written_only_what_reached_the_socket(
        self, wsbus_server: RunningEdge, wsbus_gateway: Gateway
    ) -> None:
        """A slow consumer's close counts written only what reached the client."""
        client = await asyncio.to_thread(_RawClient, wsbus_server.port)
        try:
            # 4,000 messages of 8 KiB for a client that reads nothing: 4507, and the close
            # frame cannot get through before close_timeout, so the connection is aborted.
            client.send_text({"type": "flood", "content": {"n": 4000, "pad": 1}})
            await _poll(lambda: wsbus_gateway.stats().closes_by_code.get(4507) == 1)
            frames = await asyncio.to_thread(client.read_all)
        finally:
            client.sock.close()
        items = [
            payload for opcode, payload in frames if opcode == 0x1 and b'"flood.item"' in payload
        ]
        stats = wsbus_gateway.stats()
        assert_balanced(stats)
        assert stats.deliveries_dropped == stats.dropped_by_close_code[4507] > 0
        # Every delivery counted written reached the client; none of the dropped ones did.
        assert len(items) == stats.deliveries_written, (len(items), stats)
        numbers = [msgspec.json.decode(item)["content"]["i"] for item in items]
        assert numbers == list(range(len(numbers)))

    @pytest.mark.parametrize("wsbus_edge_settings", [{"close_timeout": 1.0}])
    async def test_a_slow_reader_gets_the_4507_close_frame(
        self, wsbus_server: RunningEdge, wsbus_gateway: Gateway
    ) -> None:
        """A client that reads late still gets the 4507 close frame after what was written."""
        client = await asyncio.to_thread(_RawClient, wsbus_server.port)
        try:
            client.send_text({"type": "flood", "content": {"n": 4000, "pad": 1}})
            await _poll(
                lambda: (
                    any(c.close_code == 4507 for c in wsbus_gateway._sessions.values())
                    or wsbus_gateway.stats().closes_by_code.get(4507) == 1
                )
            )
            frames = await asyncio.to_thread(client.read_all)
        finally:
            client.sock.close()
        closes = [payload for opcode, payload in frames if opcode == 0x8]
        assert closes and int.from_bytes(closes[0][:2], "big") == 4507, frames[-3:]
        items = [p for opcode, p in frames if opcode == 0x1 and b'"flood.item"' in p]
        await _poll(lambda: wsbus_gateway.stats().closes_by_code.get(4507) == 1)
        stats = wsbus_gateway.stats()
        assert_balanced(stats)
        assert len(items) == stats.deliveries_written

    async def test_deliveries_that_waited_in_the_transport_are_counted_written_once_sent(
        self, wsbus_server: RunningEdge, wsbus_gateway: Gateway
    ) -> None:
        """Deliveries that waited in the transport are counted written once sent."""
        reader = await asyncio.to_thread(_SlowReader, wsbus_server.port)
        try:
            await _poll(lambda: len(wsbus_gateway._sessions) == 1)
            client = next(iter(wsbus_gateway._sessions.values()))
            counters = wsbus_gateway._counters
            # A small kernel buffer on the server's side too: what the client does not read
            # soon waits in the transport.
            link: Any = client._driver  # the gateway's driver of the session
            sock = self.edge_socket(link.conn)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            # A moment of not reading: padded items until some wait in the transport.
            for _ in range(20):
                await asyncio.to_thread(
                    reader.send, {"type": "flood", "content": {"n": 8, "pad": 1}}
                )
                await asyncio.sleep(0.2)
                if client.unconfirmed:
                    break
            assert client.unconfirmed, "no delivery ever waited in the transport"
            # Then a client that reads everything, promptly, and more deliveries.
            await asyncio.to_thread(reader.read_for, 1.0)
            for _ in range(3):
                await asyncio.to_thread(reader.send, {"type": "flood", "content": {"n": 150}})
                await asyncio.to_thread(reader.read_for, 0.5)
            # Without stats() (which settles): every delivery the client read is counted
            # written, and no list of unconfirmed frames is left. Before, the list was settled
            # once, when it was made: it kept every later delivery, counted pending.
            await _poll(lambda: counters.deliveries_written == reader.items, 10)
            assert client.unconfirmed is None
            assert client.pending == 0
        finally:
            reader.sock.close()
        await _poll(lambda: wsbus_gateway.stats().connections == 0)
        assert_balanced(wsbus_gateway.stats())

    async def test_frames_in_the_transport_at_a_reset_are_counted_dropped_not_written(
        self, wsbus_server: RunningEdge, wsbus_gateway: Gateway
    ) -> None:
        """Frames in the transport at a TCP reset are counted dropped, not written."""
        reader = await asyncio.to_thread(_SlowReader, wsbus_server.port)
        try:
            await _poll(lambda: len(wsbus_gateway._sessions) == 1)
            client = next(iter(wsbus_gateway._sessions.values()))
            link: Any = client._driver  # the gateway's driver of the session
            sock = self.edge_socket(link.conn)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            # The client reads nothing: 40 items of 8 KiB (320 KiB, under outbound_bytes), of
            # which the kernels take a few; the rest waits in the transport and the queue.
            await asyncio.to_thread(reader.send, {"type": "flood", "content": {"n": 40, "pad": 1}})
            await _poll(lambda: wsbus_gateway.stats().deliveries_queued == 40)
            await asyncio.sleep(0.3)  # whatever the kernels take, they have taken
            # unsent(): frames the connection took that have not reached the socket (the
            # queue's are not among them). It looks at the socket, as stats() does: the
            # figures are taken after both looks, and nothing runs between them and the
            # reset (no await), or a late look would count more written than "before" says.
            unsent = client._unsent
            assert unsent is not None and unsent() > 0, "no frame waited in the transport"
            before = wsbus_gateway.stats()
            assert before.deliveries_pending > 0, before
        finally:
            # A reset: asyncio empties the transport's buffer before it says the connection
            # is lost, so what it held must not be counted as reaching the socket.
            reader.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            reader.sock.close()
        await _poll(lambda: wsbus_gateway.stats().connections == 0)
        stats = wsbus_gateway.stats()
        assert_balanced(stats)
        # Every delivery not known to have reached the socket before the reset is dropped
        # with the close; those that had reached it stay written. Before, the transport's
        # frames were counted written.
        assert stats.deliveries_dropped == before.deliveries_pending, (before, stats)
        assert stats.deliveries_written == before.deliveries_written, (before, stats)
