"""The WebSocket edge: a gateway on a real port, on the ``websockets`` asyncio API.

Before the upgrade it answers plain HTTP (a health endpoint, an optional static directory),
refuses shutting-down or full servers with 503 and foreign origins with 403, and negotiates
the codec subprotocol (an offer of only unknown subprotocols gets 400). After the upgrade
each connection is handed to :meth:`wsbus.Gateway.serve`, which authenticates it, and reads
and writes it until it closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import ipaddress
import logging
import mimetypes
from collections.abc import Sequence
from http.cookies import CookieError, SimpleCookie
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qsl, urlsplit

import msgspec
from websockets.asyncio.server import Server, ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed as WsConnectionClosed
from websockets.exceptions import NegotiationError
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.typing import Subprotocol

from wsbus.edge import ConnectionClosed
from wsbus.errors import ConfigError
from wsbus.gateway import Gateway
from wsbus.hooks import HandshakeRequest
from wsbus.wire import Codec, negotiate

__all__ = ["TOKEN_SUBPROTOCOL_PREFIX", "EdgeConfig", "EdgeServer", "serve"]

log = logging.getLogger("wsbus.websockets")

TOKEN_SUBPROTOCOL_PREFIX: Final = "wsbus.token."
"""A subprotocol ``wsbus.token.<token>`` carries a bearer token from a browser, which
cannot set headers on a WebSocket. Offer it beside a codec subprotocol; it is never
selected."""


_SINGLE_HEADERS: Final = ("Host", "Origin", "Upgrade", "Authorization", "Cookie")
"""Headers that must not be repeated in an upgrade request."""


class EdgeConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Settings of the WebSocket edge, with defaults fit for the open internet.

    Attributes:
        allowed_origins: origins (``https://app.example.com``) allowed besides the server's
            own; ``"null"`` and ``"file://"`` are refused unless listed here.
        allow_same_origin: allow pages served by this server: an Origin whose scheme is
            this server's (http, or https with TLS) and whose host and port equal the
            request's Host; on a loopback address only 127.0.0.1, localhost and [::1] count.
        allow_missing_origin: allow clients that send no Origin header: programs, not
            browsers (browsers always send one).
        max_connections: refuse upgrades with HTTP 503 beyond this many connections;
            defaults to the gateway's ``max_connections``.
        inbound_queue: frames websockets buffers per connection before it stops reading.
        write_limit: bytes in a connection's write buffer before a send waits.
        compression: permessage-deflate; off by default (it costs memory per connection
            and opens compression-oracle attacks).
        open_timeout: seconds for the opening handshake.
        ping_interval: seconds between keepalive pings; None disables them.
        ping_timeout: seconds to wait for a pong before closing with 1011.
        close_timeout: seconds to wait for the closing handshake.
        health_path: the path of the health endpoint (plain HTTP GET).
        static_dir: a directory to serve over plain HTTP GET, or None.
        token_query: the query parameter that may carry a bearer token.
        token_cookie: the cookie that may carry a bearer token.
    """

    allowed_origins: tuple[str, ...] = ()
    allow_same_origin: bool = True
    allow_missing_origin: bool = True
    max_connections: int | None = None
    inbound_queue: int = 16
    write_limit: int = 32 * 1024
    compression: bool = False
    open_timeout: float = 10.0
    ping_interval: float | None = 20.0
    ping_timeout: float | None = 20.0
    close_timeout: float = 5.0
    health_path: str = "/healthz"
    static_dir: str | None = None
    token_query: str = "token"
    token_cookie: str = "wsbus_token"

    def __post_init__(self) -> None:
        if self.inbound_queue < 1 or self.write_limit < 1:
            raise ConfigError("inbound_queue and write_limit must be >= 1")
        if self.static_dir is not None and not Path(self.static_dir).is_dir():
            raise ConfigError(f"static_dir {self.static_dir!r} is not a directory")


# A server frame's header is at most 10 bytes (no mask): counted with gathered frames so
# that what waits in the protocol's and the transport's buffers stays within write_limit.
_MAX_HEADER: Final = 10


