"""Every ``websockets`` internal the edge relies on, in this one module.

The edge needs more than the library's public API: it writes frames without a coroutine
per frame (to the transport it gave websockets, framed once per payload for every
recipient, or through ``protocol.send_text`` / ``send_binary`` / ``data_to_send`` when an
extension is on), it reads the
request line before ``websockets`` parses it (to answer HEAD and 405 itself and to stop
pipelined requests), it counts what its automatic pongs put in the write buffer, it knows
which bytes reached the socket, and it bounds connections still in the opening handshake.
All of that is done by :class:`EdgeConnection`, a ``ServerConnection`` subclass given to
``websockets.asyncio.server.serve`` as ``create_connection``.

:func:`check_internals` lists what this module reads or overrides; the test
``tests/wsbus_websockets/test_internals.py::test_websockets_internals_we_rely_on_are_there``
fails with its message when a ``websockets`` release moves one of them. Supported:
``websockets`` 15.0 to 17.x (see docs/websockets.md).

Two of asyncio's internals are here too: a :class:`Doorman` holds each new connection
until its request's head is in (put in front of the protocol factory an
``asyncio.Server`` keeps), and the edge bounds how many connections asyncio accepts per
event-loop pass (:func:`listen_backlog`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import inspect
import logging
import os
import re
import socket
import struct
import time
from collections import deque
from typing import Any, Final, cast

from websockets.asyncio.connection import Connection
from websockets.asyncio.server import ServerConnection
from websockets.frames import CloseCode, Opcode
from websockets.http11 import Response
from websockets.protocol import Protocol, State
from websockets.server import ServerProtocol

__all__ = [
    "Doorman",
    "EdgeConnection",
    "HandshakeGuard",
    "RateLimitedLog",
    "check_internals",
    "connection_factory",
    "install_doorman",
    "listen_backlog",
    "rewrite_request_line",
]

log = logging.getLogger("wsbus.websockets")

_FIN_TEXT: Final = 0x81
_FIN_BINARY: Final = 0x82


def server_frame(data: bytes, text: bool) -> bytes:
    """Return ``data`` as one whole, unmasked WebSocket frame (text or binary), as sent.

    The bytes websockets' ``Protocol.send_text`` / ``send_binary`` would queue on a
    connection without extensions (checked by a test against websockets' own).
    """
    n = len(data)
    first = _FIN_TEXT if text else _FIN_BINARY
    if n < 126:
        header = bytes((first, n))
    elif n < 65536:
        header = struct.pack("!BBH", first, 126, n)
    else:
        header = struct.pack("!BBQ", first, 127, n)
    return header + data


class PassEnd:
    """Writes the frames every connection of a server gathered, when the event-loop pass ends.

    The first frame a connection is given in a pass goes out at once (latency); the ones
    after it in the same pass are gathered and written together when the pass ends: one
    system call for a burst. One callback per pass serves every connection (not one per
    connection per pass, which a fan-out to thousands paid): :attr:`number` tells a
    connection whether it wrote already in this pass, and the connections that gathered
    frames are listed here.

    It also keeps the frame made last, and of what payload: a fan-out gives every
    recipient the same payload object, and each connection after the first writes the
    same frame bytes. (Per server, so per event loop: no other thread's frame.)
    """

    __slots__ = ("_gathering", "data", "frame", "number", "scheduled", "text")

    def __init__(self) -> None:
        self.number = 0
        """Passes ended so far: a connection notes it when it writes at once."""
        self._gathering: list[EdgeConnection] = []
        self.scheduled = False
        """The callback that ends this pass is scheduled."""
        self.data: bytes | None = None
        """The payload of :attr:`frame`."""
        self.text = False
        self.frame = b""

    def wrote(self, loop: asyncio.AbstractEventLoop) -> None:
        """A connection wrote a frame at once: this pass must end (once for all)."""
        if not self.scheduled:
            self.scheduled = True
            loop.call_soon(self._end)

    def gathering(self, connection: EdgeConnection) -> None:
        """``connection`` gathered its first frame of the pass: write it when the pass ends."""
        self._gathering.append(connection)

    def _end(self) -> None:
        self.scheduled = False
        self.number += 1
        gathering, self._gathering = self._gathering, []
        for connection in gathering:
            try:
                connection.pass_ended()
            except Exception:
                # One connection's bug must not keep the others' frames back.
                log.exception("writing the frames gathered for %s failed", connection.peer)


MAX_REQUEST_LINE: Final = 8192 + 2
"""websockets' default line limit (8 KiB) and its CRLF: past it, websockets answers 414."""

FEED_BYTES: Final = 8 * 1024
"""Bytes of input handed to websockets per event-loop turn on an open connection.

websockets parses all it is given in one call, and a read can be 256 KiB: 43,000 empty
pings, a second or more of work. The rest of a read waits, with reading paused, for the
next turns, so other connections get theirs in between. 8 KiB of empty pings (1,365) cost
websockets about 11 ms; 16 KiB left the loop's worst stall over 100 ms on a busy 2-core
machine."""

HELD_AFTER_REQUEST: Final = 64 * 1024
"""Bytes a client may send after its request before the response; more aborts it."""

_METHOD = re.compile(rb"[A-Za-z]{1,20}")

_ALLOWED_METHODS: Final = "GET, HEAD"

_BODY_405: Final = b"method not allowed: use GET or HEAD\n"
_RESPONSE_405: Final = (
    b"HTTP/1.1 405 Method Not Allowed\r\n"
    b"Allow: " + _ALLOWED_METHODS.encode() + b"\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: " + str(len(_BODY_405)).encode() + b"\r\n"
    b"Cache-Control: no-store\r\n"
    b"X-Content-Type-Options: nosniff\r\n"
    b"Connection: close\r\n\r\n" + _BODY_405
)

_BODY_431: Final = b"request head too large\n"
_RESPONSE_431: Final = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: " + str(len(_BODY_431)).encode() + b"\r\n"
    b"Cache-Control: no-store\r\n"
    b"X-Content-Type-Options: nosniff\r\n"
    b"Connection: close\r\n\r\n" + _BODY_431
)

# Phases of a connection's input, from the first byte to the open WebSocket.
_LINE, _HEADERS, _HOLD, _OPEN, _DISCARD = range(5)
_TEXT: Final = Opcode.TEXT


def rewrite_request_line(line: bytes, end: int) -> tuple[bytes, bool] | None:
    """Return the request line to give websockets, and whether the request was HEAD.

    HEAD is passed on as GET (the edge answers it without a body); any other HTTP method
    but GET returns None: the edge answers 405 itself. A line that is not HTTP is passed
    on unchanged, for websockets to refuse.

    Args:
        line: the request line, with its CRLF and possibly what followed it.
        end: where the CRLF that ends the request line starts in ``line``.
    """
    method, _, _ = line.partition(b" ")
    if method == b"GET":
        return line, False
    if method == b"HEAD":
        return b"GET" + line[4:], True
    if _METHOD.fullmatch(method) and line[:end].endswith((b" HTTP/1.1", b" HTTP/1.0")):
        return None
    return line, False


class RateLimitedLog:
    """Log one kind of event at most once per ``interval`` seconds, with a count.

    Args:
        logger: where to log.
        interval: seconds between two lines.
    """

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self._logger = logger
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, key: str, message: str, *args: object) -> None:
        """Log ``message`` unless a line with this ``key`` went out within the interval."""
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last[key] = now
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            message += " (%d more like this in the last %.0f s)"
            args = (*args, suppressed, self._interval)
        self._logger.warning(message, *args)


