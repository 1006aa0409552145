"""The picows edge: a gateway on a WebSocket port, on the ``picows`` library.

It behaves as the ``websockets`` edge does (docs/picows.md lists the few differences):
before the upgrade it answers plain HTTP (a health endpoint, an optional static directory),
refuses shutting-down or full servers with 503, foreign origins with 403 and offers of only
unknown subprotocols with 400; after it, each connection is handed to
:meth:`wsbus.Gateway.serve`, which authenticates it, and reads and writes it until it closes.
picows parses the frames (in C); this module assembles fragmented messages, checks UTF-8,
the message size and the reserved bits, answers pings, pings for keepalive, bounds what it
buffers both ways and counts what reached the socket.
"""

from __future__ import annotations

import asyncio
import http
import ipaddress
import logging
import struct
from collections import deque
from pathlib import Path
from typing import Any, Final

from picows import (
    WSCloseCode,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
)

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

from ._protocol import (
    PARSING,
    EdgeProtocol,
    HandshakeGuard,
    QuietLogger,
    RateLimitedLog,
    protocol_factory,
)

__all__ = ["TOKEN_SUBPROTOCOL_PREFIX", "PicowsConfig", "PicowsServer", "serve"]

log = logging.getLogger("wsbus.picows")

LOG_INTERVAL: Final = 10.0
"""Seconds between two log lines about evicted handshakes or failed accepts."""

_CLOSE_CODES: Final = frozenset(
    {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}
)
"""Close codes below 3000 a peer may send (RFC 6455 section 7.4, and IANA's registry)."""

# Frame sizes on the wire: a server frame's header is 2, 4 or 10 bytes (never masked).
_SHORT: Final = 126
_MEDIUM: Final = 1 << 16


_HEAD16: Final = struct.Struct("!BBH")
_HEAD64: Final = struct.Struct("!BBQ")


def _header(opcode: int, n: int) -> bytes:
    """A server frame's header (FIN and ``opcode`` in the first byte, no mask)."""
    if n < _SHORT:
        return bytes((opcode, n))
    if n < _MEDIUM:
        return _HEAD16.pack(opcode, 126, n)
    return _HEAD64.pack(opcode, 127, n)


def _frame_size(n: int) -> int:
    return n + (2 if n < _SHORT else 4 if n < _MEDIUM else 10)


