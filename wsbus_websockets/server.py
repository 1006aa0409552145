"""The WebSocket edge: a gateway on a real port, on the ``websockets`` asyncio API.

Before the upgrade it answers plain HTTP (a health endpoint, an optional static directory),
refuses shutting-down or full servers with 503 and foreign origins with 403, and negotiates
the codec subprotocol (an offer of only unknown subprotocols gets 400). After the upgrade
each connection is handed to :meth:`wsbus.Gateway.serve`, which authenticates it, and reads
and writes it until it closes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import http
import ipaddress
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

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
from wsbus.http import (
    RESPONSE_HEADERS,
    TOKEN_SUBPROTOCOL_PREFIX,
    HttpFront,
    OpsConfig,
    Reply,
    check_http_settings,
)
from wsbus.wire import Codec, negotiate

from ._wsconn import (
    ACCEPTS_PER_PASS,
    EdgeConnection,
    HandshakeGuard,
    RateLimitedLog,
    connection_factory,
    install_doorman,
    listen_backlog,
)

__all__ = ["TOKEN_SUBPROTOCOL_PREFIX", "EdgeConfig", "EdgeServer", "serve"]

log = logging.getLogger("wsbus.websockets")

_OUT_OF_RESOURCES: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
"""What a failed accept means when the process or the system is out of something."""

ACCEPT_LOG_INTERVAL: Final = 10.0
"""Seconds between two log lines about failed accepts, evicted handshakes or socket errors."""

_TOKEN_HEADERS: Final = ("Connection", "Sec-WebSocket-Extensions")
"""Headers websockets parses token by token after ``process_request``, concatenating one
list per header line (quadratic in the lines): at most ``_TOKEN_HEADER_LINES`` lines and
``_TOKEN_HEADER_BYTES`` bytes each. Sec-WebSocket-Protocol has its own, configurable, caps
and Upgrade may not be repeated."""

_TOKEN_HEADER_LINES: Final = 2
_TOKEN_HEADER_BYTES: Final = 1024


class EdgeConfig(OpsConfig, frozen=True, kw_only=True):
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
            The gateway takes what is buffered a read at a time, so a connection whose
            frames wait for the bus holds up to twice this many.
        write_limit: bytes in a connection's write buffer before a send waits.
        compression: permessage-deflate; off by default (it costs memory per connection
            and opens compression-oracle attacks).
        open_timeout: seconds for the opening handshake (TCP accept to the response).
        max_handshakes: connections that have not sent their whole request yet, at most; a
            new one over the cap drops the oldest half-sent one (else the oldest silent
            one). None (the default): a
            quarter of the process's open-file limit, at least 128 (a burst of accepts
            is up to 100 connections) and at most 1024.
        max_subprotocols: subprotocol names a handshake may offer; more get HTTP 400.
        max_subprotocol_bytes: bytes of ``Sec-WebSocket-Protocol`` headers a handshake
            may send; more get HTTP 400.
        max_request_head: bytes of a request's head (request line and headers) at most,
            counted as they are read; a longer head gets HTTP 431 before it is parsed.
            16 KiB by default: browsers send 1-4 KiB, cookies included.
        ping_interval: seconds between keepalive pings; None disables them.
        ping_timeout: seconds to wait for a pong before closing with 1011.
        close_timeout: seconds to wait for the closing handshake.
        health_path: the path of the health endpoint (plain HTTP GET): cheap, says the
            process is up and not shutting down.
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
    max_handshakes: int | None = None
    max_subprotocols: int = 16
    max_subprotocol_bytes: int = 4096
    max_request_head: int = 16 * 1024
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
        if self.max_handshakes is not None and self.max_handshakes < 1:
            raise ConfigError("max_handshakes must be >= 1, or None for the default")
        if self.max_subprotocols < 1 or self.max_subprotocol_bytes < 64:
            raise ConfigError("max_subprotocols must be >= 1 and max_subprotocol_bytes >= 64")
        if self.open_timeout <= 0:
            raise ConfigError("open_timeout must be > 0")
        if self.max_request_head < 4096:
            raise ConfigError("max_request_head must be >= 4096 bytes")
        if self.static_dir is not None and not Path(self.static_dir).is_dir():
            raise ConfigError(f"static_dir {self.static_dir!r} is not a directory")
        check_http_settings(self)


class _Connection:
    """A websockets connection as a :class:`wsbus.ClientConnection`."""

    __slots__ = ("_close_timeout", "_codec", "_limit", "_request", "_text", "_ws", "raw_receive")

    def __init__(
        self,
        ws: EdgeConnection,
        codec: Codec,
        request: HandshakeRequest,
        write_limit: int = 32 * 1024,
        close_timeout: float = 10.0,
    ) -> None:
        self._ws = ws
        self._close_timeout = close_timeout
        self._codec = codec
        self._text = codec.is_text
        self._request = request
        self._limit = write_limit
        # websockets' own recv (cheaper for a frame already read: EdgeConnection.receive),
        # for the gateway's reader; see closed_error.
        self.raw_receive = ws.receive

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

    async def receive_batch(self) -> list[str | bytes]:
        """Every whole frame read and not taken yet, or the next frame (see ReceivesBatch)."""
        ws = self._ws
        batch = ws.take_frames()
        if batch:
            return batch
        try:
            return [await ws.recv()]
        except WsConnectionClosed as exc:
            raise _closed(exc) from None

    @staticmethod
    def closed_error(exc: BaseException) -> ConnectionClosed | None:
        """Translate an exception from ``raw_receive``; None when it is not a close."""
        return _closed(exc) if isinstance(exc, WsConnectionClosed) else None

    async def send(self, data: bytes) -> None:
        # Written only under the write limit, as send_nowait does: what waits beyond it
        # stays in the gateway's queue, so a close frame is never far behind.
        ws = self._ws
        while not ws.send_nowait(data, self._text, self._limit):
            if ws.protocol.state is not State.OPEN:
                try:
                    await ws.send(data, text=self._text)  # raises websockets' close
                except WsConnectionClosed as exc:
                    raise _closed(exc) from None
                raise ConnectionClosed(1006, "connection lost")  # pragma: no cover
            await ws.wait_writable(self._limit)

    def send_nowait(self, data: bytes) -> bool:
        return self._ws.send_nowait(data, self._text, self._limit)

    def unsent(self) -> int:
        """Frames given to send or send_nowait that have not reached the socket."""
        return self._ws.unsent()

    async def close(self, code: int, reason: str = "") -> None:
        ws = self._ws
        # websockets waits for a full write buffer to drain before its close timeout
        # starts, so a peer that reads nothing would hold the close until a keepalive
        # ping gives up. The close timeout bounds the whole close here; past it the
        # connection is dropped, and what the transport held is counted discarded.
        try:
            async with asyncio.timeout(self._close_timeout):
                await ws.close(code, reason)
        except TimeoutError:
            ws.transport.abort()
            await ws.wait_closed()


def _closed(exc: WsConnectionClosed) -> ConnectionClosed:
    """Translate websockets' exception, keeping the code that ended the connection."""
    frame = exc.rcvd if exc.rcvd_then_sent or exc.sent is None else exc.sent
    if frame is None:
        return ConnectionClosed(1006, "connection lost")
    return ConnectionClosed(frame.code, frame.reason)