class _Connection:
    """A websockets connection as a :class:`wsbus.ClientConnection`."""

    __slots__ = (
        "_codec",
        "_gathered",
        "_limit",
        "_loop",
        "_pass_open",
        "_request",
        "_text",
        "_ws",
        "raw_receive",
    )

    def __init__(
        self,
        ws: ServerConnection,
        codec: Codec,
        request: HandshakeRequest,
        write_limit: int = 32 * 1024,
    ) -> None:
        self._ws = ws
        self._codec = codec
        self._text = codec.is_text
        self._request = request
        self._limit = write_limit
        self._loop = asyncio.get_running_loop()
        # Bytes of frames send_nowait gathered in this event-loop pass, not yet written.
        self._gathered = 0
        self._pass_open = False
        # websockets' own recv, for the gateway's reader; see closed_error.
        self.raw_receive = ws.recv

    @property
    def codec(self) -> Codec:
        return self._codec

    @property
    def request(self) -> HandshakeRequest:
        return self._request

    async def receive(self) -> str | bytes:
        try:
            return await self._ws.recv()
        except WsConnectionClosed as exc:
            raise _closed(exc) from None

    @staticmethod
    def closed_error(exc: BaseException) -> ConnectionClosed | None:
        """Translate an exception from ``raw_receive``; None when it is not a close."""
        return _closed(exc) if isinstance(exc, WsConnectionClosed) else None

    async def send(self, data: bytes) -> None:
        try:
            await self._ws.send(data, text=self._text)
        except WsConnectionClosed as exc:
            raise _closed(exc) from None

    def send_nowait(self, data: bytes) -> bool:
        # What websockets.broadcast() does, but only while the write buffer is under its
        # limit (past it the frame waits in the gateway's bounded queue instead). The first
        # frame of an event-loop pass is written at once, for latency; the ones after it in
        # the same pass are gathered and written together when the pass ends, or as soon as
        # they reach the limit: one system call for a burst instead of one per frame.
        # Anything websockets sends itself (a queued frame, a ping, the close) writes the
        # gathered frames first, so the order is kept.
        ws = self._ws
        if (
            ws.protocol.state is not State.OPEN
            or ws.send_in_progress is not None
            or ws.transport.get_write_buffer_size() + self._gathered > self._limit
        ):
            return False
        if self._text:
            ws.protocol.send_text(data)
        else:
            ws.protocol.send_binary(data)
        if self._pass_open:
            self._gathered += len(data) + _MAX_HEADER
            if self._gathered >= self._limit:
                self._write_gathered()
        else:
            self._pass_open = True
            self._loop.call_soon(self._end_pass)
            self._write_gathered()
        return True

    def _end_pass(self) -> None:
        self._pass_open = False
        self._write_gathered()

    def _write_gathered(self) -> None:
        self._gathered = 0
        ws = self._ws
        chunks = ws.protocol.data_to_send()
        if not chunks:
            return  # websockets wrote them already, before something of its own
        if all(chunks):
            ws.transport.writelines(chunks)
            return
        # An end of stream among them (the close handshake finished): websockets' own way.
        for chunk in chunks:
            if chunk:
                ws.transport.write(chunk)
            elif ws.transport.can_write_eof():
                # As websockets does: write_eof() documents no exceptions, and some loops
                # raise when the transport is closing.
                with contextlib.suppress(Exception):
                    ws.transport.write_eof()
            else:
                ws.transport.close()

    async def close(self, code: int, reason: str = "") -> None:
        await self._ws.close(code, reason)


def _closed(exc: WsConnectionClosed) -> ConnectionClosed:
    """Translate websockets' exception, keeping the code that ended the connection."""
    frame = exc.rcvd if exc.rcvd_then_sent or exc.sent is None else exc.sent
    if frame is None:
        return ConnectionClosed(1006, "connection lost")
    return ConnectionClosed(frame.code, frame.reason)


