"""The ASGI edge on a port of its own: :class:`App` under uvicorn, on the running loop.

What ``wsbus serve --edge asgi`` runs, and what the tests run: uvicorn's server, started and
stopped from the caller's event loop (no signal handlers of its own, no logging setup), with
the edge's settings as uvicorn's options. Under a uvicorn of yours (``uvicorn module:app``),
set the same options yourself (docs/asgi.md).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from wsbus.gateway import Gateway

from .application import ABORT_EXTENSION, App, AsgiConfig, Receive, Scope, Send

__all__ = ["AsgiServer", "HttpProtocol", "WebSocketProtocol", "serve", "uvicorn_options"]

log = logging.getLogger("wsbus.asgi")

WRITE_HIGH_WATER = 64 * 1024
"""asyncio's default high-water mark of a transport's write buffer (uvicorn keeps it)."""


class WebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's ``websockets-sansio`` protocol, with what a gateway open to hostile peers needs.

    Run your own uvicorn with it: ``uvicorn --ws wsbus_asgi.server:WebSocketProtocol``
    (:func:`serve` does). Besides uvicorn's behaviour:

    - A peer that reads nothing cannot hold its socket: a close whose frame cannot be
      written, or whose answer does not come, within ``close_timeout`` seconds ends in an
      abort (uvicorn's own close waits for the write buffer to drain, which such a peer
      never lets happen). The application reaches the abort through the ASGI extension
      ``wsbus.abort`` of the scope.
    - A keepalive timeout reaches the application as a close with 1011, the code the client
      gets (uvicorn says 1005).
    - An upgrade refused with an HTTP response (ASGI's ``websocket.http.response``) is not
      logged as an error: uvicorn 0.54 and before never mark that handshake complete (uvicorn
      pull request 3138).
    - An upgrade whose head websockets refuses (a header line over 8 KiB, more than 128
      headers) gets websockets' answer (431) and its socket is closed: uvicorn writes
      neither, and would hold the socket for as long as the peer keeps it.
    - A peer that sends but does not read cannot fill the server's memory with replies
      (uvicorn writes a pong for every ping, whatever its write buffer holds): reading stops
      while the write buffer is over its high-water mark, and a read whose replies leave
      more than ``max_write_buffer`` bytes in it drops the connection, as the ``websockets``
      edge does.

    Attributes:
        close_timeout: seconds before a close that is not done becomes an abort.
        max_write_buffer: bytes the write buffer may hold after a read; more is replies
            the peer does not read, and drops it. :func:`uvicorn_options` sets it from the
            gateway's ``outbound_bytes``.
    """

    close_timeout: float = 5.0
    max_write_buffer: int = WRITE_HIGH_WATER + 1024 * 1024 + 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # uvicorn's __init__ sets its own close_timeout (10 s) on the instance, which would
        # hide the class's (the edge's setting).
        self.close_timeout = type(self).close_timeout

    def handle_connect(self, event: Any) -> None:
        """Parse the upgrade as uvicorn does; give the application the abort extension."""
        super().handle_connect(event)
        if self.response.status_code == 101:
            self.scope["extensions"][ABORT_EXTENSION] = {"abort": self.transport.abort}

    async def send(self, message: Any) -> None:
        """Send as uvicorn does; then bound a close, and complete a refused handshake."""
        await super().send(message)
        kind = message["type"]
        if kind == "websocket.close":
            timer = self.close_timer
            if timer is not None:
                # uvicorn's timer closes the transport, which waits for its buffer to drain.
                timer.cancel()
                self.close_timer = self.loop.call_later(self.close_timeout, self.transport.abort)
        elif kind == "websocket.http.response.body" and not message.get("more_body"):
            self.handshake_complete = True

    def data_received(self, data: bytes) -> None:
        """Take the bytes as uvicorn does; answer a refused head; drop a non-reading peer."""
        super().data_received(data)
        transport = self.transport
        if not self.handshake_initiated and self.conn.handshake_exc is not None:
            # websockets refused the head (a header line over 8 KiB, more than 128 headers,
            # a bad request) and queued its answer (431, 400) without an event: uvicorn
            # would neither write it nor close the socket. Before websockets 17 it queues
            # no answer, only the end of the stream: then the answer is ours (what uvicorn's
            # parser let through and websockets' did not is a head over its limits).
            answer = b"".join(self.conn.data_to_send())
            transport.write(answer or _UPGRADE_HEAD_REFUSED)
            transport.close()
            self.close_timer = self.loop.call_later(self.close_timeout, transport.abort)
            return
        if self.handshake_complete and not transport.is_closing():
            unread = transport.get_write_buffer_size()
            if unread > self.max_write_buffer:
                # What the peer sent made uvicorn write replies (pongs) past what any write
                # of the gateway's leaves there: it sends and does not read.
                log.info(
                    "dropping %s: it sends pings but does not read the pongs "
                    "(%d bytes unread, bound %d)",
                    _peer(self.client),
                    unread,
                    self.max_write_buffer,
                )
                if not self.close_sent:
                    # The application learns why, as on the websockets edge (1008).
                    self.queue.put_nowait(
                        {"type": "websocket.disconnect", "code": 1008, "reason": "not reading"}
                    )
                transport.abort()

    def pause_writing(self) -> None:
        """The write buffer is full: stop reading too (pings would add pongs to it)."""
        super().pause_writing()
        if not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        """The write buffer drained: read again, unless a message waits for the app."""
        super().resume_writing()
        if not self.read_paused and not self.transport.is_closing():
            self.transport.resume_reading()

    async def receive(self) -> Any:
        """The next message, as uvicorn's ``receive``; reading resumes only if writes may."""
        message = await self.queue.get()
        if self.read_paused and self.queue.empty():
            self.read_paused = False
            if self.writable.is_set() and not self.transport.is_closing():
                self.transport.resume_reading()
        return message

    def keepalive_timeout(self) -> None:
        """Close for a missing pong as uvicorn does, telling the application 1011 first."""
        if not self.close_sent and not self.transport.is_closing():
            self.queue.put_nowait(
                {"type": "websocket.disconnect", "code": 1011, "reason": "keepalive ping timeout"}
            )
            self.loop.call_later(self.close_timeout, self.transport.abort)
        super().keepalive_timeout()