class PicowsConfig(OpsConfig, frozen=True, kw_only=True):
    """Settings of the picows edge, with defaults fit for the open internet.

    The fields the websockets edge's ``EdgeConfig`` also has mean the same there.

    Attributes:
        allowed_origins: origins (``https://app.example.com``) allowed besides the server's
            own; ``"null"`` and ``"file://"`` are refused unless listed here.
        allow_same_origin: allow pages served by this server (an Origin whose scheme,
            host and port are this server's; on loopback only loopback names count).
        allow_missing_origin: allow clients that send no Origin header (programs).
        max_connections: refuse upgrades with HTTP 503 beyond this many connections;
            defaults to the gateway's ``max_connections``.
        inbound_queue: frames read and not yet taken by the gateway, per connection,
            before the edge stops reading the socket. The gateway takes them a read at a
            time, so a connection whose frames wait for the bus holds up to twice this
            many.
        write_limit: bytes in a connection's write buffer before a send waits.
        open_timeout: seconds for the opening handshake (TCP accept to the request).
        max_handshakes: connections that have not sent their whole request yet, at
            most; a new one over the cap drops the oldest. None: 1024.
        max_subprotocols: subprotocol names a handshake may offer; more get HTTP 400.
        max_subprotocol_bytes: bytes of ``Sec-WebSocket-Protocol`` headers a handshake
            may send; more get HTTP 400.
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
    open_timeout: float = 10.0
    max_handshakes: int | None = None
    max_subprotocols: int = 16
    max_subprotocol_bytes: int = 4096
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
        if self.open_timeout <= 0 or self.close_timeout <= 0:
            raise ConfigError("open_timeout and close_timeout must be > 0")
        for name in ("ping_interval", "ping_timeout"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be > 0, or None")
        if self.static_dir is not None and not Path(self.static_dir).is_dir():
            raise ConfigError(f"static_dir {self.static_dir!r} is not a directory")
        check_http_settings(self)


class _Connection(WSListener):
    """One picows connection: picows' listener, and the gateway's ClientConnection.

    Frames picows parses arrive in :meth:`on_ws_frame` (a text message is decoded, a
    fragmented one assembled) and wait in a queue of ``inbound_queue`` frames, past which
    the socket is not read; :meth:`receive` takes them. Writes go straight to picows while
    the write buffer is under ``write_limit``.
    """

    __slots__ = (
        "_binary_type",
        "_bound",
        "_close_timeout",
        "_closed",
        "_codec",
        "_edge",
        "_ended",
        "_flushed_at_loss",
        "_frames",
        "_gather",
        "_gathered",
        "_inflight",
        "_known",
        "_limit",
        "_loop",
        "_max_size",
        "_opcode",
        "_part_text",
        "_parts",
        "_parts_size",
        "_pass",
        "_paused",
        "_pongs",
        "_queue",
        "_raw",
        "_reader",
        "_request",
        "_resume_at",
        "_text",
        "_transport",
        "_writers",
        "_written",
        "last_pong",
        "ping_sent",
    )

    def __init__(
        self, edge: PicowsServer, codec: Codec, request: HandshakeRequest, max_size: int
    ) -> None:
        super().__init__()
        config = edge.config
        self._edge = edge
        self._codec = codec
        self._text = codec.is_text
        self._binary_type = WSMsgType.TEXT if codec.is_text else WSMsgType.BINARY
        self._opcode = 0x81 if codec.is_text else 0x82  # FIN and the opcode
        self._request = request
        self._limit = config.write_limit
        self._close_timeout = config.close_timeout
        self._queue = config.inbound_queue
        # Reading resumes once the gateway has taken three quarters of the queue, as
        # websockets' own queue does: not a pause and a resume (two system calls) per frame.
        self._resume_at = config.inbound_queue // 4
        # What the gateway's writes can leave in the write buffer (a frame is written while
        # it holds at most write_limit, and none is over outbound_bytes), with room for a
        # ping and a close: more is pongs the peer asks for and never reads.
        self._bound = config.write_limit + edge.gateway.config.outbound_bytes + 1024
        self._max_size = max_size
        self._loop = asyncio.get_running_loop()
        self._transport: WSTransport | None = None
        self._raw: asyncio.Transport | None = None
        self._frames: deque[str | bytes] = deque()
        self._reader: asyncio.Future[None] | None = None
        self._writers: list[asyncio.Future[None]] = []
        self._paused = False
        self._closed: ConnectionClosed | None = None
        # The TCP connection has ended: receive raises once the frames read are taken (a
        # close under way still lets the socket take what the transport holds, and the
        # gateway counts what reached it once receive has raised).
        self._ended = False
        self._parts: list[bytes] | None = None
        self._parts_size = 0
        self._part_text = False
        self._pongs: list[bytes] | None = None
        # Bytes given to the transport since the upgrade, where each data frame that may
        # not have reached the socket ends, and what had reached it when last looked at.
        self._written = 0
        self._inflight: deque[int] | None = None
        self._known = 0
        self._flushed_at_loss: int | None = None
        # Frames sent after the first one of an event-loop pass, gathered (headers and
        # payloads) and written together when the pass ends; None: none went out this pass.
        self._gather: list[bytes] | None = None
        self._gathered = 0
        # The edge's pass number when this connection last wrote a frame at once.
        self._pass = -1
        self.ping_sent: float | None = None
        self.last_pong = self._loop.time()

    # -- the ClientConnection side --------------------------------------------------------

    @property
    def codec(self) -> Codec:
        """The codec negotiated at the handshake."""
        return self._codec

    @property
    def request(self) -> HandshakeRequest:
        """What the handshake said."""
        return self._request

    async def receive(self) -> str | bytes:
        """Return the next frame, or raise ConnectionClosed once none is left."""
        frames = self._frames
        while not frames:
            if self._ended:
                assert self._closed is not None
                raise self._closed
            reader = self._reader = self._loop.create_future()
            try:
                await reader
            finally:
                self._reader = None
        data = frames.popleft()
        if self._paused and len(frames) <= self._resume_at:
            self._paused = False
            raw = self._raw
            if raw is not None and not raw.is_closing():
                raw.resume_reading()
        return data

    async def receive_batch(self) -> list[str | bytes]:
        """Every frame read and not taken yet, oldest first (one at least; see receive)."""
        frames = self._frames
        if not frames:
            return [await self.receive()]
        batch = list(frames)
        frames.clear()
        if self._paused:
            self._paused = False
            raw = self._raw
            if raw is not None and not raw.is_closing():
                raw.resume_reading()
        return batch

    def send_nowait(self, data: bytes) -> bool:
        """Write one frame if the write buffer is under ``write_limit``; else False."""
        raw = self._raw
        if self._closed is not None or raw is None:
            return False
        gather = self._gather
        if gather is None and self._pass == self._edge.pass_number:
            gather = self._gather = []
            self._edge._passing.append(self)
        if gather is not None:
            # A frame went out in this event-loop pass already: this one is gathered with
            # the others, and all are written in one system call when the pass ends (or
            # once they reach write_limit).
            gathered = self._gathered
            if raw.get_write_buffer_size() + gathered > self._limit:
                return False
            n = len(data)
            gather.append(_header(self._opcode, n))
            gather.append(data)
            size = _frame_size(n)
            self._gathered = gathered + size
            written = self._written = self._written + size
            inflight = self._inflight
            if inflight is None:
                inflight = self._inflight = deque()
            inflight.append(written)
            if gathered + size >= self._limit:
                self._write_gathered()
            return True
        buffered = raw.get_write_buffer_size()
        if buffered > self._limit:
            return False
        transport = self._transport
        assert transport is not None
        # The first frame of a pass goes out at once (latency).
        transport.send(self._binary_type, data)
        self._written += _frame_size(len(data))
        if buffered or raw.get_write_buffer_size():
            # Not all on the socket yet: remember where this frame ends.
            inflight = self._inflight
            if inflight is None:
                inflight = self._inflight = deque()
            inflight.append(self._written)
        edge = self._edge
        self._pass = edge.pass_number
        if not edge._pass_scheduled:
            edge._schedule_pass_end()
        return True

    async def send(self, data: bytes) -> None:
        """Write one frame, waiting while the write buffer is over ``write_limit``."""
        while not self.send_nowait(data):
            closed = self._closed
            if closed is not None:
                raise closed
            writer = self._loop.create_future()
            self._writers.append(writer)
            try:
                await writer
            finally:
                if writer in self._writers:
                    self._writers.remove(writer)

    def unsent(self) -> int:
        """Frames given to send or send_nowait that have not reached the socket."""
        inflight = self._inflight
        if inflight is None:
            return 0
        flushed = self._flushed_at_loss
        if flushed is None:
            raw = self._raw
            assert raw is not None
            flushed = self._known = self._written - raw.get_write_buffer_size() - self._gathered
        while inflight and inflight[0] <= flushed:
            inflight.popleft()
        if not inflight:
            self._inflight = None
            return 0
        return len(inflight)

    async def close(self, code: int, reason: str = "") -> None:
        """Close with ``code``: the close frame, then the TCP connection.

        Waits for the peer's close frame at most ``close_timeout``, then drops the
        connection (what the transport still held is counted unsent).
        """
        transport = self._transport
        if self._closed is None:
            self._closed = ConnectionClosed(code, reason)
            self._wake()
            if transport is not None and not transport.is_disconnected:
                self._send_close(code, reason)
        if transport is None or transport.is_disconnected:
            return
        try:
            async with asyncio.timeout(self._close_timeout):
                await transport.wait_disconnected()
        except TimeoutError:
            self.abort()
            await transport.wait_disconnected()

    def abort(self) -> None:
        """Drop the TCP connection now; what the transport held never reaches the peer."""
        raw = self._raw
        if raw is None:
            return
        if self._flushed_at_loss is None:
            self._flushed_at_loss = self._written - raw.get_write_buffer_size() - self._gathered
        self._gather = None
        raw.abort()

    # -- picows' listener side ------------------------------------------------------------

    def on_ws_connected(self, transport: WSTransport) -> None:
        """The upgrade is done: bound the write buffer, and hand the connection over."""
        self._transport = transport
        raw = self._raw = transport.underlying_transport
        raw.set_write_buffer_limits(high=self._limit)
        # The 101 response may still be in the buffer: it is not the gateway's.
        self._written = self._known = raw.get_write_buffer_size()
        self._edge._opened(self)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        """One frame from the peer: a message (or part of one), a ping, a pong, a close."""
        msg_type = frame.msg_type
        if transport.is_close_frame_sent and msg_type is not WSMsgType.CLOSE:
            # Closing (or picows failed the connection: it goes on parsing what follows a
            # frame it refused, such as the payload of one over the size limit): nothing
            # more is read.
            if self._closed is None:
                self._closed = _closed_from(transport)
                self._wake()
            return
        if frame.rsv1 or frame.rsv2 or frame.rsv3:
            self._fail(1002, "reserved bits set: no extension was negotiated")
        elif msg_type is WSMsgType.TEXT or msg_type is WSMsgType.BINARY:
            if self._parts is not None:
                self._fail(1002, "a new message before the last one ended")
            elif frame.fin:
                if msg_type is WSMsgType.TEXT:
                    try:
                        text = frame.get_payload_as_utf8_text()
                    except UnicodeDecodeError:
                        self._fail(1007, "invalid UTF-8 in a text frame")
                        return
                    self._push(text)
                else:
                    self._push(frame.get_payload_as_bytes())
            else:
                self._parts = [frame.get_payload_as_bytes()]
                self._parts_size = frame.payload_size
                self._part_text = msg_type is WSMsgType.TEXT
        elif msg_type is WSMsgType.CONTINUATION:
            self._continue(frame)
        elif msg_type is WSMsgType.PING:
            self._pong(frame)
        elif msg_type is WSMsgType.PONG:
            self.ping_sent = None
            self.last_pong = self._loop.time()
        elif msg_type is WSMsgType.CLOSE:
            self._peer_closed(frame)
        if frame.last_in_buffer and self._pongs is not None:
            self._write_pongs()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        """The TCP connection ended (see :meth:`lost`, called just before)."""
        if self._closed is None:
            self._closed = _closed_from(transport)
        self._ended = True
        self._pongs = None
        self._parts = None
        self._wake()
        reader = self._reader
        if reader is not None and not reader.done():
            reader.set_result(None)
        self._edge._ended(self)

    def lost(self, exc: Exception | None) -> None:
        """The connection was lost (``exc``: why, None for a close or an abort).

        A transport that failed (a reset, a broken pipe) empties its buffer before it
        says so: what it held never reached the socket, and how much is known only as of
        the last look. Frames that may have been lost are counted unsent, never written.
        """
        if self._flushed_at_loss is None:
            raw = self._raw
            if exc is None and raw is not None:
                self._flushed_at_loss = self._written - raw.get_write_buffer_size() - self._gathered
            else:
                self._flushed_at_loss = self._known

    def ping(self) -> None:
        """Send a keepalive ping (the edge's keepalive task calls this)."""
        transport = self._transport
        raw = self._raw
        if transport is None or raw is None or raw.is_closing() or transport.is_close_frame_sent:
            return
        self._write_gathered()
        self._written += _frame_size(4)
        transport.send_ping(b"wsbp")

    def pause_writing(self) -> None:
        """The write buffer went over ``write_limit``: sends wait (see resume_writing)."""

    def resume_writing(self) -> None:
        """The write buffer drained: waiting sends may write."""
        self._wake_writers()

    # -- inside -------------------------------------------------------------------------

    def _push(self, data: str | bytes) -> None:
        frames = self._frames
        frames.append(data)
        reader = self._reader
        if reader is not None and not reader.done():
            reader.set_result(None)
        if not self._paused and len(frames) >= self._queue:
            # The gateway is behind: stop reading this socket until it catches up (what
            # picows has already read is parsed: at most FEED_BYTES more).
            self._paused = True
            raw = self._raw
            if raw is not None:
                raw.pause_reading()

    def _continue(self, frame: WSFrame) -> None:
        parts = self._parts
        if parts is None:
            self._fail(1002, "a continuation frame with nothing to continue")
            return
        self._parts_size += frame.payload_size
        if self._parts_size > self._max_size:
            self._fail(1009, f"message over {self._max_size} bytes")
            return
        parts.append(frame.get_payload_as_bytes())
        if not frame.fin:
            return
        self._parts = None
        data = b"".join(parts)
        if self._part_text:
            try:
                self._push(data.decode())
            except UnicodeDecodeError:
                self._fail(1007, "invalid UTF-8 in a text message")
        else:
            self._push(data)

    def _pong(self, frame: WSFrame) -> None:
        # picows would write each pong on its own (a system call each): gathered, and
        # written once at the end of the read.
        payload = frame.get_payload_as_bytes()
        pongs = self._pongs
        if pongs is None:
            pongs = self._pongs = []
        pongs.append(b"\x8a" + bytes((len(payload),)) + payload)

    def _write_pongs(self) -> None:
        pongs, self._pongs = self._pongs, None
        raw = self._raw
        transport = self._transport
        if (
            not pongs
            or raw is None
            or transport is None
            or raw.is_closing()
            or transport.is_close_frame_sent
        ):
            return
        self._write_gathered()
        data = b"".join(pongs)
        self._written += len(data)
        raw.write(data)
        buffered = raw.get_write_buffer_size()
        if buffered > self._bound:
            log.info(
                "closing %s with 1008: it sends pings but does not read the pongs "
                "(%d bytes unread, bound %d)",
                self._request.remote,
                buffered,
                self._bound,
            )
            self._fail(1008, "not reading")

    def _peer_closed(self, frame: WSFrame) -> None:
        transport = self._transport
        assert transport is not None
        handshake = transport.close_handshake
        received = handshake.recv if handshake is not None else None
        if frame.payload_size == 0 or received is None:
            code, reason = 1005, ""
        else:
            code, reason = _code(received.code), received.reason or ""
            if not (code in _CLOSE_CODES or 3000 <= code <= 4999):
                # picows lets 0, 1006 and anything from 3000 up through.
                self._fail(1002, f"invalid close code {code}")
                return
        if self._closed is None:
            self._closed = ConnectionClosed(code, reason)
            self._wake()
        if not transport.is_close_frame_sent:
            # Echo the peer's close (RFC 6455 section 5.5.1); an empty one gets 1000.
            if code == 1005:
                self._send_close(1000, "")
            else:
                self._send_close(code, reason)
        transport.disconnect()

    def _send_close(self, code: int, reason: str) -> None:
        transport = self._transport
        assert transport is not None
        self._write_gathered()
        encoded = reason.encode()[:123]
        self._written += _frame_size(2 + len(encoded))
        transport.send_close(WSCloseCode(code), encoded)

    def _fail(self, code: int, reason: str) -> None:
        """Close for a protocol fault of the peer's: close frame, then drop it soon."""
        if self._closed is None:
            self._closed = ConnectionClosed(code, reason)
            self._wake()
        transport = self._transport
        if transport is None or transport.is_disconnected:
            return
        if not transport.is_close_frame_sent:
            self._send_close(code, reason)
        self._pongs = None
        self._parts = None
        raw = self._raw
        if raw is not None:
            # Nothing more is read from a peer that broke the protocol; the close frame
            # goes out with what is buffered, for close_timeout at most.
            raw.pause_reading()
            self._paused = True
            transport.disconnect()
            self._loop.call_later(self._close_timeout, self.abort)

    def end_pass(self) -> None:
        """The event-loop pass is over: write what was gathered in it."""
        self._write_gathered()
        self._gather = None

    def _write_gathered(self) -> None:
        gather = self._gather
        if not gather:
            return
        self._gather = []
        self._gathered = 0
        raw = self._raw
        if raw is not None and not raw.is_closing():
            raw.write(b"".join(gather))
        # Otherwise the connection is gone: those frames stay counted unsent.

    def _wake(self) -> None:
        # Sends raise at once; receive only once the TCP connection has ended.
        self._wake_writers()

    def _wake_writers(self) -> None:
        for writer in self._writers:
            if not writer.done():
                writer.set_result(None)


def _code(code: Any) -> int:
    # picows' close codes are a Cython enum: an int at run time, an Enum in its stubs.
    return int(code)


def _closed_from(transport: WSTransport) -> ConnectionClosed:
    """The close code that ended a connection, as the websockets edge reports it."""
    handshake = transport.close_handshake
    if handshake is None:
        return ConnectionClosed(1006, "connection lost")
    info = handshake.recv if handshake.recv_then_sent or handshake.sent is None else handshake.sent
    if info is None or info.code == WSCloseCode.NO_INFO:
        return ConnectionClosed(1006, "connection lost")
    return ConnectionClosed(_code(info.code), info.reason or "")


class PicowsServer:
    """A running picows edge. Close it with :meth:`close` (or use ``async with``).

    The edge owns its listening socket and the connections it accepted; it does not own the
    gateway, which whoever started it closes (see :func:`serve`).

    Attributes:
        gateway: the gateway it serves, started and closed by its caller.
        config: its settings.
        server: the underlying ``asyncio.Server``.
        handshakes: counts and caps connections in the opening handshake.
    """

    def __init__(self, gateway: Gateway, config: PicowsConfig) -> None:
        self.gateway = gateway
        self.config = config
        self.server: asyncio.Server | None = None
        self.handshakes = HandshakeGuard(config.max_handshakes or 1024, RateLimitedLog(log))
        self._closing = False
        self._address: tuple[str, int] = ("", 0)
        self._front = HttpFront(config)
        self._front.attach(gateway, "picows")
        self._cap = (
            config.max_connections
            if config.max_connections is not None
            else gateway.config.max_connections
        )
        self._connections: dict[_Connection, asyncio.Task[None]] = {}
        self._keepalive: asyncio.Task[None] | None = None
        # Event-loop passes in which a frame was written are numbered: a connection's
        # second frame in the same pass is gathered, and the gathering connections are
        # written when the pass ends. One callback per pass for the whole edge, and none
        # per connection that writes one frame per pass.
        self.pass_number = 0
        self._passing: list[_Connection] = []
        self._pass_scheduled = False

    @property
    def url(self) -> str:
        """``ws://host:port/``."""
        host, port = self._address
        if ":" in host:
            host = f"[{host}]"
        return f"ws://{host}:{port}/"

    @property
    def port(self) -> int:
        """The port it listens on."""
        return self._address[1]

    async def start(self, host: str, port: int, **kwargs: Any) -> None:
        """Start listening (the gateway must be started already)."""
        loop = asyncio.get_running_loop()
        factory = protocol_factory(
            self.handshakes,
            _lost,
            self._listener_for,
            QuietLogger(logging.getLogger("wsbus.picows.protocol"), {}),
            handshake_timeout=self.config.open_timeout,
            max_frame_size=self.gateway.config.wire.max_frame_bytes,
        )
        self.server = await loop.create_server(factory, host, port, **kwargs)
        host, port = self.server.sockets[0].getsockname()[:2]
        self._address = (host, port)
        self._front.listening(
            port,
            secure=kwargs.get("ssl") is not None,
            loopback=all(
                ipaddress.ip_address(s.getsockname()[0]).is_loopback for s in self.server.sockets
            ),
        )
        if self.config.ping_interval is not None:
            self._keepalive = loop.create_task(self._keep_alive(self.config.ping_interval))
        log.info("wsbus picows edge listening on %s", self.url)

    async def close(self) -> None:
        """Stop this edge: its listening socket and its connections (1001). Idempotent.

        The gateway keeps running: close it yourself, as you started it (first, for a
        graceful drain).
        """
        if self._closing:
            return
        self._closing = True
        if self._keepalive is not None:
            self._keepalive.cancel()
        if self.server is not None:
            self.server.close()
        self.handshakes.close()
        connections = list(self._connections)
        if connections:
            async with asyncio.TaskGroup() as closing:
                for connection in connections:
                    closing.create_task(connection.close(1001, "server shutting down"))
        tasks = [task for task in self._connections.values() if not task.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=self.config.close_timeout)
        if self.server is not None:
            await self.server.wait_closed()
        await self._front.close()

    async def __aenter__(self) -> PicowsServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- the handshake -------------------------------------------------------------------

    def _listener_for(self, request: WSUpgradeRequest) -> Any:
        protocol = self._current_protocol()
        if protocol is not None:
            protocol.handshake_done()
        try:
            return self._check_request(request, protocol.peer if protocol else "?")
        except Exception:
            # A bug, never input: the client gets 500 and the log says why.
            log.exception("handling the request from %s failed", protocol and protocol.peer)
            return _plain(http.HTTPStatus.INTERNAL_SERVER_ERROR, "internal error\n")

    def _current_protocol(self) -> EdgeProtocol | None:
        # picows calls the listener factory from the protocol's buffer_updated with the
        # request only: the protocol is the one whose read is being parsed now.
        return PARSING.protocol

    def _check_request(self, request: WSUpgradeRequest, peer: str) -> Any:
        headers = request.headers
        front = self._front

        def values(name: str) -> list[str]:
            found: list[str] = headers.getall(name, [])
            return found

        refusal = front.repeated(values)
        if refusal is not None:
            return _response(refusal)
        try:
            # websockets refuses a request line that is not ASCII (400) before wsbus sees it.
            target = request.path.decode("ascii")
        except UnicodeDecodeError:
            return _plain(
                http.HTTPStatus.BAD_REQUEST, "the request's path is not ASCII: percent-encode it\n"
            )
        closing = self._closing or self.gateway.closing
        if "websocket" not in headers.get("Upgrade", "").lower():
            return _response(
                front.get(
                    target,
                    closing=closing,
                    connections=self.gateway.open_connections,
                    peer=peer,
                    headers=values,
                )
            )
        refusal = front.upgrade_refusal(
            values,
            closing=closing,
            full=max(self.gateway.open_connections, len(self._connections)) >= self._cap,
            peer=peer,
        )
        if refusal is not None:
            return _response(refusal)
        handshake = front.handshake_request(target, headers.items(), peer)
        codecs = [p for p in handshake.subprotocols if not p.startswith(TOKEN_SUBPROTOCOL_PREFIX)]
        codec = Codec.JSON
        extra: dict[str, str] = {}
        if codecs:
            chosen = negotiate(codecs)
            if chosen is None:
                return _plain(
                    http.HTTPStatus.BAD_REQUEST,
                    "no supported subprotocol: offer wsbus.v1.json or wsbus.v1.msgpack\n",
                )
            codec = chosen
            extra["Sec-WebSocket-Protocol"] = codec.value
        connection_tokens = [t.strip().lower() for t in headers.get("Connection", "").split(",")]
        if "upgrade" in connection_tokens:
            # Firefox sends "keep-alive, Upgrade"; picows accepts only "Upgrade" alone,
            # and checks the request after this (see wsbus_picows._protocol).
            headers["Connection"] = "Upgrade"
        connection = _Connection(self, codec, handshake, self.gateway.config.wire.max_frame_bytes)
        return WSUpgradeResponseWithListener(
            WSUpgradeResponse.create_101_response(extra_headers=extra), connection
        )

    # -- connections ---------------------------------------------------------------------

    def _schedule_pass_end(self) -> None:
        self._pass_scheduled = True
        asyncio.get_running_loop().call_soon(self._end_pass)

    def _end_pass(self) -> None:
        self._pass_scheduled = False
        self.pass_number += 1
        passing, self._passing = self._passing, []
        for connection in passing:
            connection.end_pass()

    def _opened(self, connection: _Connection) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(connection))
        self._connections[connection] = task

    def _ended(self, connection: _Connection) -> None:
        pass  # the serving task removes it once the gateway is done with it

    async def _serve(self, connection: _Connection) -> None:
        try:
            await self.gateway.serve(connection)
        except Exception:
            # A bug, never input: the client gets 1011 and the log says why.
            log.exception("serving %s failed", connection.request.remote)
            await connection.close(1011, "internal error")
        finally:
            self._connections.pop(connection, None)

    async def _keep_alive(self, interval: float) -> None:
        # One task for every connection, rather than picows' task per connection: a ping
        # every interval, and 1011 for a pong that has not come within ping_timeout.
        timeout = self.config.ping_timeout
        loop = asyncio.get_running_loop()
        tick = min(interval, timeout or interval) / 4
        while True:
            await asyncio.sleep(tick)
            now = loop.time()
            for connection in list(self._connections):
                sent = connection.ping_sent
                if sent is not None:
                    if timeout is not None and now - sent > timeout:
                        connection.ping_sent = None
                        log.info(
                            "closing %s with 1011: no pong within %.1f s",
                            connection.request.remote,
                            timeout,
                        )
                        connection._fail(1011, "keepalive ping timeout")
                elif now - connection.last_pong >= interval:
                    connection.ping_sent = now
                    connection.ping()


