"""Every ``picows`` internal the edge relies on, in this one module.

The edge needs more than picows' public API (``ws_create_server`` and a ``WSListener``):

- it bounds each read to :data:`FEED_BYTES`: picows doubles its read buffer whenever a read
  fills it, and parses a whole buffer in one call, so a client that floods small frames
  would grow the buffer to the kernel's socket buffer (megabytes) and hold the event loop
  for every frame in it;
- it answers a request that is not a GET with 405 itself (picows answers 400, with the
  method in the body), before picows parses it;
- it counts connections still in the opening handshake and caps them (the
  :class:`HandshakeGuard`), which picows does not;
- it learns why a connection was lost (picows tells its listener nothing).

All of it is done by :class:`EdgeProtocol`, a subclass of picows' ``WSProtocol`` (not in
picows' public API) built with the constructor arguments ``ws_create_server`` gives it, and
served with ``loop.create_server`` (:func:`protocol_factory`).
:func:`check_internals` lists what this module reads or overrides; the test
``tests/wsbus_picows/test_internals.py::test_picows_internals_we_rely_on_are_there`` fails
with its message when a picows release moves one of them. Supported: picows 2.3.x (see
docs/picows.md).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import picows
from picows import picows as _picows_impl

__all__ = [
    "FEED_BYTES",
    "PARSING",
    "EdgeProtocol",
    "HandshakeGuard",
    "Parsing",
    "QuietLogger",
    "RateLimitedLog",
    "check_internals",
    "protocol_factory",
]

log = logging.getLogger("wsbus.picows")

WSProtocol: Any = getattr(_picows_impl, "WSProtocol", None)  # not in picows' stubs

FEED_BYTES: Final = 16 * 1024
"""Bytes read from a connection's socket at most per event-loop pass.