_HEAD_END = b"\r\n\r\n"

_UPGRADE_HEAD_REFUSED_TEXT = (
    b"request head refused: at most 128 headers, each line at most 8 KiB (websockets' limits)\n"
)
_UPGRADE_HEAD_REFUSED = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_UPGRADE_HEAD_REFUSED_TEXT), _UPGRADE_HEAD_REFUSED_TEXT)
)

_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\nConnection: close\r\n"
    b"Content-Length: 23\r\n\r\nrequest head too large\n"
)


class HttpProtocol(H11Protocol):
    """uvicorn's ``h11`` protocol, with the bound on a request head it lacks.

    Run your own uvicorn with it: ``uvicorn --http wsbus_asgi.server:HttpProtocol``
    (:func:`serve` does). h11's ``max_incomplete_event_size`` only bounds a head that has
    not arrived whole: a head of 60 KiB in one read is parsed, header by header, on the
    event loop. Here a head is counted as its bytes arrive, before h11 parses them: over
    ``max_request_head`` bytes, it gets 431 and the connection is closed.

    A connection whose request head has not arrived whole within ``open_timeout`` seconds
    of its opening (or of the previous response, on a kept-alive connection) is closed:
    uvicorn has no such deadline, and an idle or slowloris socket would stay open for as
    long as its peer likes (any byte restarts uvicorn's keep-alive timer).

    Attributes:
        max_request_head: bytes a request head may have, up to and with its empty line.
        open_timeout: seconds a request head may take to arrive.
    """

    max_request_head: int = 16 * 1024
    open_timeout: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Start as uvicorn does; wait for a request head, for ``open_timeout`` at most."""
        super().connection_made(transport)
        self._head_bytes: int | None = 0
        self._head_tail = b""
        self._head_timer: asyncio.TimerHandle | None = None
        self._wait_for_head()

    def connection_lost(self, exc: Exception | None) -> None:
        """End as uvicorn does; no head is awaited any more."""
        self._head_arrived()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Count the head's bytes before uvicorn parses them; refuse an oversized head."""
        if self._head_bytes is None:
            super().data_received(data)
            return
        # The end of the head may straddle two reads: look at the last 3 bytes before too.
        tail = self._head_tail
        end = (tail + data[: len(_HEAD_END) - 1] if tail else b"").find(_HEAD_END)
        if end >= 0:
            size = end + len(_HEAD_END) - len(tail)
        else:
            end = data.find(_HEAD_END)
            size = end + len(_HEAD_END) if end >= 0 else len(data)
        self._head_bytes += size
        if self._head_bytes > self.max_request_head:
            self._head_arrived()
            self._refuse_head()
            return
        if end >= 0:
            # The head is whole: the body is not a head's to count, nor to time.
            self._head_arrived()
        else:
            self._head_tail = (tail + data)[-(len(_HEAD_END) - 1) :]
        super().data_received(data)

    def on_response_complete(self) -> None:
        """Finish as uvicorn does; a kept-alive connection's next head is counted again."""
        super().on_response_complete()
        if not self.transport.is_closing():
            self._wait_for_head()

    def _wait_for_head(self) -> None:
        self._head_bytes = 0
        self._head_tail = b""
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.open_timeout, self._head_late)

    def _head_arrived(self) -> None:
        self._head_bytes = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        transport = self.transport
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # A pipelined request, read from h11's buffer when the previous response
            # completed, is being answered: its head did arrive.
            return
        if not transport.is_closing():
            log.debug(
                "closing the connection of %s: no request head within %s s",
                _peer(self.client),
                self.open_timeout,
            )
            transport.close()

    def _refuse_head(self) -> None:
        transport = self.transport
        self.data_received = _ignore  # type: ignore[method-assign]
        if not transport.is_closing():
            transport.write(_TOO_LARGE)
            transport.close()