class EdgeServer:
    """A running WebSocket edge. Close it with :meth:`close` (or use ``async with``).

    The edge owns its listening socket and the connections it accepted; it does not own the
    gateway, which whoever started it closes (see :func:`serve`).

    Attributes:
        gateway: the gateway it serves, started and closed by its caller.
        config: its settings.
        server: the underlying ``websockets`` server.
    """

    def __init__(self, gateway: Gateway, config: EdgeConfig) -> None:
        self.gateway = gateway
        self.config = config
        self.server: Server | None = None
        self._closing = False
        self._address: tuple[str, int] = ("", 0)
        self._front = HttpFront(config)
        self._front.attach(gateway, "websockets")
        self._cap = (
            config.max_connections
            if config.max_connections is not None
            else gateway.config.max_connections
        )
        self._report = RateLimitedLog(log, ACCEPT_LOG_INTERVAL)
        self.handshakes: HandshakeGuard | None = None
        """Counts connections in the opening handshake (once started)."""
        self._previous_handler: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

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
        limit = raise_file_limit()
        cap = config.max_handshakes
        if cap is None:
            cap = max(128, min(1024, limit // 4)) if limit > 0 else 1024
        self.handshakes = HandshakeGuard(cap, self._report, config.open_timeout)
        # What any write of the gateway's can leave in the write buffer (a frame is written
        # while it holds at most write_limit, and no frame is over outbound_bytes), with
        # room for a ping and a close frame: more is replies the peer never reads.
        write_bound = config.write_limit + self.gateway.config.outbound_bytes + 1024
        self._watch_accept_errors()
        backlog = int(kwargs.pop("backlog", 100))
        kwargs.pop("start_serving", None)
        self.server = await ws_serve(
            self._handler,
            host,
            port,
            create_connection=connection_factory(
                self.handshakes, write_bound, config.max_request_head
            ),
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
            # The accept loop takes this many per pass; the kernel's queue is set after.
            backlog=min(backlog, ACCEPTS_PER_PASS),
            start_serving=False,
            **kwargs,
        )
        # Before the first accept: a doorman holds each connection until its request's head
        # is in, so peers that never send one cost no websockets objects.
        if not install_doorman(self.server.server, self.handshakes, config.max_request_head):
            # uvloop keeps its server's protocol factory out of reach: websockets' machinery
            # is then built at each accept, and accepts per pass are not bounded.
            log.warning(
                "the websockets edge runs without its doorman on this event loop (%s): a "
                "flood of half-done handshakes costs more memory and loop time per peer "
                "than on asyncio's loop; for a gateway open to the internet use --loop "
                "asyncio (the default) or --edge picows (docs/performance.md)",
                type(asyncio.get_running_loop()).__module__.split(".")[0],
            )
        await self.server.start_serving()
        if backlog > ACCEPTS_PER_PASS:
            listen_backlog(self.server.server, backlog)
        host, port = self.server.sockets[0].getsockname()[:2]
        self._address = (host, port)
        self._front.listening(
            port,
            secure=kwargs.get("ssl") is not None,
            loopback=all(
                ipaddress.ip_address(s.getsockname()[0]).is_loopback for s in self.server.sockets
            ),
        )
        log.info(
            "wsbus edge listening on %s (at most %d connections in the opening handshake)",
            self.url,
            cap,
        )

    async def close(self) -> None:
        """Stop this edge: close its listening socket and its connections. Idempotent.

        New upgrades get 503 at once; then the listening socket closes and every connection
        this edge accepted is closed with 1001 (going away), which ends its
        :meth:`~wsbus.Gateway.serve`: what the gateway still had queued for it is dropped
        with the close. The gateway keeps running, with its other connections (another
        edge's, in-memory ones): close it yourself, as you started it. For a graceful
        shutdown of the whole server, close the gateway first (it refuses new work, drains
        its queues, closes every connection with 1001; this edge answers 503 meanwhile),
        then the edge.
        """
        if self._closing:
            return
        self._closing = True
        if self.server is not None:
            self.server.close(close_connections=True)
            if self.handshakes is not None:
                # Doormen are not websockets' connections: it would not close them.
                self.handshakes.close()
            await self.server.wait_closed()
        await self._front.close()
        self._unwatch_accept_errors()

    def _watch_accept_errors(self) -> None:
        # asyncio reports a failed accept (EMFILE, ENFILE, ENOBUFS, ENOMEM) and errors on
        # a connection's socket through the loop's exception handler, with a traceback,
        # every time. Under a connection flood that is thousands of lines: say it once per
        # interval instead, and pass everything else on unchanged.
        loop = self._loop = asyncio.get_running_loop()
        self._previous_handler = loop.get_exception_handler()
        loop.set_exception_handler(self._loop_exception)

    def _unwatch_accept_errors(self) -> None:
        loop = self._loop
        if loop is not None and loop.get_exception_handler() == self._loop_exception:
            loop.set_exception_handler(self._previous_handler)
        self._loop = None

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        message = str(context.get("message", ""))
        if (
            isinstance(exc, OSError)
            and exc.errno in _OUT_OF_RESOURCES
            and "socket" in context
            and "transport" not in context
        ):
            # The listening socket could not accept: asyncio retries in a second.
            self._report.warning(
                "accept",
                "cannot accept new connections: %s. Raise the open-file limit (ulimit -n) "
                "or lower max_connections; asyncio retries every second",
                exc,
            )
            return
        if isinstance(exc, OSError) and "transport" in context:
            # A socket error on one connection (reset, broken pipe, EMFILE on a
            # socket call): the client's network, not a bug.
            self._report.warning("socket", "%s: %s", message or "socket error", exc)
            return
        if self._previous_handler is not None:
            self._previous_handler(loop, context)
        else:
            loop.default_exception_handler(context)

    async def __aenter__(self) -> EdgeServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- the handshake -------------------------------------------------------------------

    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        try:
            response = self._check_request(connection, request)
            if response is _READINESS:
                # Readiness waits for a probe round the bus (websockets lets this hook wait).
                reply = await self._front.ready(
                    closing=self._closing or self.gateway.closing,
                    peer=_peer(connection),
                    headers=request.headers.get_all,
                )
                response = _response(reply)
                if getattr(connection, "head_request", False):
                    response = dataclasses.replace(response, body=b"")
            return response
        except Exception:
            # A bug, never input: the client gets 500 and the log says why.
            log.exception("handling the request from %s failed", _peer(connection))
            return _plain(http.HTTPStatus.INTERNAL_SERVER_ERROR, "internal error\n")

    def _check_request(self, connection: ServerConnection, request: Request) -> Response | None:
        headers = request.headers
        front = self._front
        refusal = front.repeated(headers.get_all)
        if refusal is not None:
            return _response(refusal)
        for name in _TOKEN_HEADERS:
            # Checked on every request, upgrade or not, before websockets parses any token.
            values = headers.get_all(name)
            if len(values) > _TOKEN_HEADER_LINES or (
                sum(len(value) for value in values) > _TOKEN_HEADER_BYTES
            ):
                return _plain(
                    http.HTTPStatus.BAD_REQUEST,
                    f"{name} headers too long: at most {_TOKEN_HEADER_LINES} lines and "
                    f"{_TOKEN_HEADER_BYTES} bytes\n",
                )
        head = getattr(connection, "head_request", False)
        if head or "websocket" not in headers.get("Upgrade", "").lower():
            if front.wants_ready(request.path):
                return _READINESS
            response = _response(
                front.get(
                    request.path,
                    closing=self._closing or self.gateway.closing,
                    connections=self.gateway.open_connections,
                    peer=_peer(connection),
                    headers=headers.get_all,
                )
            )
            if head:
                # The same status and headers as GET, Content-Length included, no body.
                response = dataclasses.replace(response, body=b"")
            return response
        # websockets parses Sec-WebSocket-Protocol after this hook, at a cost that grows
        # faster than the header: the front refuses an absurd offer before that.
        refusal = front.upgrade_refusal(
            headers.get_all,
            closing=self._closing or self.gateway.closing,
            full=self.gateway.open_connections >= self._cap,
            peer=_peer(connection),
        )
        return None if refusal is None else _response(refusal)

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

    # -- connections ---------------------------------------------------------------------

    async def _handler(self, ws: ServerConnection) -> None:
        assert isinstance(ws, EdgeConnection)
        codec = Codec(ws.subprotocol) if ws.subprotocol else Codec.JSON
        try:
            request = self._handshake_request(ws)
            connection = _Connection(
                ws, codec, request, self.config.write_limit, self.config.close_timeout
            )
            await self.gateway.serve(connection)
        except Exception:
            # A bug, never input: the client gets 1011 and the log says why.
            log.exception("serving %s failed", _peer(ws))
            await ws.close(1011, "internal error")

    def _handshake_request(self, ws: ServerConnection) -> HandshakeRequest:
        assert ws.request is not None
        request = ws.request
        return self._front.handshake_request(request.path, request.headers.raw_items(), _peer(ws))


_FILE_LIMIT_RAISED = False


def raise_file_limit() -> int:
    """Raise the soft open-file limit to the hard one (once per process); return it.

    Every connection is a file descriptor; the common soft limit of 1024 is reached long
    before ``max_connections``. Returns 0 where the limit cannot be read (not POSIX).
    """
    global _FILE_LIMIT_RAISED
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target and not _FILE_LIMIT_RAISED:
        _FILE_LIMIT_RAISED = True
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning(
                "could not raise the open-file limit from %d to %d (%s); at most about "
                "%d connections can be open",
                soft,
                target,
                exc,
                soft,
            )
        else:
            log.info("raised the open-file limit (RLIMIT_NOFILE) from %d to %d", soft, target)
            soft = target
    return int(soft) if soft != resource.RLIM_INFINITY else 1 << 20


def _peer(connection: ServerConnection) -> str:
    """The client's address, ``host:port``."""
    address = connection.remote_address
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)


_READINESS: Final = Response(200, "OK", Headers())
"""What the request check returns for ``/readyz``: answered after a probe, not at once."""


def _response(reply: Reply) -> Response:
    """The front's reply as websockets' response."""
    status, body = reply.status, reply.body
    headers = Headers(
        [
            ("Content-Type", reply.content_type),
            ("Content-Length", str(len(body))),
            *RESPONSE_HEADERS,
            ("Connection", "close"),
        ]
    )
    return Response(status.value, status.phrase, headers, body)


def _plain(status: http.HTTPStatus, text: str) -> Response:
    return _response(Reply.text(status, text))


async def serve(
    gateway: Gateway,
    host: str = "127.0.0.1",
    port: int = 8765,
    *,
    config: EdgeConfig | None = None,
    **kwargs: Any,
) -> EdgeServer:
    """Put a started gateway on a WebSocket port and return the running server.

    Whoever starts a thing closes it: ``server.close()`` closes the port and the
    connections it accepted, never the gateway; close the gateway, which you started, after
    (or before, for a graceful drain)::

        gateway = Gateway(bus)
        await gateway.start()
        server = await serve(gateway, "127.0.0.1", 8765)
        try:
            await stop.wait()
        finally:
            await gateway.close()  # drains, closes every connection with 1001
            await server.close()  # the listening socket

    Args:
        gateway: a started :class:`wsbus.Gateway`; it stays the caller's to close.
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
