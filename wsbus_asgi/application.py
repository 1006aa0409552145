"""The ASGI application: a gateway's WebSocket endpoint inside any ASGI 3 server or framework.

The handshake is decided as the other edges decide it, by :class:`wsbus.http.HttpFront`
(repeated headers, absurd subprotocol offers, a shutting-down or full gateway, foreign
origins), then the codec subprotocol is negotiated (only unknown ones: 400) and the accepted
connection is handed to :meth:`wsbus.Gateway.serve`, which authenticates it. A refusal is a
real HTTP response (403, 400, 503) where the server offers the ASGI extension
``websocket.http.response`` (uvicorn does); elsewhere it is ASGI's plain refusal, which
servers answer with 403.

This module imports no server library: the application runs under whatever ASGI server runs
its host application. :mod:`wsbus_asgi.server` runs it under uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import ipaddress
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

from wsbus.edge import ConnectionClosed
from wsbus.errors import ConfigError
from wsbus.gateway import Gateway
from wsbus.hooks import HandshakeRequest
from wsbus.http import (
    RESPONSE_HEADERS,
    TOKEN_SUBPROTOCOL_PREFIX,
    HttpFront,
    OpsConfig,
    Reply,
    check_http_settings,
)
from wsbus.wire import Codec, negotiate

__all__ = ["ABORT_EXTENSION", "App", "AsgiConfig", "Receive", "Scope", "Send", "app"]

log = logging.getLogger("wsbus.asgi")

Scope = MutableMapping[str, Any]
"""An ASGI connection scope."""
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
"""An ASGI ``receive`` callable."""
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
"""An ASGI ``send`` callable."""

TOO_BIG: Final = 1009
"""The close code of a frame over ``wire.max_frame_bytes`` (SPEC section 3), as on every edge."""

ABORT_EXTENSION: Final = "wsbus.abort"
"""An ASGI scope extension: ``{"abort": callable}`` drops the connection at once. The
application calls it when a close cannot be sent in time (a peer that reads nothing);
``wsbus_asgi.server.WebSocketProtocol`` offers it. Without it such a close is left to the
server."""

_FRONTS_KEPT: Final = 16
"""Where-it-listens variants (port, TLS, loopback) whose HTTP front is kept for reuse."""


class AsgiConfig(OpsConfig, frozen=True, kw_only=True):
    """Settings of the ASGI edge: the websockets edge's (``EdgeConfig``) that apply to it.

    The first group is the application's own and holds wherever it runs. The second is the
    server's: :func:`wsbus_asgi.serve` and ``wsbus serve --edge asgi`` give them to the
    uvicorn they run; under a server of yours, set its own options (docs/asgi.md).

    Attributes:
        allowed_origins: origins (``https://app.example.com``) allowed besides the server's
            own; ``"null"`` and ``"file://"`` are refused unless listed here.
        allow_same_origin: allow pages served by this server: an Origin whose scheme is
            the request's (http for ws, https for wss) and whose host and port equal the
            request's Host; on a loopback address only 127.0.0.1, localhost and [::1] count.
        allow_missing_origin: allow clients that send no Origin header (programs).
        max_connections: refuse upgrades with HTTP 503 beyond this many connections;
            defaults to the gateway's ``max_connections``.
        max_subprotocols: subprotocol names a handshake may offer; more get HTTP 400.
        max_subprotocol_bytes: bytes of ``Sec-WebSocket-Protocol`` headers a handshake may
            send; more get HTTP 400.
        health_path: the path of the health endpoint (plain HTTP GET), below the mount.
        static_dir: a directory to serve over plain HTTP GET, or None.
        token_query: the query parameter that may carry a bearer token.
        token_cookie: the cookie that may carry a bearer token.
        ping_interval: (server) seconds between keepalive pings; None disables them.
        ping_timeout: (server) seconds to wait for a pong before closing with 1011.
        close_timeout: seconds a close may wait for room to send its frame (a peer that
            reads nothing leaves none); then the connection is dropped, where the server
            lets the application do it (``wsbus_asgi.server.WebSocketProtocol`` does).
        compression: (server) permessage-deflate; off by default, as on the websockets edge.
            (uvicorn's own default is on.)
        open_timeout: (server) seconds a request head may take to arrive, from the
            connection's opening or its previous response; then the connection is closed
            (``wsbus_asgi.server.HttpProtocol``).
        max_request_head: (server) bytes a request head may have: a longer one gets 431
            and is closed before it is parsed (``wsbus_asgi.server.HttpProtocol``; under
            uvicorn's own h11 protocol, ``h11_max_incomplete_event_size`` bounds only a head
            that has not arrived whole). The application refuses (431) a request whose
            headers are over it, or more than 128, under any server.
    """

    allowed_origins: tuple[str, ...] = ()
    allow_same_origin: bool = True
    allow_missing_origin: bool = True
    max_connections: int | None = None
    max_subprotocols: int = 16
    max_subprotocol_bytes: int = 4096
    health_path: str = "/healthz"
    static_dir: str | None = None
    token_query: str = "token"
    token_cookie: str = "wsbus_token"
    ping_interval: float | None = 20.0
    ping_timeout: float | None = 20.0
    close_timeout: float = 5.0
    compression: bool = False
    open_timeout: float = 10.0
    max_request_head: int = 16 * 1024

    def __post_init__(self) -> None:
        if self.max_subprotocols < 1 or self.max_subprotocol_bytes < 64:
            raise ConfigError("max_subprotocols must be >= 1 and max_subprotocol_bytes >= 64")
        if self.max_connections is not None and self.max_connections < 1:
            raise ConfigError("max_connections must be >= 1, or None for the gateway's")
        if self.close_timeout <= 0 or self.open_timeout <= 0:
            raise ConfigError("close_timeout and open_timeout must be > 0")
        if self.max_request_head < 4096:
            raise ConfigError("max_request_head must be >= 4096 bytes")
        if self.static_dir is not None and not Path(self.static_dir).is_dir():
            raise ConfigError(f"static_dir {self.static_dir!r} is not a directory")
        check_http_settings(self)


class _Connection:
    """One accepted ASGI WebSocket as a :class:`wsbus.ClientConnection`.

    It keeps its own closed state: ASGI servers refuse a send after the close in their own
    ways (an exception of their own), and the gateway must see :class:`ConnectionClosed`.
    """

    __slots__ = (
        "_abort",
        "_close_timeout",
        "_closed",
        "_codec",
        "_limit",
        "_receive",
        "_request",
        "_send",
        "_text",
    )

    def __init__(
        self,
        receive: Receive,
        send: Send,
        codec: Codec,
        request: HandshakeRequest,
        limit: int,
        close_timeout: float = 5.0,
        abort: Callable[[], object] | None = None,
    ) -> None:
        self._receive = receive
        self._close_timeout = close_timeout
        self._abort = abort
        self._send = send
        self._codec = codec
        self._text = codec.is_text
        self._request = request
        self._limit = limit
        self._closed: ConnectionClosed | None = None

    @property
    def codec(self) -> Codec:
        return self._codec

    @property
    def request(self) -> HandshakeRequest:
        return self._request

    async def receive(self) -> str | bytes:
        closed = self._closed
        if closed is not None:
            raise closed
        limit = self._limit
        while True:
            message = await self._receive()
            kind = message["type"]
            if kind == "websocket.receive":
                text: str | None = message.get("text")
                if text is not None:
                    size = len(text)
                    # Characters are bytes for ASCII (isascii is O(1)); else count the bytes,
                    # only for a text long enough to be over the limit.
                    if size * 4 > limit and (
                        size > limit
                        or (
                            not text.isascii()
                            and len(text.encode("utf-8", "surrogatepass")) > limit
                        )
                    ):
                        raise await self._too_big()
                    return text
                data: bytes | None = message.get("bytes")
                if data is not None:
                    if len(data) > limit:
                        raise await self._too_big()
                    return data
                # Neither: not a frame (ASGI says one of them is set). Nothing to hand on.
                continue
            if kind == "websocket.disconnect":
                if self._closed is None:
                    self._closed = ConnectionClosed(
                        int(message.get("code", 1005)), str(message.get("reason") or "")
                    )
                raise self._closed

    async def _too_big(self) -> ConnectionClosed:
        # The server read the whole frame already (its own limit is its ws_max_size): the
        # gateway never sees it, and the client gets the close every edge gives.
        await self.close(TOO_BIG, "frame too big")
        assert self._closed is not None
        return self._closed

    async def send(self, data: bytes) -> None:
        closed = self._closed
        if closed is not None:
            raise closed
        message = (
            {"type": "websocket.send", "text": data.decode()}
            if self._text
            else {"type": "websocket.send", "bytes": data}
        )
        try:
            await self._send(message)
        except Exception:
            # The server refuses a send on a connection that is gone, with an error of its
            # own; the close code reaches the reader in websocket.disconnect.
            closed = self._closed
            raise (closed or ConnectionClosed(1006, "connection lost")) from None

    async def close(self, code: int, reason: str = "") -> None:
        if self._closed is not None:
            return
        self._closed = ConnectionClosed(code, reason)
        try:
            # A peer that reads nothing leaves no room for the close frame: the server's
            # send waits. Past close_timeout the connection is dropped where it can be.
            async with asyncio.timeout(self._close_timeout):
                await self._send({"type": "websocket.close", "code": code, "reason": reason})
        except TimeoutError:
            if self._abort is not None:
                self._abort()
        except Exception:
            pass  # the server refuses a close on a connection that is gone already


class App:
    """A gateway's WebSocket endpoint as an ASGI 3 application (see :func:`app`).

    Attributes:
        gateway: the gateway it hands connections to.
        config: its settings.
    """

    def __init__(
        self, gateway: Gateway, config: AsgiConfig | None = None, *, lifespan: bool = True
    ) -> None:
        self.gateway = gateway
        self.config = config if config is not None else AsgiConfig()
        self._manages = lifespan
        self._closing = False
        self._cap = (
            self.config.max_connections
            if self.config.max_connections is not None
            else gateway.config.max_connections
        )
        self._limit = gateway.config.wire.max_frame_bytes
        self._fronts: dict[tuple[int, bool, bool], HttpFront] = {}
        self._connections: set[_Connection] = set()
        # One readiness and one metrics registry for the application, whichever front
        # (port, scheme) a request came in by.
        self._ops = HttpFront(self.config)
        self._ops.attach(gateway, "asgi")

    @property
    def connections(self) -> int:
        """WebSocket connections this application accepted that are open."""
        return len(self._connections)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection: ``websocket``, ``http`` or ``lifespan``."""
        kind = scope["type"]
        if kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "http":
            await self._http(scope, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        else:
            # The ASGI spec: an application raises for a scope type it does not know.
            raise ValueError(f"wsbus_asgi serves websocket, http and lifespan, not {kind!r}")

    @contextlib.asynccontextmanager
    async def lifespan(self, host: object = None) -> AsyncIterator[None]:
        """Start the gateway, and close it on the way out: a host application's lifespan.

        ``FastAPI(lifespan=ws.lifespan)`` or Starlette's ``lifespan=`` (they call it with
        the host application, which it ignores). Closing the gateway drains it and closes
        every connection with 1001, before the server closes what is left.
        """
        await self.gateway.start()
        try:
            yield
        finally:
            await self.close()

    async def close(self) -> None:
        """Refuse new upgrades (503) and close the gateway gracefully (1001 to each client).

        Closes the gateway whoever started it: call it when the application owns it (its
        lifespan does).
        """
        self._closing = True
        await self._ops.close()
        await self.gateway.close()

    async def close_connections(self, code: int = 1001, reason: str = "going away") -> None:
        """Refuse new upgrades (503) and close this application's connections; not the gateway.

        What the gateway had queued for them is dropped with the close, as when the
        websockets edge is closed while its gateway runs on.
        """
        self._closing = True
        await self._ops.close()
        # All at once: each close may wait up to close_timeout for a peer that reads nothing.
        async with asyncio.TaskGroup() as tasks:
            for connection in list(self._connections):
                tasks.create_task(connection.close(code, reason))

    # -- lifespan ------------------------------------------------------------------------

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            kind = message["type"]
            if kind == "lifespan.startup":
                try:
                    if self._manages:
                        await self.gateway.start()
                except Exception as exc:
                    log.exception("starting the gateway failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif kind == "lifespan.shutdown":
                try:
                    if self._manages:
                        await self.close()
                except Exception as exc:
                    log.exception("closing the gateway failed")
                    await send({"type": "lifespan.shutdown.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- plain HTTP ----------------------------------------------------------------------

    async def _http(self, scope: Scope, send: Send) -> None:
        method = scope.get("method", "GET")
        reply = _oversized(scope, self.config.max_request_head)
        if reply is not None:
            await send(
                {
                    "type": "http.response.start",
                    "status": reply.status.value,
                    "headers": _response_headers(reply),
                }
            )
            await send(
                {"type": "http.response.body", "body": b"" if method == "HEAD" else reply.body}
            )
            return
        headers = _headers(scope)
        front = self._front(scope)
        reply = front.repeated(_values(headers))
        if reply is None and method not in ("GET", "HEAD"):
            reply = Reply.text(http.HTTPStatus.METHOD_NOT_ALLOWED, "GET or HEAD only\n")
        if reply is None:
            target = _target(scope, relative=True)
            closing = self._closing or self.gateway.closing
            if front.wants_ready(target):
                # ASGI lets the answer wait for a probe round the bus.
                reply = await front.ready(
                    closing=closing, peer=_peer(scope), headers=_values(headers)
                )
            else:
                reply = front.get(
                    target,
                    closing=closing,
                    connections=self.gateway.open_connections,
                    peer=_peer(scope),
                    headers=_values(headers),
                )
        start: dict[str, Any] = {
            "type": "http.response.start",
            "status": reply.status.value,
            "headers": _response_headers(reply),
        }
        await send(start)
        body = b"" if method == "HEAD" else reply.body
        await send({"type": "http.response.body", "body": body})

    # -- WebSocket -----------------------------------------------------------------------

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "websocket.connect":
            return  # gone before the handshake (websocket.disconnect)
        oversized = _oversized(scope, self.config.max_request_head)
        if oversized is not None:
            await _refuse(scope, send, oversized)
            return
        headers = _headers(scope)
        values = _values(headers)
        peer = _peer(scope)
        front = self._front(scope)
        gateway = self.gateway
        refusal = front.repeated(values) or front.upgrade_refusal(
            values,
            closing=self._closing or gateway.closing,
            full=gateway.open_connections >= self._cap,
            peer=peer,
        )
        offered = [
            p for p in scope.get("subprotocols", ()) if not p.startswith(TOKEN_SUBPROTOCOL_PREFIX)
        ]
        codec = negotiate(offered) if offered else Codec.JSON
        if refusal is None and codec is None:
            refusal = Reply.text(
                http.HTTPStatus.BAD_REQUEST,
                "no supported subprotocol: offer wsbus.v1.json or wsbus.v1.msgpack\n",
            )
        if refusal is not None or codec is None:
            assert refusal is not None
            await _refuse(scope, send, refusal)
            return
        request = front.handshake_request(_target(scope, relative=False), headers, peer)
        await send({"type": "websocket.accept", "subprotocol": codec.value if offered else None})
        extension = (scope.get("extensions") or {}).get(ABORT_EXTENSION)
        connection = _Connection(
            receive,
            send,
            codec,
            request,
            self._limit,
            self.config.close_timeout,
            extension.get("abort") if isinstance(extension, dict) else None,
        )
        self._connections.add(connection)
        try:
            await self._serve(connection)
        except Exception:
            # A bug, never input: the client gets 1011 and the log says why.
            log.exception("serving %s failed", peer)
            await connection.close(1011, "internal error")
        finally:
            self._connections.discard(connection)

    async def _serve(self, connection: _Connection) -> None:
        """Run an accepted connection until it closes (tests hand it elsewhere)."""
        await self.gateway.serve(connection)

    def _front(self, scope: Scope) -> HttpFront:
        """The HTTP front for where this request came in (same-origin checks need it)."""
        secure = scope.get("scheme") in ("https", "wss")
        server = scope.get("server")
        port, loopback = 0, False
        if server and server[1] is not None:
            port = int(server[1])
            try:
                loopback = ipaddress.ip_address(server[0]).is_loopback
            except ValueError:
                loopback = False  # a name or a Unix socket: any Host counts
        key = (port, secure, loopback)
        front = self._fronts.get(key)
        if front is None:
            front = HttpFront(self.config)
            front.listening(port, secure=secure, loopback=loopback)
            front.readiness, front.metrics = self._ops.readiness, self._ops.metrics
            if len(self._fronts) < _FRONTS_KEPT:
                self._fronts[key] = front
        return front


def app(gateway: Gateway, config: AsgiConfig | None = None, *, lifespan: bool = True) -> App:
    """Return ``gateway``'s WebSocket endpoint as an ASGI 3 application.

    Mount it in Starlette or FastAPI (``app.mount("/ws", ws)``, or a ``WebSocketRoute``),
    or run it alone (``uvicorn module:ws``). A WebSocket upgrade is checked and handed to
    the gateway; a plain GET gets the health endpoint (``/healthz`` below the mount), a
    static file (``static_dir``) or 426.

    Args:
        gateway: the gateway to serve.
        config: the edge's settings; :class:`AsgiConfig` defaults when omitted.
        lifespan: when the application gets ASGI lifespan events (run alone), start the
            gateway at startup and close it at shutdown; False: they leave the gateway
            alone (its caller starts and closes it). Mounted, an application gets no
            lifespan events: use :meth:`App.lifespan` in the host's (docs/asgi.md).
    """
    return App(gateway, config, lifespan=lifespan)


def _headers(scope: Scope) -> list[tuple[str, str]]:
    # ASGI gives names lower-cased, both as bytes; latin-1 maps every byte to a character.
    return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in scope["headers"]]


def _values(headers: list[tuple[str, str]]) -> Callable[[str], Sequence[str]]:
    # One pass over the headers, however many names are looked up afterwards.
    table: dict[str, list[str]] = {}
    for key, value in headers:
        table.setdefault(key, []).append(value)

    def values(name: str) -> Sequence[str]:
        return table.get(name.lower(), ())

    return values


MAX_HEADERS: Final = 128
"""Headers a request may have, as websockets' parser (the ``websockets`` edge) allows."""


def _oversized(scope: Scope, limit: int) -> Reply | None:
    # 431 for more than MAX_HEADERS headers, or headers over ``limit`` bytes: what a server
    # that does not bound the head itself let through, refused before any is decoded.
    headers = scope.get("headers") or ()
    if len(headers) > MAX_HEADERS or sum(len(n) + len(v) + 4 for n, v in headers) > limit:
        return Reply.text(
            http.HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large\n"
        )
    return None


def _target(scope: Scope, *, relative: bool) -> str:
    """The request's target, percent-encoded, as its request line has it.

    ``relative``: below the mount point (``root_path``), for the application's own routes
    (health, static files); else the whole path, for the authentication hooks.
    """
    root: str = scope.get("root_path", "") if relative else ""
    raw: bytes | None = scope.get("raw_path")
    if raw is not None:
        # As sent: the static files' rules refuse what a client did not percent-encode.
        path = raw.decode("latin-1")
        if root:
            # The mount's prefix is as many segments of the raw path as root_path has.
            skip = root.rstrip("/").count("/")
            rest = path.split("/", skip + 1)
            path = "/" + rest[skip + 1] if len(rest) > skip + 1 else "/"
    else:
        path = scope.get("path", "/")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        path = quote(path, safe="/:@!$&'()*+,;=~")
    query: bytes = scope.get("query_string", b"")
    return f"{path}?{query.decode('latin-1')}" if query else path


def _peer(scope: Scope) -> str:
    client = scope.get("client")
    if client:
        return f"{client[0]}:{client[1]}"
    return "unknown"


def _response_headers(reply: Reply) -> list[tuple[bytes, bytes]]:
    # Connection: close, as on the other edges: one request per connection to this front.
    return [
        (b"content-type", reply.content_type.encode("latin-1")),
        (b"content-length", str(len(reply.body)).encode()),
        *((name.lower().encode(), value.encode()) for name, value in RESPONSE_HEADERS),
        (b"connection", b"close"),
    ]


async def _refuse(scope: Scope, send: Send, reply: Reply) -> None:
    """Refuse an upgrade: with ``reply`` where the server can send it, else with 403."""
    if "websocket.http.response" in (scope.get("extensions") or {}):
        await send(
            {
                "type": "websocket.http.response.start",
                "status": reply.status.value,
                "headers": _response_headers(reply),
            }
        )
        await send({"type": "websocket.http.response.body", "body": reply.body})
    else:
        await send({"type": "websocket.close", "code": 1008})