def _ignore(data: bytes) -> None:
    """Bytes after a refused head: not read."""


def uvicorn_options(gateway: Gateway, config: AsgiConfig) -> dict[str, Any]:
    """The uvicorn options (``uvicorn.Config`` keywords) that carry the edge's limits.

    Use them when you run uvicorn yourself: ``uvicorn.Config(app, **uvicorn_options(...))``.
    ``ws_max_size`` is the gateway's ``wire.max_frame_bytes``, so uvicorn refuses a larger
    frame (1009) before it has buffered it.
    """
    return {
        # A protocol class of this edge's close_timeout.
        "ws": type(
            "WebSocketProtocol",
            (WebSocketProtocol,),
            {
                "close_timeout": config.close_timeout,
                # A frame of the gateway's is written while the buffer is under the
                # high-water mark and is at most outbound_bytes; 1 KiB for a ping and a close.
                "max_write_buffer": WRITE_HIGH_WATER + gateway.config.outbound_bytes + 1024,
            },
        ),
        "ws_max_size": gateway.config.wire.max_frame_bytes,
        "ws_ping_interval": config.ping_interval,
        "ws_ping_timeout": config.ping_timeout,
        "ws_per_message_deflate": config.compression,
        # A protocol class of this edge's max_request_head and open_timeout.
        "http": type(
            "HttpProtocol",
            (HttpProtocol,),
            {"max_request_head": config.max_request_head, "open_timeout": config.open_timeout},
        ),
        "h11_max_incomplete_event_size": config.max_request_head,
        "timeout_graceful_shutdown": config.close_timeout,
        "server_header": False,
    }