def _lost(listener: Any, exc: Exception | None) -> None:
    if isinstance(listener, _Connection):
        listener.lost(exc)


def _response(reply: Reply) -> WSUpgradeResponseWithListener:
    """The front's reply as picows' response."""
    status, body = reply.status, reply.body
    headers = [("Content-Type", reply.content_type), *RESPONSE_HEADERS]
    if status >= 400:
        response = WSUpgradeResponse.create_error_response(status, body, headers)
    else:
        response = WSUpgradeResponse.create_ok_response(body, headers)
        response.status = status
    return WSUpgradeResponseWithListener(response, None)


def _plain(status: http.HTTPStatus, text: str) -> WSUpgradeResponseWithListener:
    return _response(Reply.text(status, text))


async def serve(
    gateway: Gateway,
    host: str = "127.0.0.1",
    port: int = 8765,
    *,
    config: PicowsConfig | None = None,
    **kwargs: Any,
) -> PicowsServer:
    """Put a started gateway on a WebSocket port, on picows, and return the running server.

    Whoever starts a thing closes it: ``server.close()`` closes the port and the
    connections it accepted, never the gateway (close that first, for a graceful drain).

    Args:
        gateway: a started :class:`wsbus.Gateway`; it stays the caller's to close.
        host: the address to listen on; loopback unless you mean otherwise.
        port: the port; 0 picks a free one (read it back from ``server.port``).
        config: edge settings; :class:`PicowsConfig` defaults when omitted.
        **kwargs: passed on to ``loop.create_server`` (``ssl=``, ``backlog=``, ...).

    Raises:
        OSError: the port is taken or the address is not local to this machine.
    """
    server = PicowsServer(gateway, config if config is not None else PicowsConfig())
    await server.start(host, port, **kwargs)
    return server