class EdgeServer:
    """A running WebSocket edge. Close it with :meth:`close` (or use ``async with``).

    Attributes:
        gateway: the gateway it serves.
        config: its settings.
        server: the underlying ``websockets`` server.
    """

    def __init__(self, gateway: Gateway, config: EdgeConfig) -> None:
        self.gateway = gateway
        self.config = config
        self.server: Server | None = None
        self._closing = False
        self._address: tuple[str, int] = ("", 0)
        self._page_scheme = "http"
        self._loopback = True
        self._loopback_hosts: set[str] = set()
        self._static = Path(config.static_dir).resolve() if config.static_dir else None
        self._cap = (
            config.max_connections
            if config.max_connections is not None
            else gateway.config.max_connections
        )

    @property
    def port(self) -> int:
        """The port the server listens on (useful with port 0)."""
        return self._address[1]

    @property
    def url(self) -> str:
        """The ``ws://host:port/`` URL of the server."""
        host, port = self._address
        host = f"[{host}]" if ":" in host else host
        return f"ws://{host}:{port}/"

    async def start(self, host: str, port: int, **kwargs: Any) -> None:
        """Start listening (the gateway must be started already)."""
        config = self.config
        self.server = await ws_serve(
            self._handler,
            host,
            port,
            process_request=self._process_request,
            select_subprotocol=self._select_subprotocol,
            compression="deflate" if config.compression else None,
            open_timeout=config.open_timeout,
            ping_interval=config.ping_interval,
            ping_timeout=config.ping_timeout,
            close_timeout=config.close_timeout,
            max_size=self.gateway.config.wire.max_frame_bytes,
            max_queue=config.inbound_queue,
            write_limit=config.write_limit,
            server_header=None,
            **kwargs,
        )
        host, port = self.server.sockets[0].getsockname()[:2]
        self._address = (host, port)
        self._page_scheme = "https" if kwargs.get("ssl") is not None else "http"
        self._loopback = all(
            ipaddress.ip_address(s.getsockname()[0]).is_loopback for s in self.server.sockets
        )
        self._loopback_hosts = {f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"}
        log.info("wsbus edge listening on %s", self.url)

    async def close(self) -> None:
        """Shut down gracefully.

        New upgrades get 503 at once; the gateway stops reading new work, drains queues
        for its ``drain_timeout`` and closes every connection with 1001; then the listening
        socket is closed.
        """
        if self._closing:
            return
        self._closing = True
        await self.gateway.close()
        if self.server is not None:
            self.server.close(close_connections=True)
            await self.server.wait_closed()

    async def __aenter__(self) -> EdgeServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- the handshake -------------------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        headers = request.headers
        for name in _SINGLE_HEADERS:
            if len(headers.get_all(name)) > 1:
                # Two parsers could read a repeated header two ways: refuse the ambiguity.
                return _plain(http.HTTPStatus.BAD_REQUEST, f"repeated {name} header\n")
        if "websocket" not in headers.get("Upgrade", "").lower():
            return self._http(connection, request)
        if self._closing or self.gateway.closing:
            return _plain(http.HTTPStatus.SERVICE_UNAVAILABLE, "server shutting down\n")
        if self.gateway.open_connections >= self._cap:
            return _plain(http.HTTPStatus.SERVICE_UNAVAILABLE, "server is full; retry later\n")
        if not self._origin_allowed(headers):
            log.info(
                "refused a WebSocket from %s: origin %r is not allowed",
                _peer(connection),
                headers.get("Origin"),
            )
            return _plain(http.HTTPStatus.FORBIDDEN, "origin not allowed\n")
        return None

    def _origin_allowed(self, headers: Headers) -> bool:
        origins = headers.get_all("Origin")
        if not origins:
            return self.config.allow_missing_origin
        if len(origins) > 1:
            return False
        origin = origins[0]
        if origin in self.config.allowed_origins:
            return True
        if origin == "null" or origin.startswith("file:"):
            # Sandboxed frames, file:// pages and some privacy modes send these: anyone can.
            return False
        if self.config.allow_same_origin:
            host = headers.get("Host")
            parts = urlsplit(origin)
            if host is None or parts.scheme != self._page_scheme or parts.netloc != host:
                return False
            # On a loopback address only loopback names count as "this server": a page on
            # another site that re-points its DNS name at 127.0.0.1 is not same-origin.
            return not self._loopback or host in self._loopback_hosts
        return False

    def _select_subprotocol(
        self, connection: ServerConnection, subprotocols: Sequence[Subprotocol]
    ) -> Subprotocol | None:
        offered = [p for p in subprotocols if not p.startswith(TOKEN_SUBPROTOCOL_PREFIX)]
        if not offered:
            return None
        codec = negotiate(offered)
        if codec is None:
            raise NegotiationError(
                "no supported subprotocol: offer wsbus.v1.json or wsbus.v1.msgpack"
            )
        return Subprotocol(codec.value)

    def _http(self, connection: ServerConnection, request: Request) -> Response:
        path = urlsplit(request.path).path
        if path == self.config.health_path:
            status = "closing" if self._closing else "ok"
            body = msgspec.json.encode(
                {"status": status, "connections": self.gateway.open_connections}
            )
            code = http.HTTPStatus.SERVICE_UNAVAILABLE if self._closing else http.HTTPStatus.OK
            return _response(code, body, "application/json")
        if self._static is not None:
            return self._static_file(path)
        return _plain(http.HTTPStatus.UPGRADE_REQUIRED, "this is a WebSocket endpoint\n")

    def _static_file(self, path: str) -> Response:
        assert self._static is not None
        relative = path.lstrip("/") or "index.html"
        not_found = _plain(http.HTTPStatus.NOT_FOUND, "not found\n")
        if len(relative) > 255:
            return not_found
        try:
            target = (self._static / relative).resolve()
            if target.is_dir():
                target = target / "index.html"
            # Never serve anything outside the directory, whatever the path says.
            if not target.is_relative_to(self._static) or not target.is_file():
                return not_found
            body = target.read_bytes()
        except (OSError, ValueError):
            # A name too long, a NUL byte, a file that vanished: all simply not found.
            return not_found
        content_type = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if content_type.startswith("text/") or content_type.endswith("javascript"):
            content_type += "; charset=utf-8"
        return _response(http.HTTPStatus.OK, body, content_type)

    # -- connections ---------------------------------------------------------------------

    async def _handler(self, ws: ServerConnection) -> None:
        codec = Codec(ws.subprotocol) if ws.subprotocol else Codec.JSON
        try:
            request = self._handshake_request(ws)
            await self.gateway.serve(_Connection(ws, codec, request, self.config.write_limit))
        except Exception:
            # A bug, never input: the client gets 1011 and the log says why.
            log.exception("serving %s failed", _peer(ws))
            await ws.close(1011, "internal error")

    def _handshake_request(self, ws: ServerConnection) -> HandshakeRequest:
        assert ws.request is not None
        request = ws.request
        url = urlsplit(request.path)
        headers = {name.lower(): value for name, value in request.headers.raw_items()}
        offered: list[str] = []
        for value in request.headers.get_all("Sec-WebSocket-Protocol"):
            offered.extend(p.strip() for p in value.split(",") if p.strip())
        query = dict(parse_qsl(url.query))
        return HandshakeRequest(
            path=url.path,
            query=query,
            headers=headers,
            remote=_peer(ws),
            subprotocols=tuple(offered),
            token=self._token(request.headers, offered, query),
        )

    def _token(self, headers: Headers, offered: list[str], query: dict[str, str]) -> str | None:
        authorization = headers.get("Authorization", "")
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
        for protocol in offered:
            if protocol.startswith(TOKEN_SUBPROTOCOL_PREFIX):
                return protocol[len(TOKEN_SUBPROTOCOL_PREFIX) :]
        if self.config.token_query in query:
            return query[self.config.token_query]
        cookie_header = headers.get("Cookie")
        # SimpleCookie is slow on hostile input (CVE-2024-7592): parse only when it may help.
        if cookie_header and self.config.token_cookie in cookie_header:
            cookies: SimpleCookie = SimpleCookie()
            try:
                cookies.load(cookie_header)
            except CookieError:
                return None
            morsel = cookies.get(self.config.token_cookie)
            if morsel is not None:
                return morsel.value
        return None


def _peer(connection: ServerConnection) -> str:
    address = connection.remote_address
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)


def _response(status: http.HTTPStatus, body: bytes, content_type: str) -> Response:
    headers = Headers(
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            ("X-Content-Type-Options", "nosniff"),
            ("Connection", "close"),
        ]
    )
    return Response(status.value, status.phrase, headers, body)


def _plain(status: http.HTTPStatus, text: str) -> Response:
    return _response(status, text.encode(), "text/plain; charset=utf-8")


async def serve(
    gateway: Gateway,
    host: str = "127.0.0.1",
    port: int = 8765,
    *,
    config: EdgeConfig | None = None,
    **kwargs: Any,
) -> EdgeServer:
    """Put a started gateway on a WebSocket port and return the running server.

    Args:
        gateway: a started :class:`wsbus.Gateway`.
        host: the address to listen on; loopback unless you mean otherwise.
        port: the port; 0 picks a free one (read it back from ``server.port``).
        config: edge settings; :class:`EdgeConfig` defaults when omitted.
        **kwargs: passed on to ``loop.create_server`` (``ssl=`` for TLS, ...).

    Raises:
        OSError: the port is taken or the address is not local to this machine.
    """
    server = EdgeServer(gateway, config if config is not None else EdgeConfig())
    await server.start(host, port, **kwargs)
    return server