picows parses everything a read gave it in one call, and grows its read buffer (doubling
it) whenever a read fills it: under a flood of small frames the buffer would grow to what
the kernel holds (megabytes, hundreds of thousands of frames in one pass). 16 KiB of empty
pings (2,730 frames, 6 bytes each) is a few milliseconds of work."""

READ_BUFFER: Final = 2048
"""The read buffer a connection starts with (picows' smallest): it grows as frames need, and
an idle connection keeps only this."""

_RESPONSE_405: Final = (
    b"HTTP/1.1 405 Method Not Allowed\r\n"
    b"Allow: GET\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 28\r\n"
    b"Cache-Control: no-store\r\n"
    b"X-Content-Type-Options: nosniff\r\n"
    b"Connection: close\r\n\r\n"
    b"method not allowed: use GET\n"
)


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


class QuietLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """picows' logger, speaking at the levels a wsbus operator wants.

    picows logs every accepted and lost connection at INFO and a client's protocol
    violation at ERROR ("WS parser error"): at wsbus' levels the first is DEBUG and the
    second the client's doing, INFO. Its own failures (with a traceback) stay ERROR. An
    adapter rather than a ``logging.Logger``: picows makes a child ``Logger`` per
    connection for a ``Logger``, kept for the life of the process.
    """

    _CLIENT_FAULTS: Final = ("WS parser error", "on_ws_frame raised WSProtocolError")

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        """Log ``msg`` at wsbus' level for it."""
        if level == logging.INFO:
            level = logging.DEBUG
        elif (
            level == logging.ERROR
            and isinstance(msg, str)
            and msg.startswith(self._CLIENT_FAULTS)
            and not kwargs.get("exc_info")
        ):
            level = logging.INFO
        super().log(level, msg, *args, **kwargs)


class Parsing:
    """The :class:`EdgeProtocol` whose request picows is parsing now, if any.

    picows calls the listener factory with the request only, from the protocol's
    ``buffer_updated``: the edge finds the connection (its peer, its handshake count) here.
    """

    __slots__ = ("protocol",)

    def __init__(self) -> None:
        self.protocol: EdgeProtocol | None = None


PARSING: Final = Parsing()
"""Set while an :class:`EdgeProtocol` in its handshake hands a read to picows."""


class HandshakeGuard:
    """Counts connections whose request has not arrived whole yet, and caps them.

    A new connection over the cap drops the oldest one still waiting for its request (a
    real client sends it with the connection, so it leaves the count at its first read).
    Connections are counted by their :class:`EdgeProtocol`; one leaves when its request is
    whole or it is lost. picows' ``websocket_handshake_timeout`` drops the ones that wait
    too long.

    Args:
        cap: connections in the handshake at most.
        report: logs evictions, once per interval.
    """

    def __init__(self, cap: int, report: RateLimitedLog) -> None:
        self.cap = cap
        self.evicted = 0
        self._report = report
        self._closed = False
        # Insertion-ordered: the first key is the oldest.
        self._pending: dict[EdgeProtocol, None] = {}

    @property
    def pending(self) -> int:
        """Connections in the opening handshake now."""
        return len(self._pending)

    def enter(self, protocol: EdgeProtocol) -> None:
        """A connection was accepted: count it, dropping an older one over the cap."""
        if self._closed:
            protocol.abort()
            return
        pending = self._pending
        while len(pending) >= self.cap:
            oldest = next(iter(pending))
            del pending[oldest]
            self.evicted += 1
            self._report.warning(
                "handshake cap",
                "%d connections are in the opening handshake (max_handshakes); dropped "
                "one from %s that had not sent its request. Many of these mean a slow "
                "network or a slow-request attack",
                self.cap,
                oldest.peer,
            )
            oldest.abort()
        pending[protocol] = None

    def leave(self, protocol: EdgeProtocol) -> None:
        """The connection's request arrived whole, or the connection ended."""
        self._pending.pop(protocol, None)

    def close(self) -> None:
        """Drop every connection still in the handshake, and any that comes later."""
        self._closed = True
        while self._pending:
            self._pending.popitem()[0].abort()


class EdgeProtocol(WSProtocol):  # type: ignore[misc]
    """picows' protocol for one connection, with the edge's bounds.

    Args:
        guard: counts connections in the handshake.
        lost: called with the listener and the exception when the connection is lost.
        *args: picows' ``WSProtocol`` arguments (see :func:`install_factory`).
    """

    __slots__ = ("_first", "_guard", "_lost", "_raw", "_view", "peer")

    def __init__(
        self,
        guard: HandshakeGuard,
        lost: Callable[[Any, Exception | None], None],
        *args: Any,
    ) -> None:
        super().__init__(*args)
        self._guard = guard
        self._lost = lost
        self._raw: asyncio.Transport | None = None
        # The request's first bytes (to refuse what is not a GET), until checked.
        self._first: bytes | None = b""
        self._view: memoryview | None = None
        self.peer = "?"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Count the connection in the handshake, then let picows set it up."""
        # uvloop's transports are not asyncio.Transport subclasses: not checked.
        self._raw = transport  # type: ignore[assignment]
        address = transport.get_extra_info("peername")
        if isinstance(address, tuple) and len(address) >= 2:
            self.peer = f"{address[0]}:{address[1]}"
        self._guard.enter(self)
        if not transport.is_closing():
            super().connection_made(transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        """Return picows' read buffer, at most :data:`FEED_BYTES` of it (see FEED_BYTES)."""
        view: memoryview = super().get_buffer(sizehint)
        if len(view) > FEED_BYTES:
            view = view[:FEED_BYTES]
        if self._first is not None:
            self._view = view
        return view

    def buffer_updated(self, nbytes: int) -> None:
        """Refuse anything but GET at the request line's first bytes; then picows parses."""
        first = self._first
        if first is not None:
            view = self._view
            assert view is not None
            first += bytes(view[: min(nbytes, 4 - len(first))])
            if len(first) < 4 and b"GET "[: len(first)] == first:
                self._first = first
            else:
                self._first = None
                self._view = None
                if first != b"GET ":
                    self._guard.leave(self)
                    raw = self._raw
                    assert raw is not None
                    raw.write(_RESPONSE_405)
                    raw.close()
                    return
        if self.listener is None:
            # Still in the handshake: the listener factory may run in this call.
            PARSING.protocol = self
            try:
                super().buffer_updated(nbytes)
            finally:
                PARSING.protocol = None
            return
        super().buffer_updated(nbytes)
        transport = self.transport
        if transport.is_close_frame_sent and self._raw is not None:
            # The connection is closing (picows failed it, or the edge closed it): read
            # no more of it; picows would parse on.
            self._raw.pause_reading()

    def handshake_done(self) -> None:
        """The request is whole: the connection leaves the handshake count."""
        self._guard.leave(self)

    def abort(self) -> None:
        """Drop the connection at once."""
        if self._raw is not None:
            self._raw.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        """Tell the listener why, then let picows end the connection."""
        self._guard.leave(self)
        listener = self.listener
        if listener is not None:
            self._lost(listener, exc)
        if self.transport is not None:
            super().connection_lost(exc)


def protocol_factory(
    guard: HandshakeGuard,
    lost: Callable[[Any, Exception | None], None],
    listener_factory: Callable[[Any], Any],
    logger: logging.LoggerAdapter,  # type: ignore[type-arg]
    *,
    handshake_timeout: float,
    max_frame_size: int,
) -> Callable[[], EdgeProtocol]:
    """Return what to give ``loop.create_server``: it builds an EdgeProtocol per connection.

    The arguments are ``WSProtocol``'s, in the order ``picows.ws_create_server`` passes
    them (checked by :func:`check_internals`): no auto-ping (the edge pings, and closes
    with 1011, not picows' 1001) and no auto-pong (the edge answers pings itself, gathered
    in one write per read).
    """
    args = (
        None,  # host and port: a client's
        None,  # path: a client's
        False,  # is_client_side
        listener_factory,
        logger,
        True,  # disconnect_on_exception
        handshake_timeout,
        False,  # enable_auto_ping
        20.0,  # auto_ping_idle_timeout (unused)
        20.0,  # auto_ping_reply_timeout (unused)
        picows.WSAutoPingStrategy.PING_WHEN_IDLE,
        False,  # enable_auto_pong
        max_frame_size,
        None,  # extra_headers: a client's
        READ_BUFFER,  # read_buffer_init_size
    )

    def make() -> EdgeProtocol:
        return EdgeProtocol(guard, lost, *args)

    return make


def check_internals() -> list[str]:
    """Return what this module needs from picows and asyncio and did not find."""
    problems: list[str] = []
    version = getattr(picows, "__version__", "?")
    if not str(version).startswith("2.3."):
        problems.append(f"picows {version} is not a tested release (2.3.x)")
    if WSProtocol is None or not issubclass(WSProtocol, asyncio.BufferedProtocol):
        problems.append("picows.picows.WSProtocol is gone or no longer a BufferedProtocol")
        return problems
    for name in ("get_buffer", "buffer_updated", "connection_made", "connection_lost"):
        if not callable(getattr(WSProtocol, name, None)):
            problems.append(f"WSProtocol.{name} (a callback we extend) is gone")
    for name in ("transport", "listener"):
        if not hasattr(WSProtocol, name):
            problems.append(f"WSProtocol.{name} is gone")
    from picows import api

    source = inspect.getsource(api.ws_create_server)
    # The constructor's arguments, in the order protocol_factory gives them.
    expected = (
        "None, # host+port None, # ws_path False, # is_client_side ws_listener_factory, "
        '_resolve_logger(logger_name, "server"), disconnect_on_exception, '
        "websocket_handshake_timeout, enable_auto_ping, auto_ping_idle_timeout, "
        "auto_ping_reply_timeout, auto_ping_strategy, enable_auto_pong, max_frame_size, "
        "None, # extra_headers, read_buffer_init_size )"
    )
    if expected not in " ".join(source.split()):
        problems.append(
            "picows.api.ws_create_server no longer builds WSProtocol with the arguments "
            "wsbus_picows._protocol.protocol_factory passes"
        )
    pyx = Path(_picows_impl.__file__).with_name("picows.pyx")
    try:
        negotiate = pyx.read_text(encoding="utf-8")
    except OSError:
        problems.append(f"{pyx} is missing: the checks of picows' handshake cannot be made")
    else:
        # The edge rewrites "Connection: keep-alive, Upgrade" in the request the listener
        # factory gets: picows must check that same request after the factory.
        factory = negotiate.find("listener_factory(upgrade_request)")
        validate = negotiate.find("_validate_upgrade_request(upgrade_request)")
        if not 0 <= factory < validate:
            problems.append(
                "picows no longer validates the upgrade request after the listener factory "
                "(the edge's fix of 'Connection: keep-alive, Upgrade' would not apply)"
            )
    return problems