class HandshakeGuard:
    """Counts connections whose request has not arrived whole yet, and caps them.

    A new connection over the cap evicts an older one: first the oldest that has sent
    part of its request and stopped, else the oldest that has sent nothing. A real client
    sends its whole request with the connection, so it leaves the count at its first
    read; connections accepted in the same burst as it have not been read yet and are
    evicted last. Real clients keep getting in while stalled ones are pushed out.

    Connections are counted by their asyncio transport: a :class:`Doorman` enters them
    and an :class:`EdgeConnection` it hands one over to keeps its place. With ``timeout``,
    connections counted longer than that are dropped too (checked about once a second,
    a few dozen per event-loop pass), since a doorman has no ``open_timeout`` of its own.

    Args:
        cap: connections in the handshake at most.
        report: logs evictions, once per interval.
        timeout: seconds a connection may stay counted, or None.
    """

    def __init__(self, cap: int, report: RateLimitedLog, timeout: float | None = None) -> None:
        self.cap = cap
        self.evicted = 0
        self.timed_out = 0
        self.doorman = False
        """True once a :class:`Doorman` enters every connection (see install_doorman)."""
        self._report = report
        self._timeout = timeout
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        # Insertion-ordered, with the loop time each entered: the first key is the oldest.
        # Connections not read yet, and connections read that have not sent their whole
        # request. Deleting the oldest keys of a dict leaves holes that finding the next
        # oldest walks over, but at most cap of them before the dict is compacted.
        self._fresh: dict[asyncio.BaseTransport, float] = {}
        self._stalled: dict[asyncio.BaseTransport, float] = {}

    @property
    def pending(self) -> int:
        """Connections in the opening handshake now."""
        return len(self._fresh) + len(self._stalled)

    @property
    def stalled(self) -> int:
        """Of those, the ones that have sent part of their request."""
        return len(self._stalled)

    def enter(self, transport: asyncio.BaseTransport) -> None:
        """A connection was accepted: count it, evicting an older one over the cap."""
        if self._closed:
            transport.abort()  # type: ignore[attr-defined]
            return
        while self.pending >= self.cap:
            victims = self._stalled or self._fresh
            oldest = next(iter(victims))
            del victims[oldest]
            self.evicted += 1
            self._report.warning(
                "handshake cap",
                "%d connections are in the opening handshake (max_handshakes); dropped "
                "one from %s that had not sent its request. Many of these mean a slow "
                "network or a slow-request attack",
                self.cap,
                _peer_of(oldest),
            )
            oldest.abort()  # type: ignore[attr-defined]
        loop = asyncio.get_running_loop()
        self._fresh[transport] = loop.time()
        if self._timeout is not None and self._timer is None:
            self._timer = loop.call_later(_SWEEP_INTERVAL, self._sweep)

    def partial(self, transport: asyncio.BaseTransport | None) -> None:
        """The connection was read and its request is not whole yet."""
        since = self._fresh.pop(transport, None)  # type: ignore[arg-type]
        if since is not None:
            self._stalled[transport] = since  # type: ignore[index]

    def leave(self, transport: asyncio.BaseTransport | None) -> None:
        """The connection's request arrived whole, or the connection ended."""
        if self._fresh.pop(transport, None) is None:  # type: ignore[arg-type]
            self._stalled.pop(transport, None)  # type: ignore[arg-type]

    def close(self) -> None:
        """Drop every connection still in the handshake, and any that comes later."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for victims in (self._fresh, self._stalled):
            while victims:
                victims.popitem()[0].abort()  # type: ignore[attr-defined]

    def _sweep(self) -> None:
        self._timer = None
        assert self._timeout is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() - self._timeout
        budget = _SWEEP_BATCH
        for victims in (self._stalled, self._fresh):
            # Each dict is in the order connections entered it: stop at the first young one.
            while victims and budget:
                transport, since = next(iter(victims.items()))
                if since > deadline:
                    break
                del victims[transport]
                budget -= 1
                self.timed_out += 1
                transport.abort()  # type: ignore[attr-defined]
        if self.pending and not self._closed:
            self._timer = loop.call_later(0 if not budget else _SWEEP_INTERVAL, self._sweep)


_SWEEP_INTERVAL: Final = 1.0
"""Seconds between two looks for connections in the handshake past their timeout."""

_SWEEP_BATCH: Final = 64
"""Timed-out connections dropped per event-loop pass at most."""


def _peer_of(transport: asyncio.BaseTransport) -> str:
    address = transport.get_extra_info("peername")
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)


class Doorman(asyncio.Protocol):
    """A new connection's protocol until its request's head has arrived.

    It holds the bytes and counts the connection in the :class:`HandshakeGuard`; only when
    the head is whole (or over ``limit`` bytes) does it build websockets' connection (the
    factory's :class:`EdgeConnection`), give it the transport and the bytes read so far.
    A peer that sends nothing or half a request, and is dropped, costs the event loop a
    transport and this small object, not websockets' per-connection machinery (its
    protocol, futures, handler task and timeout, and the cycles between them that only
    the garbage collector frees): under a flood of such peers, that was most of the
    event loop's work and of the full collections that stalled it.

    Args:
        factory: builds the connection (asyncio's protocol factory from websockets).
        guard: counts connections in the handshake.
        limit: bytes of a request's head to hold at most; past them the connection is
            handed over as it is (and refused for its size).
    """

    __slots__ = ("_factory", "_guard", "_head", "_limit", "transport")

    def __init__(self, factory: Any, guard: HandshakeGuard, limit: int) -> None:
        self._factory = factory
        self._guard = guard
        self._limit = limit
        self._head: bytes | bytearray = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._guard.enter(transport)

    def data_received(self, data: bytes) -> None:
        head = self._head
        if not head:
            head = data
            start = 0
        else:
            if not isinstance(head, bytearray):
                head = bytearray(head)
            start = len(head) - 3
            head += data
        first = bytes(head[:5])
        if (
            head.find(b"\r\n\r\n", start) >= 0
            or len(head) > self._limit
            # Not a GET or HEAD: the connection answers 405 (or websockets 400) as soon
            # as the request line is in, as it did before there was a doorman.
            or not (b"GET ".startswith(first[:4]) or b"HEAD ".startswith(first))
        ):
            self._head = b""
            self._hand_over(bytes(head))
            return
        self._head = head
        assert self.transport is not None
        self._guard.partial(self.transport)

    def eof_received(self) -> bool | None:
        # The peer is done sending and its request is not whole: close (as websockets
        # does when a connection ends before its request).
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._guard.leave(self.transport)
        self.transport = None
        self._head = b""

    def _hand_over(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        self.transport = None
        connection = self._factory()
        transport.set_protocol(connection)
        connection.connection_made(transport)
        connection.data_received(data)


ACCEPTS_PER_PASS: Final = 16
"""Connections asyncio accepts per event-loop pass at most (see :func:`listen_backlog`)."""


def listen_backlog(server: asyncio.Server, backlog: int) -> None:
    """Give ``server``'s listening sockets a kernel queue of ``backlog`` connections.

    asyncio's selector loop uses the ``backlog`` given to ``create_server`` twice: for
    ``listen()`` and as how many connections it accepts in one event-loop pass. The edge
    creates its server with :data:`ACCEPTS_PER_PASS` (one pass then sets up at most that
    many connections: under a connection flood, a hundred per pass held the loop tens of
    milliseconds) and calls this once it is serving, so that a burst of clients still
    waits in the kernel's queue instead of retrying its SYN a second later. Calling
    ``listen()`` again on a listening socket only sets its queue's length.
    """
    for transport_socket in server.sockets:
        try:
            # A duplicate of the descriptor: asyncio's own socket object is not handed out.
            with socket.socket(
                transport_socket.family,
                transport_socket.type,
                transport_socket.proto,
                fileno=os.dup(transport_socket.fileno()),
            ) as listening:
                listening.listen(backlog)
        except OSError as exc:
            log.warning(
                "could not set the listen queue of %s to %d connections (%s); it stays at %d",
                transport_socket.getsockname(),
                backlog,
                exc,
                ACCEPTS_PER_PASS,
            )


def install_doorman(server: asyncio.AbstractServer, guard: HandshakeGuard, limit: int) -> bool:
    """Put a :class:`Doorman` in front of every connection ``server`` accepts.

    ``server`` is the ``asyncio.Server`` websockets created, not serving yet: its protocol
    factory (websockets') is wrapped. Returns False (and changes nothing) where the event
    loop's server does not keep the factory where asyncio's does (uvloop): connections
    then enter the guard themselves, with websockets' machinery built at the accept.
    """
    factory = getattr(server, "_protocol_factory", None)
    if factory is None or server.is_serving():
        return False
    server._protocol_factory = functools.partial(Doorman, factory, guard, limit)  # type: ignore[attr-defined]
    guard.doorman = True
    return True


class CountingTransport(asyncio.Transport):
    """The connection's transport, counting the bytes it was given and those it discarded.

    ``flushed`` is what reached the socket: every byte written, less what the transport
    still holds and what an abort, a reset (see :meth:`lose`) or a write after the
    connection was lost discarded.
    """

    __slots__ = ("_t", "discarded", "known", "lost", "written")

    def __init__(self, transport: asyncio.Transport) -> None:
        super().__init__()
        self._t = transport
        self.written = 0
        self.discarded = 0
        self.lost = False
        # What had reached the socket when last looked at (``flushed``, or an empty
        # buffer after the gateway's frames were written).
        self.known = 0

    @property
    def flushed(self) -> int:
        """Bytes that reached the socket."""
        flushed = self.known = self.written - self.discarded - self._t.get_write_buffer_size()
        return flushed

    def lose(self, exc: Exception | None) -> None:
        """The connection was lost (``exc``: why, None for a close or an abort).

        A transport that failed (a reset, a broken pipe) empties its buffer before it
        says so: what it held never reached the socket, and how much that was is known
        only as of the last look. Everything after that is counted discarded: frames that
        may have been lost are dropped, never written.
        """
        if not self.lost and exc is not None:
            self.discarded = max(self.discarded, self.written - self.known)
        self.lost = True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        self.written += n
        if self.lost or self._t.is_closing():
            # asyncio drops writes to a closing transport, and once it has failed logs a
            # warning for each: thousands for the pongs of one read. Not handed on.
            self.discarded += n
            return
        self._t.write(data)

    def writelines(self, list_of_data: Any) -> None:
        chunks = list(list_of_data)
        n = sum(len(c) for c in chunks)
        self.written += n
        if self.lost or self._t.is_closing():
            self.discarded += n
            return
        self._t.writelines(chunks)

    def abort(self) -> None:
        if not self.lost:
            self.discarded += self._t.get_write_buffer_size()
            self.lost = True
        self._t.abort()

    def close(self) -> None:
        self._t.close()

    def is_closing(self) -> bool:
        return self._t.is_closing()

    def get_write_buffer_size(self) -> int:
        return self._t.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._t.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._t.set_write_buffer_limits(high, low)

    def can_write_eof(self) -> bool:
        return self._t.can_write_eof()

    def write_eof(self) -> None:
        self._t.write_eof()

    def pause_reading(self) -> None:
        self._t.pause_reading()

    def resume_reading(self) -> None:
        self._t.resume_reading()

    def is_reading(self) -> bool:
        return self._t.is_reading()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._t.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._t.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._t.get_protocol()


class EdgeConnection(ServerConnection):
    """A ``websockets`` server connection with the edge's bounds and accounting.

    - Reads the request line itself: HEAD is served as a GET without a body
      (``head_request``), any method but GET and HEAD gets 405 at once, and whatever
      follows the request's head is held until the response: a pipelined request is
      never parsed, one response per connection.
    - After every read, the write buffer may hold at most ``write_bound`` bytes: more
      means the peer does not read what it asks for (pongs to its pings); the connection
      is failed with 1008 and aborted.
    - Frames from the gateway go through :meth:`send_nowait` only while the write buffer
      is under ``write_limit``; :meth:`unsent` says how many of them have not reached
      the socket (so a close that aborts counts them dropped).

    Args:
        protocol: websockets' Sans-I/O protocol.
        server: websockets' server.
        guard: counts connections in the handshake.
        write_bound: bytes the write buffer may hold after a read.
        **kwargs: passed on to ``ServerConnection``.
    """

    # Slots, not the instance dict: websockets' own attributes already fill the dict that
    # instances of a class share keys in (30 at most on CPython), and a dict of its own
    # per connection would cost over a kilobyte.
    __slots__ = (
        "_backlog",
        "_bound",
        "_gather",
        "_gathered",
        "_guard",
        "_head_left",
        "_held",
        "_inflight",
        "_key",
        "_line",
        "_pass",
        "_passes",
        "_phase",
        "_tail",
        "_waiters",
        "head_request",
        "out",
    )

    def __init__(
        self,
        protocol: ServerProtocol,
        server: Any,
        *,
        guard: HandshakeGuard,
        write_bound: int,
        max_head: int = 16 * 1024,
        passes: PassEnd | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(protocol, server, **kwargs)
        self._passes = passes if passes is not None else PassEnd()
        self._guard = guard
        # The transport the guard counts this connection by (the one asyncio made).
        self._key: asyncio.Transport | None = None
        self._bound = write_bound
        # Bytes of the request's head still allowed (EdgeConfig.max_request_head).
        self._head_left = max_head
        self._phase = _LINE
        # The request line so far, and what came after the request's head; emptied (to the
        # shared b"") once the handshake is over: an open connection carries neither.
        self._line: bytes | bytearray = bytearray()
        self._tail = b""
        self._held: bytes | bytearray = b""
        self.head_request = False
        """The request was HEAD (passed to websockets as GET): answer without a body."""
        self.out: CountingTransport | None = None
        self._waiters: list[asyncio.Future[None]] | None = None
        # Frames sent without waiting, gathered in this event-loop pass and not yet written
        # (None: none gathered this pass), and their bytes.
        self._gather: list[bytes] | None = None
        self._gathered = 0
        # The PassEnd's number when this connection last wrote a frame at once.
        self._pass = -1
        # Where each frame the socket may not have taken yet ends in the output stream;
        # None while everything written has reached the socket.
        self._inflight: deque[int] | None = None
        # Input read and not yet given to websockets (see FEED_BYTES); None when none.
        self._backlog: memoryview | None = None

    @property
    def peer(self) -> str:
        """``host:port`` of the peer."""
        address = self.remote_address
        if isinstance(address, tuple) and len(address) >= 2:
            return f"{address[0]}:{address[1]}"
        return str(address)

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: uvloop's transports implement asyncio.Transport without
        # subclassing it (wsbus serve --loop uvloop).
        transport = cast(asyncio.Transport, transport)
        super().connection_made(transport)
        self._key = transport
        self.out = CountingTransport(transport)
        self.transport = self.out
        if not self._guard.doorman:
            self._guard.enter(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._guard.leave(self._key)
        self._backlog = None
        if self.out is not None:
            self.out.lose(exc)
        super().connection_lost(exc)
        self._wake()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._wake()

    def data_received(self, data: bytes) -> None:
        phase = self._phase
        if phase is _OPEN:
            backlog = self._backlog
            if backlog is None:
                self._feed(data)
            else:
                # websockets resumed reading (its queue of frames drained) while part of
                # an earlier read waits: after it, in order; and pause again.
                self._backlog = memoryview(bytes(backlog) + data)
                self.transport.pause_reading()
            return
        if phase is _HOLD:
            self._hold(data)
            return
        if phase is _DISCARD:
            return
        if phase is _LINE:
            self._line += data
            end = self._line.find(b"\r\n")
            if end < 0:
                if len(self._line) <= MAX_REQUEST_LINE:
                    self._guard.partial(self._key)
                    return
                # Too long for websockets anyway: let it answer 414.
                data, self._line = bytes(self._line), b""
                self._phase = _HEADERS
            else:
                request_line = rewrite_request_line(bytes(self._line), end)
                self._line = b""
                if request_line is None:
                    self._refuse(_RESPONSE_405)
                    return
                data, self.head_request = request_line
                self._phase = _HEADERS
        # _HEADERS: pass bytes on up to the blank line that ends the head, hold the rest.
        scan = self._tail + data
        end = scan.find(b"\r\n\r\n")
        self._head_left -= len(data) if end < 0 else end + 4 - len(self._tail)
        if self._head_left < 0:
            # Refused before websockets parses more of it: its limits (128 lines of 8 KiB)
            # let a megabyte through, and some headers cost more than their bytes.
            self._refuse(_RESPONSE_431)
            return
        if end < 0:
            self._tail = scan[-3:]
            self._guard.partial(self._key)
            super().data_received(data)
            return
        cut = end + 4 - len(self._tail)
        self._tail = b""
        self._phase = _HOLD
        # The request is all here: what is left of the handshake is the server's own
        # work, done at once. Only a peer that has not sent its request holds a slot.
        self._guard.leave(self._key)
        super().data_received(data[:cut])
        if cut < len(data):
            self._hold(data[cut:])

    def _feed(self, data: bytes | memoryview) -> None:
        # At most FEED_BYTES to websockets now; the rest in the next turns, reading paused.
        waiting = self._backlog is not None
        rest = None
        if len(data) > FEED_BYTES:
            view = memoryview(data)
            data, rest = view[:FEED_BYTES], view[FEED_BYTES:]
        self._backlog = rest
        super().data_received(data if isinstance(data, bytes) else bytes(data))
        if self._phase is not _OPEN:
            return
        if self.transport.get_write_buffer_size() > self._bound:
            self._backlog = None
            self._not_reading()
        elif rest is not None:
            if not waiting:
                self.transport.pause_reading()
            self.loop.call_soon(self._feed_backlog)
        elif waiting and not self.recv_messages.paused:
            # Unless websockets paused reading itself (its queue of frames is full).
            self.transport.resume_reading()

    def _feed_backlog(self) -> None:
        backlog = self._backlog
        if backlog is not None and self._phase is _OPEN:
            self._feed(backlog)

    def eof_received(self) -> None:
        """The peer ended its side: the input still waiting goes to websockets first."""
        backlog, self._backlog = self._backlog, None
        if backlog is not None and self._phase is _OPEN:
            super().data_received(bytes(backlog))
        super().eof_received()

    def _refuse(self, response: bytes) -> None:
        # Answered here, before websockets parses the request: nothing more is read.
        self._phase = _DISCARD
        self._guard.leave(self._key)
        self.transport.write(response)
        self.transport.close()

    def _hold(self, data: bytes) -> None:
        # Bytes after the request and before the response: a pipelined request (dropped
        # when the response is not an upgrade) or frames sent too early (replayed after).
        held = self._held
        if not isinstance(held, bytearray):
            held = self._held = bytearray()
        held += data
        if len(held) > HELD_AFTER_REQUEST:
            self._held = b""
            self._phase = _DISCARD
            self.transport.abort()

    async def handshake(self, *args: Any, **kwargs: Any) -> None:
        """Run websockets' handshake, then replay what the client sent early, if upgraded."""
        try:
            await super().handshake(*args, **kwargs)
        except Exception as exc:
            # websockets 14 raises for what a client did (it went away before its
            # request, sent no valid one, or had its upgrade refused, answered already)
            # and logs it with a traceback; later releases return. The edge's own
            # process_request never raises (it logs its own bugs), so this is the client.
            log.debug("opening handshake with %s failed: %r", self.peer, exc)
        finally:
            self._guard.leave(self._key)
        held, self._held = bytes(self._held), b""
        self._line = b""
        if self.protocol.state is State.OPEN:
            self._phase = _OPEN
            # Sent, and read by nothing after the handshake: an open connection does not
            # keep the response and its headers (about 1.7 KiB per idle connection).
            self.response = None
            if held:
                self.data_received(held)
        else:
            self._phase = _DISCARD

    async def receive(self) -> str | bytes:
        """``recv()``, cheaper for a whole frame that is queued already.

        websockets' ``recv`` runs three coroutines per message (its own, its assembler's
        and its queue's) to return what is usually a single frame that arrived in the same
        read. A whole frame at the head of the queue is taken here (:meth:`take_frames`);
        anything else, a fragment, an empty queue, an invalid UTF-8 text, the end of the
        connection, goes to ``recv``, whose errors are unchanged.
        """
        taken = self.take_frames(1)
        return taken[0] if taken else await self.recv()

    def take_frames(self, limit: int = 0) -> list[str | bytes]:
        """Take the whole frames at the head of websockets' queue, as ``recv`` would.

        Oldest first (at most ``limit``, when above 0), up to the first that is not whole
        (a fragment) or not valid UTF-8 (left in place, for ``recv`` to fail the
        connection with 1007 as it does); none while ``recv`` is assembling a message.
        Each is what the assembler's ``get`` returns: a text frame UTF-8 decoded, a
        binary one as bytes; reading resumes under the low-water mark.
        """
        messages = self.recv_messages
        taken: list[str | bytes] = []
        if messages.get_in_progress:
            return taken
        queue = messages.frames.queue
        while queue:
            frame = queue[0]
            if not frame.fin:
                break
            data = frame.data
            if frame.opcode is _TEXT:
                try:
                    # str(): frame.data may be a memoryview, which has no decode().
                    item: str | bytes = str(data, "utf-8")
                except UnicodeDecodeError:
                    break
            else:
                item = bytes(data)
            queue.popleft()
            taken.append(item)
            if len(taken) == limit:
                break
        if taken:
            messages.maybe_resume()
        return taken

    def _not_reading(self) -> None:
        # Replies websockets wrote on its own (pongs) filled the write buffer past what any
        # of our writes can leave there: the peer asks and does not read.
        log.info(
            "closing %s with 1008: it sends pings but does not read the pongs "
            "(%d bytes unread, bound %d)",
            self.peer,
            self.transport.get_write_buffer_size(),
            self._bound,
        )
        self._phase = _DISCARD
        if self.protocol.state is State.OPEN:
            self.protocol.fail(CloseCode.POLICY_VIOLATION, "not reading")
        self.transport.abort()

    # -- the gateway's writes ----------------------------------------------------------

    def writable_now(self, limit: int) -> bool:
        """True if a frame may be written now without exceeding ``limit`` (see send_nowait)."""
        return (
            # Only the gateway sends data frames, never fragmented: no fragmented send
            # of websockets' to interleave with.
            self.protocol.state is State.OPEN
            and self.transport.get_write_buffer_size() + self._gathered <= limit
        )

    def send_nowait(self, data: bytes, text: bool, limit: int) -> bool:
        """Write one frame if the write buffer is under ``limit``; else return False.

        What ``websockets.broadcast()`` does, but only under the limit (past it the frame
        waits in the gateway's bounded queue). The first frame of an event-loop pass is
        written at once, for latency; the ones after it in the same pass are gathered and
        written together when the pass ends (see :class:`PassEnd`), or as soon as they
        reach the limit: one system call for a burst. Anything websockets sends itself (a
        ping, a pong, the close) writes the gathered frames first, so the order is kept.

        Without extensions the frame is made here, once per payload for every connection
        it is sent to (a fan-out hands each the same bytes object), and written to the
        transport: websockets' protocol would build and serialize a frame per connection.
        With one (permessage-deflate) websockets makes it, in the order sent.
        """
        protocol = self.protocol
        out = self.out
        # Only the gateway sends data frames, never fragmented: no fragmented send of
        # websockets' to interleave with.
        if protocol.state is not State.OPEN or out is None:
            return False
        # The asyncio transport under the counting one: what CountingTransport.write and
        # get_write_buffer_size do, inline (this runs once per delivery).
        transport = out._t
        gathered = self._gathered
        if transport.get_write_buffer_size() + gathered > limit:
            return False
        passes = self._passes
        if protocol.extensions:
            if text:
                protocol.send_text(data)
            else:
                protocol.send_binary(data)
            frame = b"".join(protocol.data_to_send())
        elif passes.data is data and passes.text is text:
            frame = passes.frame
        else:
            frame = passes.frame = server_frame(data, text)
            passes.data = data
            passes.text = text
        number = passes.number
        if self._pass == number:
            # A frame went out at once in this pass already: this one is gathered.
            gather = self._gather
            if gather is None:
                gather = self._gather = []
                passes.gathering(self)
            gather.append(frame)
            gathered += len(frame)
            self._gathered = gathered
            if gathered >= limit:
                self._write_gathered()
            return True
        self._pass = number
        if not passes.scheduled:
            passes.wrote(self.loop)
        n = len(frame)
        out.written += n
        if out.lost or transport.is_closing():
            # Discarded, as CountingTransport.write does: it never reaches the socket, and
            # stays unsent (it ends past what the socket took).
            out.discarded += n
        else:
            transport.write(frame)
            if self._inflight is None and not transport.get_write_buffer_size():
                # Everything written so far has reached the socket (the usual case).
                out.known = out.written - out.discarded
                return True
        inflight = self._inflight
        if inflight is None:
            inflight = self._inflight = deque()
        inflight.append(out.written)
        return True

    async def wait_writable(self, limit: int) -> None:
        """Return once a frame may be written under ``limit``, or the connection closed."""
        while self.protocol.state is State.OPEN and not self.writable_now(limit):
            if self._gathered:
                self._write_gathered()
                continue
            waiter = self.loop.create_future()
            waiters = self._waiters
            if waiters is None:
                waiters = self._waiters = []
            waiters.append(waiter)
            try:
                await waiter
            finally:
                with contextlib.suppress(ValueError):
                    waiters.remove(waiter)
                if not waiters and self._waiters is waiters:
                    self._waiters = None

    def _wake(self) -> None:
        for waiter in self._waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def pass_ended(self) -> None:
        """The event-loop pass ended (:class:`PassEnd`): write what was gathered in it."""
        self._write_gathered()
        self._gather = None

    def send_data(self) -> None:
        """Write what the protocol holds, our gathered frames first, in one call.

        websockets writes each chunk on its own: one system call per pong when a read
        held thousands of pings. All of them go in one ``writelines``.
        """
        self._write_gathered()

    def _write_gathered(self) -> None:
        gather = self._gather
        self._gathered = 0
        chunks = self.protocol.data_to_send()
        out = self.out
        assert out is not None
        if not gather:
            if chunks:
                self._write_chunks(out, chunks)
            return
        # Our frames first, then what websockets queued (written through send_data, which
        # comes here): where each of ours ends in the stream is known exactly.
        start = out.written
        discarded = out.discarded
        if chunks and all(chunks):
            out.writelines([*gather, *chunks])
        else:
            out.writelines(gather)
            if chunks:
                self._write_chunks(out, chunks)
        if (
            self._inflight is None
            and out.discarded == discarded
            and not out.lost
            and not out.get_write_buffer_size()
        ):
            # Everything written so far has reached the socket (what a reset leaves
            # counted written; see CountingTransport.lose). Frames a closing transport
            # discarded stay unsent.
            out.known = out.written - out.discarded
        else:
            inflight = self._inflight
            if inflight is None:
                inflight = self._inflight = deque()
            for frame in gather:
                start += len(frame)
                inflight.append(start)
        gather.clear()

    @staticmethod
    def _write_chunks(out: CountingTransport, chunks: list[bytes]) -> None:
        if all(chunks):
            out.writelines(chunks)
            return
        # An end of stream among them (the close handshake finished): websockets' own way.
        for chunk in chunks:
            if chunk:
                out.write(chunk)
            elif out.can_write_eof():
                # As websockets does: write_eof() documents no exceptions, and some loops
                # raise when the transport is closing.
                with contextlib.suppress(Exception):
                    out.write_eof()
            else:
                out.close()

    def unsent(self) -> int:
        """Frames given to :meth:`send_nowait` that have not reached the socket yet.

        Frames still gathered, in the transport's buffer, or discarded by an abort count;
        once the connection is closed the figure is final.
        """
        inflight = self._inflight
        gather = self._gather
        unsent = len(gather) if gather else 0
        if inflight is None:
            return unsent
        out = self.out
        assert out is not None
        flushed = out.flushed
        while inflight and inflight[0] <= flushed:
            inflight.popleft()
        if not inflight:
            self._inflight = None
            return unsent
        return unsent + len(inflight)


def connection_factory(guard: HandshakeGuard, write_bound: int, max_head: int = 16 * 1024) -> Any:
    """Return what to pass as ``create_connection`` to websockets' ``serve``."""
    return functools.partial(
        EdgeConnection, guard=guard, write_bound=write_bound, max_head=max_head, passes=PassEnd()
    )


def check_internals() -> list[str]:
    """Return what this module needs from websockets and did not find (empty: all there)."""
    problems: list[str] = []

    def need(owner: object, name: str, what: str) -> None:
        if not hasattr(owner, name):
            problems.append(f"{getattr(owner, '__qualname__', owner)}.{name} ({what}) is gone")

    for name in (
        "data_received",
        "eof_received",
        "connection_made",
        "connection_lost",
        "resume_writing",
    ):
        need(ServerConnection, name, "asyncio.Protocol callback we extend")
    # Reading is paused while part of a read waits (FEED_BYTES), and resumed only if
    # websockets' own flow control (its queue of frames) has not paused the same transport.
    from websockets.asyncio.messages import Assembler

    made = inspect.getsource(Connection.connection_made)
    if "self.recv_messages = Assembler(" not in made or (
        "pause=transport.pause_reading" not in made
    ):
        problems.append(
            "websockets no longer pauses reading through Connection.recv_messages "
            "(an Assembler given transport.pause_reading)"
        )
    # EdgeConnection.receive takes a whole frame off the assembler's queue itself.
    from websockets.asyncio.messages import SimpleQueue

    if "self.queue" not in inspect.getsource(
        SimpleQueue.__init__
    ) or "self.queue.popleft()" not in inspect.getsource(SimpleQueue.get):
        problems.append("websockets' SimpleQueue no longer keeps its items in a deque, self.queue")
    assembler_get = inspect.getsource(Assembler.get)
    assembler_init = inspect.getsource(Assembler.__init__)
    if (
        "self.frames" not in assembler_init
        or "SimpleQueue()" not in assembler_init
        or "self.get_in_progress" not in assembler_get
        or "self.frames.get(" not in assembler_get
        or "self.maybe_resume()" not in assembler_get
        or ".decode()" not in assembler_get
    ):
        problems.append(
            "websockets' Assembler.get no longer takes frames from self.frames, guarded by "
            "get_in_progress, resuming with maybe_resume and decoding text with .decode()"
        )
    if "self.paused = " not in inspect.getsource(Assembler.__init__):
        problems.append("websockets' Assembler no longer says whether it paused reading")
    need(ServerConnection, "send_data", "the one place websockets writes the protocol's output")
    need(ServerConnection, "handshake", "the opening handshake we wrap")
    handshake = inspect.getsource(ServerConnection.handshake)
    if not 0 <= handshake.find("process_request(") < handshake.find(".accept("):
        problems.append(
            "ServerConnection.handshake no longer runs process_request before negotiating "
            "(the subprotocol caps must come first)"
        )
    if not dataclasses.is_dataclass(Response):
        problems.append("websockets.http11.Response is no longer a dataclass (HEAD drops its body)")
    need(Connection, "wait_closed", "waits for the TCP connection to end")
    # asyncio: a transport that fails empties its write buffer before connection_lost
    # (CountingTransport.lose counts from the last look instead of the buffer then).
    from asyncio import selector_events

    transport_class = getattr(selector_events, "_SelectorTransport", None)
    force_close = getattr(transport_class, "_force_close", None)
    if force_close is None or "self._buffer.clear()" not in inspect.getsource(force_close):
        problems.append(
            "asyncio's _SelectorTransport._force_close no longer empties the write buffer "
            "(CountingTransport.lose would count too much dropped after a reset)"
        )
    # The edge drops the response of an open connection (EdgeConnection.handshake).
    if inspect.getsource(Connection).count("self.response") != 1 or inspect.getsource(
        ServerConnection
    ).count("self.response") != handshake.count("self.response"):
        problems.append(
            "websockets reads a connection's response outside the opening handshake (the "
            "edge drops it once the connection is open)"
        )
    if "self.loop = " not in inspect.getsource(Connection.__init__):
        problems.append("websockets' Connection no longer keeps its event loop in self.loop")
    if "self.extensions" not in inspect.getsource(Protocol.__init__):
        problems.append(
            "websockets' Protocol no longer lists its extensions in self.extensions (the "
            "edge frames data itself only when there are none)"
        )
    need(Protocol, "send_text", "queues a text frame without I/O")
    need(Protocol, "send_binary", "queues a binary frame without I/O")
    need(Protocol, "data_to_send", "takes the queued output")
    need(Protocol, "fail", "fails the connection with a close code")
    need(State, "OPEN", "the open state")
    init = inspect.signature(ServerConnection.__init__).parameters
    for name in ("protocol", "server", "write_limit", "max_queue"):
        if name not in init:
            problems.append(f"ServerConnection.__init__ no longer takes {name!r}")
    from websockets.asyncio import server as ws_server

    if "create_connection" not in inspect.signature(ws_server.serve).parameters:
        problems.append("websockets.asyncio.server.serve no longer takes create_connection")
    source = inspect.getsource(Connection)
    if source.count("data_to_send()") != 1:
        problems.append("websockets takes the protocol's output somewhere besides send_data()")
    if source.count("self.send_data()") < 3:
        problems.append("websockets no longer writes everything through send_data()")
    if "self.transport" not in source:
        problems.append("websockets' Connection no longer writes through self.transport")
    if "self.transport = transport" not in inspect.getsource(Connection.connection_made):
        problems.append("Connection.connection_made no longer stores self.transport")
    from asyncio import base_events, selector_events

    # asyncio: the doorman replaces the factory of a server not serving yet, and the edge
    # bounds a pass by the backlog it gives (see install_doorman and listen_backlog).
    start = getattr(base_events.Server, "_start_serving", None)
    if (
        start is None
        or "self._protocol_factory = " not in inspect.getsource(base_events.Server.__init__)
        or "self._protocol_factory" not in inspect.getsource(start)
    ):
        problems.append(
            "asyncio.Server no longer keeps its protocol factory in _protocol_factory "
            "(the doorman would not be installed)"
        )
    accept = getattr(selector_events.BaseSelectorEventLoop, "_accept_connection", None)
    if accept is None or "for _ in range(backlog)" not in inspect.getsource(accept):
        problems.append(
            "asyncio's accept loop no longer accepts `backlog` connections per pass "
            "(ACCEPTS_PER_PASS would not bound a pass)"
        )
    return problems