class AsgiServer:
    """A running ASGI edge: uvicorn serving an :class:`App` of a gateway. See :func:`serve`.

    Args:
        gateway: the gateway it serves, started and closed by its caller.
        config: its settings.
        app: the gateway's application; by default one of ``gateway`` that leaves the
            gateway alone at lifespan events.
        asgi: what uvicorn runs, when not ``app`` itself: a host application in which
            ``app`` is mounted.

    Attributes:
        gateway: the gateway it serves.
        config: its settings.
        app: the gateway's application.
    """

    def __init__(
        self,
        gateway: Gateway,
        config: AsgiConfig,
        app: App | None = None,
        asgi: Callable[[Scope, Receive, Send], Awaitable[None]] | None = None,
    ) -> None:
        self.gateway = gateway
        self.config = config
        self.app = app if app is not None else App(gateway, config, lifespan=False)
        self._asgi = asgi if asgi is not None else self.app
        self._server: uvicorn.Server | None = None
        self._socket: socket.socket | None = None
        self._ticks: asyncio.Task[None] | None = None
        self._address: tuple[str, int] = ("", 0)
        self._closed = False

    @property
    def _closing(self) -> bool:
        """Whether its close has begun (then upgrades get 503 and health says closing)."""
        return self.app._closing

    @_closing.setter
    def _closing(self, closing: bool) -> None:
        self.app._closing = closing

    @property
    def port(self) -> int:
        """The port it listens on (useful with port 0)."""
        return self._address[1]

    @property
    def url(self) -> str:
        """The ``ws://host:port/`` URL of the server."""
        host, port = self._address
        host = f"[{host}]" if ":" in host else host
        return f"ws://{host}:{port}/"

    async def start(self, host: str, port: int, **kwargs: Any) -> None:
        """Listen on ``host:port`` (the gateway must be started already).

        Args:
            host: the address to listen on.
            port: the port; 0 picks a free one.
            **kwargs: more ``uvicorn.Config`` options (``ssl_keyfile=``, ...), over the
                edge's own.

        Raises:
            OSError: the port is taken or the address is not local to this machine.
        """
        # The command line and the caller own logging and the lifespan (the gateway is
        # started already): uvicorn configures neither unless told.
        options: dict[str, Any] = {"lifespan": "off", "log_config": None, "access_log": False}
        options.update(uvicorn_options(self.gateway, self.config))
        options.update(kwargs)
        config = uvicorn.Config(self._asgi, **options)
        # The socket is bound here, so that a taken port is an OSError for the caller
        # (uvicorn would log it and exit the process).
        sock = self._socket = _bind(host, port, config.backlog)
        config.load()
        server = self._server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        try:
            await server.startup(sockets=[sock])
        except BaseException:
            sock.close()
            raise
        # uvicorn's main loop only keeps its Date header fresh and watches should_exit.
        self._ticks = asyncio.create_task(server.main_loop(), name="wsbus-asgi-uvicorn")
        address = sock.getsockname()
        self._address = (address[0], address[1])
        log.info("wsbus ASGI edge (uvicorn) listening on %s", self.url)

    async def close(self) -> None:
        """Stop this edge: close its port and its connections (1001). Idempotent.

        The gateway keeps running with its other connections: close it yourself, as you
        started it (first, for a graceful drain).
        """
        if self._closed:
            return
        self._closed = True
        server = self._server
        if server is None:
            self.app._closing = True
            return
        await self.app.close_connections(1001, "going away")
        server.should_exit = True
        ticks, self._ticks = self._ticks, None
        if ticks is not None:
            await ticks
        await server.shutdown(sockets=[self._socket] if self._socket is not None else None)

    async def __aenter__(self) -> AsgiServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _peer(client: tuple[str, int] | None) -> str:
    return f"client {client[0]}:{client[1]}" if client is not None else "a client"


def _bind(host: str, port: int, backlog: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve(
    gateway: Gateway,
    host: str = "127.0.0.1",
    port: int = 8765,
    *,
    config: AsgiConfig | None = None,
    **kwargs: Any,
) -> AsgiServer:
    """Put a started gateway on a port, as its ASGI application under uvicorn.

    As ``wsbus_websockets.serve``: ``server.close()`` closes the port and the connections,
    never the gateway; close the gateway, which you started, first for a graceful drain.

    Args:
        gateway: a started :class:`wsbus.Gateway`; it stays the caller's to close.
        host: the address to listen on; loopback unless you mean otherwise.
        port: the port; 0 picks a free one (read it back from ``server.port``).
        config: edge settings; :class:`AsgiConfig` defaults when omitted.
        **kwargs: more ``uvicorn.Config`` options.

    Raises:
        OSError: the port is taken or the address is not local to this machine.
    """
    server = AsgiServer(gateway, config if config is not None else AsgiConfig())
    await server.start(host, port, **kwargs)
    return server
