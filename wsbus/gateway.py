"""The Gateway: the asyncio driver of the sans-I/O sessions; the one place in core that awaits.

What a frame becomes, what is queued and when a connection closes is decided by its
:class:`~wsbus.session.Session`; what an envelope from the bus becomes, by
:class:`~wsbus.outbound.Outbound`. Neither awaits nor reads a clock. The gateway owns the
rest: the tasks, the awaits, the bus and the clocks (``loop.time()``, ``time.time()`` and
``time.monotonic()`` are read here and passed in). Its awaiting parts read the clocks too:
:class:`~wsbus.resuming.Resumer` (history fetches, session records, resumes) and
:class:`~wsbus.aliases.AliasClaims`, as do the service runtime, the in-memory bus and the
hooks' failure log; the pure parts (sessions, Outbound, history, resume, presence,
receipts) never do.

Tasks and their owners:

- a connection's reader is the task the edge calls :meth:`Gateway.serve` in; it owns the
  connection's writer (started when a frame has to wait, ended when the outbox is empty)
  and closer (started when the session decides to close), and cancels and awaits both
  before it returns;
- the gateway owns its report task (control answers and delivery reports to the bus),
  started once the bus has started and ended by :meth:`Gateway.close`.

Every inbound frame and every outbound delivery ends in exactly one counted outcome; see
:class:`Stats` for the identities that hold between the counters.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Final, Literal

import msgspec

from .aliases import AliasClaims
from .bus import (
    Bus,
    ClaimsAliases,
    ListsServices,
    Probes,
    PublishesFresh,
    PublishesNowait,
    ReportsAvailability,
)
from .control import PRESENCE, PROBE
from .edge import (
    ClientConnection,
    ConnectionClosed,
    ReceivesBatch,
    ReceivesRaw,
    ReportsUnsent,
    SendsNowait,
)
from .envelope import ConnId, Envelope, GatewayAddress, IdFactory, NodeId
from .errors import AliasTaken, BusUnavailable, ConfigError, InvalidName, PluginError
from .history import HistoryConfig
from .hooks import HandshakeRequest, Hooks, Identity, Refusal, _FailureLog
from .limits import ErrorBudget, TokenBucket
from .outbound import Outbound
from .plugins import AllowAnonymous
from .registry import DEFAULT_NAME_PATTERN, AliasPolicy, ClientInfo, ClientRegistry
from .resuming import Resumer
from .router import Router
from .session import CloseCode, Session
from .stats import Counters, Stats
from .wire import CLIENT_CONTROL_TYPES, Rejection, WireLimits, decode_client_frame

if TYPE_CHECKING:
    from .tracing import GatewayTracing

__all__ = ["CloseCode", "Gateway", "GatewayConfig", "ResumeSettings", "Stats"]

log = logging.getLogger("wsbus.gateway")

DRAIN_QUIET: Final = 0.05
"""Seconds without a frame read that tell a graceful shutdown the clients' in-flight
frames have all arrived."""

FLUSH_TIMEOUT: Final = 1.0
"""Seconds a closing connection gets to write the frames that explain why it is closed."""

CLOSE_WAIT: Final = 5.0
"""Seconds a connection whose reader has ended waits for its closer (the close handshake)
before the closer is cancelled."""

SETTLE_INTERVAL: Final = 0.1
"""Seconds between two looks at deliveries a connection took and has not sent yet (they
wait in its transport): counted written soon after they reach the socket."""

REPORT_LOG_INTERVAL: Final = 60.0
"""Seconds between two warnings about reports and control answers the bus did not take."""

AUTH_FAILED_REASON: Final = "authentication failed"
"""The one close reason for every authentication failure: it tells an attacker nothing."""

READ_YIELD_BYTES: Final = 16 * 1024
"""A connection's reader gives other tasks a turn after reading this many bytes of frames
without waiting: at most one large frame's work between turns (an echo round trip takes a
few turns), and a yield per about 160 frames of 100 bytes, so typical frames pay nothing."""


class ResumeSettings(msgspec.Struct, frozen=True, kw_only=True):
    """How clients resume a session after a reconnect (see docs/history.md).

    Attributes:
        window: seconds a closed session can be resumed; 0 turns resume off.
        secret: the key resume tokens are signed with, in hex (at least 32 hex digits).
            Every gateway of a cluster must share it for a client to resume on another
            gateway. None: a random key per gateway process (resume on this gateway only,
            and not across its restart).
        max_replay: messages replayed per group at most; a client that missed more is
            told to resync that group.
        max_unacked: deliveries awaiting the client's acknowledgement kept per connection
            for redelivery; past it the oldest is no longer tracked.
    """

    window: float = 120.0
    secret: str | None = None
    max_replay: int = 1000
    max_unacked: int = 256

    def __post_init__(self) -> None:
        if not self.window >= 0:
            raise ConfigError("resume.window must be >= 0 seconds (0 turns resume off)")
        if self.max_replay < 1 or self.max_unacked < 1:
            raise ConfigError("resume.max_replay and resume.max_unacked must be >= 1")
        if self.secret is not None:
            try:
                key = bytes.fromhex(self.secret)
            except ValueError:
                key = b""
            if len(key) < 16:
                raise ConfigError(
                    "resume.secret must be at least 32 hex digits (16 bytes); make one "
                    "with: python -c 'import secrets; print(secrets.token_hex(32))'"
                )

    def __repr__(self) -> str:
        # The secret signs every resume token: never shown in a log or a traceback.
        secret = None if self.secret is None else "***"
        return (
            f"ResumeSettings(window={self.window!r}, secret={secret!r}, "
            f"max_replay={self.max_replay!r}, max_unacked={self.max_unacked!r})"
        )

    @property
    def enabled(self) -> bool:
        """True when clients can resume (the window is not 0)."""
        return self.window > 0


class GatewayConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Every gateway setting, with production defaults.

    Attributes:
        node: this gateway's node id (connection ids start with it); random by default.
        wire: structure caps on client frames.
        outbound_queue: frames a connection may have waiting to be written.
        outbound_bytes: bytes a connection may have waiting to be written: with large
            frames this bound comes first. Past either, the slow-consumer policy applies.
        slow_consumer: what to do when that queue is full: ``close`` the connection with
            4507 (the client missed messages and must resync), or ``drop`` the new message
            and report it undeliverable to its sender.
        rate: messages a second each connection may send, on average.
        burst: messages a connection may send at once.
        rate_limit_close_after: seconds a client may keep being rate limited (with no quiet
            second between refusals) before it is closed with 4429.
        error_budget: rejected frames a connection may send per ``error_window`` before it
            is closed with 4400.
        error_window: the error budget's window, in seconds.
        allow_anonymous: accept clients no authentication plugin accepted.
        auth_frame: when no plugin decided at the handshake, accept a first ``wsbus.auth``
            frame carrying ``{"token": ...}``.
        auth_timeout: seconds to wait for that frame before closing with 4408.
        max_connections: connections beyond this are closed with 1013.
        drain_timeout: seconds a graceful shutdown waits for queues to drain.
        bus_down_close_after: after the bus has been unavailable this long, new clients
            are closed with 1014.
        alias_policy: what happens when a service sets an alias another connection has.
        name_pattern: the pattern aliases, users and group names must match.
        report_queue: control answers and delivery reports waiting to go on the bus.
        history: which groups keep history (positions and replay on resume), and how much.
        presence_frames: patterns of the groups whose members get ``wsbus.presence``
            frames when other members join or leave.
        resume: how clients resume a session after a reconnect.
        tracing: make OpenTelemetry spans for client frames (receive, publish) and for
            envelopes from the bus (deliver), carrying W3C trace context in envelope
            headers (docs/tracing.md). Needs ``pip install 'wsbus[otel]'``; off, the gateway
            never imports OpenTelemetry and pays nothing per message.
    """

    node: str | None = None
    wire: WireLimits = WireLimits()
    outbound_queue: int = 1024
    outbound_bytes: int = 1024 * 1024
    slow_consumer: Literal["close", "drop"] = "close"
    rate: float = 100.0
    burst: int = 200
    rate_limit_close_after: float = 10.0
    error_budget: int = 20
    error_window: float = 60.0
    allow_anonymous: bool = True
    auth_frame: bool = True
    auth_timeout: float = 10.0
    max_connections: int = 10_000
    drain_timeout: float = 5.0
    bus_down_close_after: float = 30.0
    alias_policy: AliasPolicy = AliasPolicy.REFUSE
    name_pattern: str = DEFAULT_NAME_PATTERN
    report_queue: int = 10_000
    history: HistoryConfig = HistoryConfig()
    presence_frames: tuple[str, ...] = ()
    resume: ResumeSettings = ResumeSettings()
    tracing: bool = False

    def __post_init__(self) -> None:
        if (
            self.outbound_queue < 1
            or self.max_connections < 1
            or self.report_queue < 1
            or self.outbound_bytes < self.wire.max_frame_bytes
        ):
            raise ConfigError(
                "outbound_queue, max_connections and report_queue must be >= 1, and "
                "outbound_bytes at least wire.max_frame_bytes"
            )
        if self.slow_consumer not in ("close", "drop"):
            raise ConfigError("slow_consumer must be 'close' or 'drop'")
        if self.wire.max_frame_bytes < 64 or self.wire.max_depth < 2:
            raise ConfigError("wire.max_frame_bytes must be >= 64 and wire.max_depth >= 2")
        if self.wire.max_items < 2:
            # A frame's own type field is one value: fewer would refuse every frame.
            raise ConfigError("wire.max_items must be >= 2 (a frame's type is one value)")
        for name in ("drain_timeout", "auth_timeout", "bus_down_close_after"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0")
        # Fail here, at configuration, rather than on every connection.
        TokenBucket(self.rate, self.burst)
        ErrorBudget(self.error_budget, self.error_window)


class _Settler:
    """Counts deliveries written once they reach the socket, for every session at once.

    A session whose connection holds deliveries in its transport asks to be looked at
    (:meth:`add`, from its driver's ``settle_soon``): it is settled when the event-loop pass
    ends, then every :data:`SETTLE_INTERVAL` seconds while some still wait. One callback
    per pass and one timer for every session, not a ``call_soon`` and a chain of timers
    per connection (a paced fan-out to thousands made one per connection per pass).
    """

    __slots__ = ("_failure_logged", "_later", "_scheduled", "_soon", "_timer")

    def __init__(self) -> None:
        self._soon: list[Session] = []
        self._scheduled = False
        # An ordered set: a session is looked at once per interval.
        self._later: dict[Session, None] = {}
        self._timer: asyncio.TimerHandle | None = None
        # A failing settle is an adapter's bug, the same one each time: one traceback.
        self._failure_logged = False

    def add(self, session: Session) -> None:
        """Settle ``session`` when this pass ends, and after while deliveries wait."""
        self._soon.append(session)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._pass_ended)

    def _pass_ended(self) -> None:
        self._scheduled = False
        soon, self._soon = self._soon, []
        self._settle(soon)

    def _interval_ended(self) -> None:
        self._timer = None
        later, self._later = self._later, {}
        self._settle(later)

    def _settle(self, sessions: Iterable[Session]) -> None:
        later = self._later
        for session in sessions:
            # None: all counted already, or the session ended (discard counted the rest).
            if session.unconfirmed is not None:
                try:
                    session.settle()
                except Exception:
                    # One connection's bug (its adapter's unsent()) must not keep the
                    # others' counts back. Not looked at again until it asks.
                    self._log_failure(session)
                    continue
                if session.unconfirmed is not None:
                    later[session] = None
        if later and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(
                SETTLE_INTERVAL, self._interval_ended
            )

    def _log_failure(self, session: Session) -> None:
        """Log a session's failed settle: the first with its traceback, the others briefly."""
        if not self._failure_logged:
            self._failure_logged = True
            log.exception(
                "counting the frames written to %s failed (its connection's unsent() raised):"
                " its deliveries stay counted pending; later failures are logged at debug level",
                session.conn_id,
            )
        else:
            log.debug("counting the frames written to %s failed again", session.conn_id)


class _Link:
    """Drives one session: reads it frames, writes its outbox, closes its connection.

    It is the session's :class:`~wsbus.session.Driver`, and the owner of the
    connection's writer and closer tasks (at most one of each at a time): the reader
    cancels and awaits them before :meth:`Gateway.serve` returns.
    """

    __slots__ = ("closer", "conn", "flushed", "session", "settler", "writer")

    def __init__(self, conn: ClientConnection, settler: _Settler) -> None:
        self.conn = conn
        self.settler = settler
        self.session: Session
        self.writer: asyncio.Task[None] | None = None
        self.closer: asyncio.Task[None] | None = None
        # Made only when a flushing close has to wait for the writer.
        self.flushed: asyncio.Event | None = None

    def write(self) -> None:
        """Start the writer, unless one is running (it writes what is queued meanwhile)."""
        if self.writer is None and self.session.close_code is None:
            self.writer = asyncio.create_task(
                self._write(), name=f"wsbus-writer-{self.session.conn_id}"
            )

    def close(self) -> None:
        """Start the closer: flush the outbox if the session says so, then close."""
        if self.closer is None:
            self.closer = asyncio.create_task(
                self._close(), name=f"wsbus-closer-{self.session.conn_id}"
            )

    def settle_soon(self) -> None:
        """Look at the frames waiting in the transport when this pass ends, and after."""
        self.settler.add(self.session)

    async def _write(self) -> None:
        """Write the outbox out in order, then end: the next queued frame starts another."""
        session = self.session
        outbox = session.outbox
        send = self.conn.send
        try:
            while outbox:
                if session.close_code is not None and not session.flushing:
                    return
                await send(outbox[0][0])
                session.written()
        except ConnectionClosed:
            return
        except Exception as exc:
            # A bug in the connection adapter: writing again would repeat the same frame.
            log.error(
                "writing to %s failed (%r); closing it: this is a bug in the connection adapter %s",
                session.conn_id,
                exc,
                type(self.conn).__name__,
                exc_info=exc,
            )
            session.close(CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            self._writer_ended()

    def _writer_ended(self) -> None:
        """Forget the writer and wake a flushing close that waits for it."""
        self.writer = None
        if self.flushed is not None:
            self.flushed.set()

    async def _close(self) -> None:
        session = self.session
        if session.flushing:
            try:
                async with asyncio.timeout(FLUSH_TIMEOUT):
                    while session.outbox and self.writer is not None:
                        if self.flushed is None:
                            self.flushed = asyncio.Event()
                        self.flushed.clear()
                        await self.flushed.wait()
            except TimeoutError:
                pass
            # A writer still blocked on a slow client stops after its current frame.
            session.flush_ended()
        code = session.close_code
        assert code is not None
        try:
            await self.conn.close(code, session.close_reason)
        except Exception:
            log.debug("closing %s failed", session.conn_id, exc_info=True)

    async def stop_writer(self) -> None:
        """Cancel the writer, if one runs, and await it."""
        writer = self.writer
        if writer is not None:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            # A writer cancelled before it ran never reached its own clean-up; without it a
            # flushing close would wait FLUSH_TIMEOUT.
            self._writer_ended()

    async def stop(self) -> None:
        """Stop the writer; give the closer up to CLOSE_WAIT seconds, then cancel it."""
        await self.stop_writer()
        closer = self.closer
        if closer is not None:
            await asyncio.wait({closer}, timeout=CLOSE_WAIT)
            closer.cancel()
            await asyncio.gather(closer, return_exceptions=True)


class _Reporter:
    """Sends the gateway's answers and reports to the bus, in order, from one owned task.

    None of them ever waits for room: a report that waited for a full inbox would hold up
    every control answer after it, for every service (whose handlers may be awaiting
    them). So a bus that can say "would have to wait" is asked with ``publish_nowait``,
    and such a report is lost (counted, logged), as one the bus refuses is.
    """

    def __init__(self, bus: Bus, size: int, counters: Counters) -> None:
        self._bus = bus
        self._counters = counters
        # Reports made before start() (while the bus starts) wait here.
        self._queue: asyncio.Queue[Envelope] = asyncio.Queue(size)
        self._task: asyncio.Task[None] | None = None
        self._log = _FailureLog(REPORT_LOG_INTERVAL)

    def start(self, publish_nowait: Callable[[Envelope], bool] | None) -> None:
        """Start the task that sends what is queued (``publish_nowait``: the bus's)."""
        self._task = asyncio.create_task(self._send(publish_nowait), name="wsbus-reports")

    async def stop(self) -> None:
        """Send what is queued (for up to a second), then end the task."""
        if self._task is None:
            return
        try:
            async with asyncio.timeout(1.0):
                await self._queue.join()
        except TimeoutError:
            log.warning("shutdown: %d reports were not sent", self._queue.qsize())
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None

    def post(self, envelopes: deque[Envelope]) -> None:
        """Queue answers and reports (emptying ``envelopes``); count those with no room."""
        queue = self._queue
        counters = self._counters
        while envelopes:
            envelope = envelopes.popleft()
            presence = envelope.type == PRESENCE
            if presence:
                counters.presence_events += 1
            try:
                queue.put_nowait(envelope)
            except asyncio.QueueFull:
                self._lost(envelope, "the gateway's report queue is full")
            else:
                if presence:
                    counters.presence_events_queued += 1

    async def _send(self, publish_nowait: Callable[[Envelope], bool] | None) -> None:
        queue = self._queue
        while True:
            envelope = await queue.get()
            presence = envelope.type == PRESENCE
            try:
                if publish_nowait is None:
                    await self._bus.publish(envelope)
                elif publish_nowait(envelope) is False:
                    self._lost(envelope, "its inbox is full (the service is busy)")
                    continue
                if presence:
                    self._counters.presence_events_sent += 1
            except Exception as exc:
                self._lost(envelope, str(exc))
            finally:
                if presence:
                    self._counters.presence_events_queued -= 1
                queue.task_done()

    def _lost(self, envelope: Envelope, why: str) -> None:
        """Count a report or answer the bus did not take; warn once a minute at most."""
        if envelope.type == PRESENCE:
            # Its own count: nobody waits for an event, and most have nobody listening.
            self._counters.presence_events_lost += 1
            return
        self._counters.reports_lost += 1
        count = self._log.admit("reports", time.monotonic())
        if count is None:
            return
        log.warning(
            "could not send %s to service %r: %s (%d reports and answers lost since the "
            "last warning; Stats.reports_lost counts them all)",
            envelope.type,
            getattr(envelope.to, "name", "?"),
            why,
            max(count, 1),
        )


class Gateway:
    """Connects client connections to a bus, safely.

    Args:
        bus: the bus to publish client messages on and take service messages from.
        config: settings; :class:`GatewayConfig` defaults when omitted.
        plugins: plugin objects to register, in order, after those from entry points.
        entry_points: load plugins from the ``wsbus`` entry-point group.
        clock: the wall clock (seconds since the epoch) the gateway stamps envelopes,
            session records, joins and resume counts with; ``time.time`` unless a test
            moves time itself (pass the same clock to a ``MemoryBus``).

    Use it as an async context manager, or call :meth:`start` and :meth:`close`. Edge
    adapters call :meth:`serve` with each connection.
    """

    def __init__(
        self,
        bus: Bus,
        *,
        config: GatewayConfig | None = None,
        plugins: Iterable[object] = (),
        entry_points: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.bus = bus
        self._clock = clock
        self.config = config if config is not None else GatewayConfig()
        self._node = NodeId(self.config.node or os.urandom(3).hex())
        if "." in self._node:
            raise ConfigError(f"node id {self._node!r} must not contain '.'")
        self.address = GatewayAddress(self._node)
        self.registry = ClientRegistry(
            alias_policy=self.config.alias_policy, name_pattern=self.config.name_pattern
        )
        self.router = Router(self.registry)
        # One bound method for every session (each would otherwise hold its own).
        self.hooks = Hooks(plugins, entry_points=entry_points)
        if self.config.allow_anonymous:
            self.hooks.register(AllowAnonymous(), name="wsbus.allow_anonymous")
        self._counters = Counters.zero()
        # Every open session, those still authenticating too: the one record of them.
        self._sessions: dict[ConnId, Session] = {}
        self._settler = _Settler()
        self._serial = itertools.count(1)
        self._ids = IdFactory(f"{self._node}")
        self._next_id = self._ids.next  # one bound method for every session
        self._outbound = Outbound(
            self._node,
            self._sessions,
            self.registry,
            self.router,
            self.hooks,
            self._counters,
            self._ids,
            presence_frames=self.config.presence_frames,
        )
        self._outbound.post = self._post_reports
        # Tracing is chosen once, here and per connection (_read): off, nothing per message.
        self._tracing: GatewayTracing | None = None
        if self.config.tracing:
            from .tracing import GatewayTracing

            self._tracing = GatewayTracing(self._node, self._counters)
            # The bus calls gateway.deliver: the traced one, from the start.
            self.deliver = self._tracing.deliverer(self.deliver)  # type: ignore[method-assign,assignment]
        self._state: Literal["new", "running", "closing", "closed"] = "new"
        self._publish_nowait: Callable[[Envelope], bool] | None = None
        self._availability: ReportsAvailability | None = None
        # Probes sent round the bus and not back yet, by envelope id (see probe()).
        self._probes: dict[str, asyncio.Future[float]] = {}
        self._outbound.probed = self._probe_back
        self._reporter = _Reporter(bus, self.config.report_queue, self._counters)
        # A bus whose link flaps must not flood the log: once per reason, then at most
        # once a minute with a count.
        self._gap_log = _FailureLog(REPORT_LOG_INTERVAL)
        # Set at start when the bus keeps aliases unique across gateways.
        self._aliases: AliasClaims | None = None
        self._bus_down_since: float | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        # History in order, session records and resumes (docs/history.md).
        self._resumer = Resumer(
            self.config,
            self.registry,
            self._sessions,
            self._outbound,
            self._counters,
            self._route,
            self._post_reports,
            self._next_id,
            clock,
        )

    @property
    def node(self) -> NodeId:
        """This gateway's node id."""
        return self._node

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start the bus and begin accepting connections.

        If the bus fails to start, the error propagates and nothing is left running.
        """
        if self._state != "new":
            raise ConfigError("a gateway can be started once")
        bus = self.bus
        # The bus's optional fast path, looked for once (see wsbus.bus).
        self._publish_nowait = bus.publish_nowait if isinstance(bus, PublishesNowait) else None
        self._availability = bus if isinstance(bus, ReportsAvailability) else None
        if isinstance(bus, ClaimsAliases):
            self._aliases = AliasClaims(
                bus,
                self.registry,
                self._outbound,
                self._counters,
                self._post_reports,
                self._clock,
                time.monotonic,
            )
            self._outbound.claims = True
        self._resumer.attach(bus)
        # Reports made while the bus starts wait in the reporter's queue until it starts.
        await bus.start(self)
        self._reporter.start(self._publish_nowait)
        self._state = "running"
        log.info("gateway %s started", self._node)

    async def close(self) -> None:
        """Shut down gracefully; returns when every connection is closed.

        New connections are refused with 1001; frames read from now on are answered
        ``shutting_down``; queues drain for up to ``drain_timeout`` seconds; then every
        connection is closed with 1001 and the bus is closed.
        """
        if self._state in ("closing", "closed"):
            return
        was_running = self._state == "running"
        self._state = "closing"
        sessions = self._sessions
        for session in sessions.values():
            session.shutting_down = True
        await self._drain()
        for session in list(sessions.values()):
            session.close(CloseCode.GOING_AWAY, "server shutting down")
        try:
            async with asyncio.timeout(self.config.drain_timeout + 5.0):
                await self._idle.wait()
        except TimeoutError:
            log.warning("%d connections did not close in time", len(sessions))
        if self._aliases is not None:
            # The connections' releases, and answers to alias requests, before the reports
            # stop and the bus closes.
            await self._aliases.close(self.config.drain_timeout + 1.0)
        # The closed connections' session records, before the bus closes.
        await self._resumer.close()
        await self._reporter.stop()
        if was_running:
            await self.bus.close()
        self._state = "closed"
        log.info("gateway %s closed", self._node)

    async def _drain(self) -> None:
        """Wait up to ``drain_timeout`` for the queues to empty and the clients to go quiet.

        Frames clients had in flight (one was read within the last DRAIN_QUIET seconds)
        are answered, so they end refused, not lost. Polling is fine here: it runs once,
        at shutdown, and is bounded by the deadline.
        """
        loop = asyncio.get_running_loop()
        counters = self._counters
        quiet_since = loop.time()
        deadline = quiet_since + self.config.drain_timeout
        seen = counters.frames_received
        while (now := loop.time()) < deadline:
            if counters.frames_received != seen:
                seen, quiet_since = counters.frames_received, now
            if (
                now - quiet_since >= DRAIN_QUIET
                and not counters.frames_in_flight
                and not any(s.outbox for s in self._sessions.values() if s.close_code is None)
            ):
                return
            await asyncio.sleep(0.01)

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def open_connections(self) -> int:
        """Connections open now, counting those still authenticating."""
        return len(self._sessions)

    @property
    def closing(self) -> bool:
        """True once :meth:`close` has begun."""
        return self._state in ("closing", "closed")

    # -- one connection ------------------------------------------------------------------

    async def serve(self, conn: ClientConnection) -> None:
        """Run one client connection until it closes. Edge adapters call this.

        Authenticates (from the handshake, else from a first ``wsbus.auth`` frame),
        registers the connection, sends ``wsbus.welcome``, then reads and writes until
        the connection ends. Never raises for anything the client does.
        """
        refusal = self._admission()
        if refusal is not None:
            await self._refuse(conn, *refusal)
            return
        conn_id = ConnId(f"{self._node}.{next(self._serial):x}")
        link = _Link(conn, self._settler)
        # The connection's optional fast paths, looked for once (see wsbus.edge).
        session = link.session = Session(
            conn_id,
            conn.codec,
            self.config,
            self._counters,
            self.hooks,
            self.registry.addresses,
            self._next_id,
            send_nowait=conn.send_nowait if isinstance(conn, SendsNowait) else None,
            unsent=conn.unsent if isinstance(conn, ReportsUnsent) else None,
            driver=link,
            report=self._outbound.report,
        )
        # Busy only once the session is made (what fails to make it leaves the gateway as
        # it was), and the slot reserved before the first await, so that concurrent
        # handshakes see it.
        self._idle.clear()
        self._sessions[conn_id] = session
        try:
            identity = await _authenticate(conn, self.hooks, self.config)
            if isinstance(identity, tuple):
                await self._refuse(conn, *identity)
            else:
                await self._run(link, identity)
        finally:
            await link.stop()
            del self._sessions[conn_id]
            if not self._sessions:
                self._idle.set()

    def _admission(self) -> tuple[int, str] | None:
        if self._state != "running":
            return CloseCode.GOING_AWAY, "server shutting down"
        if len(self._sessions) >= self.config.max_connections:
            return CloseCode.TRY_AGAIN_LATER, "server is at its connection limit; retry later"
        since = self._bus_down_since
        if since is not None and self._availability is not None and self._availability.available:
            # The bus says it is back, though no publish has succeeded since.
            self._bus_down_since = since = None
        if since is not None and time.monotonic() - since > self.config.bus_down_close_after:
            return CloseCode.BAD_GATEWAY, "message bus unreachable; retry later"
        return None

    async def _refuse(self, conn: ClientConnection, code: int, reason: str) -> None:
        self._counters.connections_refused += 1
        closes = self._counters.closes_by_code
        closes[code] = closes.get(code, 0) + 1
        try:
            await conn.close(code, reason)
        except Exception:
            log.debug("closing a refused connection failed", exc_info=True)

    async def _run(self, link: _Link, identity: Identity) -> None:
        session = link.session
        conn_id = session.conn_id
        registry = self.registry
        try:
            address = registry.connect(conn_id, user=identity.user)
            if identity.alias is not None:
                await self._set_identity_alias(conn_id, identity.alias)
        except (InvalidName, AliasTaken, BusUnavailable) as exc:
            log.warning("identity for %s not usable: %s", link.conn.request.remote, exc)
            if conn_id in registry:
                registry.disconnect(conn_id)
            if isinstance(exc, BusUnavailable):
                await self._refuse(link.conn, CloseCode.TRY_AGAIN_LATER, "server busy; retry")
            else:
                await self._refuse(link.conn, CloseCode.AUTH_FAILED, AUTH_FAILED_REASON)
            return
        self._counters.connections_total += 1
        session.welcome(address.user, self._resumer.offer(conn_id, address.user))
        self.hooks.client_connected(registry.address(conn_id), link.conn.request)
        code, reason = CloseCode.NORMAL, ""
        try:
            code, reason = await self._read(link)
        finally:
            # Decided first, so that nothing more is queued while the writer stops.
            code, reason = session.ended(code, reason)
            await link.stop_writer()
            session.discard()
            address = registry.address(conn_id)
            info = registry.disconnect(conn_id)
            if info.groups:
                self._outbound.disconnected(info, self._clock())
                self._post_reports()
            self._resumer.closed(session, info, code)
            if self._aliases is not None and address.alias is not None:
                self._aliases.release(conn_id, address.alias)
            self.hooks.client_disconnected(address, code, reason)

    async def _set_identity_alias(self, conn_id: ConnId, alias: str) -> None:
        """Give a connection the alias its authentication named.

        Claimed on the bus first when the bus keeps aliases unique across gateways.

        Raises:
            InvalidName, AliasTaken: the alias cannot be given.
            BusUnavailable: the bus's alias table cannot be reached.
        """
        if self._aliases is None:
            self.registry.set_alias(conn_id, alias)
            return
        try:
            won = await self._aliases.claim(conn_id, alias)
        except asyncio.CancelledError:
            # The claim may have been made: release it once the connection's task is gone.
            self._aliases.release(conn_id, alias)
            raise
        try:
            self.registry.set_alias(conn_id, won, exact=True)
        except AliasTaken:
            self._aliases.release(conn_id, won)
            raise

    async def _read(self, link: _Link) -> tuple[int, str]:
        session = link.session
        conn = link.conn
        # An adapter may hand over every frame it has read at once (one call per read, not
        # per frame), or offer its transport's own receive, untranslated, with a function
        # that translates its errors: one coroutine less per frame (see wsbus.edge).
        receive_batch: Callable[[], Awaitable[list[str | bytes]]]
        translate: Callable[[BaseException], ConnectionClosed | None] | None = None
        if isinstance(conn, ReceivesBatch):
            receive_batch = conn.receive_batch
        else:
            receive: Callable[[], Awaitable[str | bytes]] = conn.receive
            if isinstance(conn, ReceivesRaw):
                receive, translate = conn.raw_receive, conn.closed_error

            async def receive_batch() -> list[str | bytes]:
                return [await receive()]

        counters = self._counters
        publish_nowait = self._publish_nowait
        # A frame no plugin saw is the bus's alone, in JSON's data model (integers within
        # 64 bits under these caps): an in-process bus need not copy it (wsbus.bus).
        bus = self.bus
        publish_fresh: Callable[[Envelope, bool], bool] | None = None
        wait_fresh: Callable[[Envelope], Awaitable[None]] | None = None
        if (
            isinstance(bus, PublishesFresh)
            and publish_nowait is not None
            and self.config.wire.max_integer < 2**63
        ):
            publish_fresh, wait_fresh = bus.publish_fresh_nowait, bus.publish_fresh
        hooks = self.hooks
        take: Callable[[str | bytes, float, float], Envelope | None] = session.receive
        wait_publish: Callable[[Envelope], Awaitable[None]] | None = None
        if self._tracing is not None:
            take, publish_nowait, wait_publish = self._tracing.reader(
                session.conn_id, take, publish_nowait, bus.publish
            )
            publish_fresh = None  # the traced publishes replace the envelope's headers
        loop = asyncio.get_running_loop()
        # asyncio's own loop.time is time.monotonic(): called directly, a Python frame less
        # per frame (another loop, uvloop's, keeps its own clock).
        loop_time = time.monotonic if type(loop).time is asyncio.BaseEventLoop.time else loop.time
        wall_clock = self._clock
        # An adapter's receive returns at once while frames are buffered: without a yield
        # of its own, a client's burst of large frames would hold the loop until it is read.
        unyielded = 0
        # Only the first frame may be wsbus.resume (the resume runs before more is read).
        first = True
        while True:
            try:
                batch = await receive_batch()
            except ConnectionClosed as exc:
                return exc.code, exc.reason
            except Exception as exc:
                closed = translate(exc) if translate is not None else None
                if closed is None:
                    raise
                return closed.code, closed.reason
            # The frames of a batch were read together: one clock reading serves them all,
            # read again after any wait (the rate limit sees them arrive at once), and
            # whether plugins see frames is looked up again then too.
            stale = True
            frames = iter(batch)
            try:
                for data in frames:
                    unyielded += len(data)
                    if unyielded > READ_YIELD_BYTES:
                        unyielded = 0
                        try:
                            await asyncio.sleep(0)  # other connections get a turn
                        except BaseException:
                            # Cancelled: this frame goes down with the connection, counted.
                            counters.frames_received += 1
                            counters.frames_lost += 1
                            raise
                        stale = True
                    if stale:
                        stale = False
                        now = loop_time()
                        wall = wall_clock()
                        fresh = publish_fresh if not hooks.inbound_hooks else None
                    if first:
                        first = False
                        resume = Resumer.resume_frame(data, session.codec, self.config)
                        if resume is not None:
                            await self._resumer.resume(session, resume, self._set_identity_alias)
                            stale = True
                            continue
                    envelope = take(data, now, wall)
                    if envelope is None:
                        continue
                    if publish_nowait is None:
                        await self._publish(session, envelope, wait_publish)
                        stale = True
                        continue
                    frame_id = session.frame_id
                    # An in-process bus takes the envelope on the spot: no coroutine per frame.
                    try:
                        if fresh is not None:
                            # Without an id, nothing (no ack) is owed the client before a reply.
                            taken = fresh(envelope, frame_id is None)
                        else:
                            taken = publish_nowait(envelope)
                    except Exception as exc:
                        self._publish_failed(session, envelope, frame_id, exc)
                    else:
                        if taken is False:
                            # The bus is full: wait for room, which holds this client back.
                            # Only False: an adapter's None (an older contract) means taken.
                            if wait_fresh is not None and fresh is not None:
                                await self._publish(session, envelope, wait_fresh)
                            else:
                                await self._publish(session, envelope, wait_publish)
                            stale = True
                        elif frame_id is None and self._bus_down_since is None:
                            # _published, when it has nothing else to do.
                            counters.frames_published += 1
                        else:
                            self._published(session, frame_id)
            except BaseException:
                # Cancelled at an await (a yield, a resume, a wait for room): the frames
                # read with this one and not taken yet go down with the connection,
                # counted, not silently (the frame in hand is counted where it was: at the
                # yield above, by the resume, by _publish).
                left = sum(1 for _ in frames)
                counters.frames_received += left
                counters.frames_lost += left
                raise

    async def _publish(
        self,
        session: Session,
        envelope: Envelope,
        publish: Callable[[Envelope], Awaitable[None]] | None = None,
    ) -> None:
        counters = self._counters
        frame_id = session.frame_id
        counters.frames_in_flight += 1
        try:
            await (self.bus.publish if publish is None else publish)(envelope)
        except Exception as exc:
            counters.frames_in_flight -= 1
            self._publish_failed(session, envelope, frame_id, exc)
        except BaseException:
            # Cancelled while waiting (the connection's task is ended): the frame ends
            # with its connection, neither published nor answered.
            counters.frames_in_flight -= 1
            counters.frames_lost += 1
            raise
        else:
            counters.frames_in_flight -= 1
            self._published(session, frame_id)

    def _published(self, session: Session, frame_id: str | None) -> None:
        self._bus_down_since = None
        session.published(frame_id)

    def _publish_failed(
        self, session: Session, envelope: Envelope, frame_id: str | None, exc: Exception
    ) -> None:
        now = asyncio.get_running_loop().time()
        if session.publish_failed(envelope, frame_id, exc, now) and self._bus_down_since is None:
            self._bus_down_since = time.monotonic()
            log.warning("the bus refused a message (%s); clients are told to retry", exc)

    # -- from the bus --------------------------------------------------------------------

    def deliver(self, envelope: Envelope) -> None:
        """Take one envelope from the bus: a message to clients or a control request.

        Called by the bus on the loop thread, in the order it received them. Never raises:
        every failure becomes a report to the sending service. A message with a history
        position goes through its group's order stage first.
        """
        if envelope.headers and self._resumer.deliver(envelope):
            return
        self._route(envelope)

    def _route(self, envelope: Envelope) -> None:
        """Route an envelope from the bus to its connections (or carry out a request)."""
        if self._resumer.successors and envelope.recipients is not None:
            envelope = self._resumer.widen(envelope)
        outbound = self._outbound
        outbound.deliver(envelope, self._clock())
        if outbound.to_bus:
            self._reporter.post(outbound.to_bus)
        if outbound.alias_requests:
            assert self._aliases is not None  # only then does Outbound leave them
            self._aliases.take()

    def _post_reports(self) -> None:
        """Send the answers and reports Outbound left (for work finished after deliver)."""
        if self._outbound.to_bus:
            self._reporter.post(self._outbound.to_bus)

    def gateway_lost(self, node: NodeId, report: bool) -> None:
        """Hear from the bus that gateway ``node`` died (see :class:`~wsbus.bus.HearsGateways`).

        Members here of a group with presence frames get a leave frame for each of that
        gateway's members this gateway had heard of; with ``report``, the ``gateway_lost``
        presence event is published for services. Called on the loop thread; never raises.
        """
        log.info("gateway %s hears that gateway %s is gone", self._node, node)
        self._outbound.gateway_lost(node, report, self._clock())
        self._post_reports()

    def deliveries_lost(self, reason: str, detail: str) -> None:
        """Hear from the bus that envelopes meant for this gateway may have been lost.

        The gateway is a :class:`~wsbus.bus.HearsLoss`: every open connection is sent a
        ``wsbus.gap`` frame (docs/protocol.md), after what is queued for it already, so
        that no loss is silent. Called by the bus on the loop thread; never raises.

        Args:
            reason: ``"bus_disconnected"`` or ``"slow_consumer"`` (see HearsLoss).
            detail: the bus's words, for the log; clients are not shown them.
        """
        notified = self._outbound.gap(reason)
        count = self._gap_log.admit(reason, time.monotonic())
        if count is None:
            return
        log.warning(
            "the bus says messages meant for gateway %s may have been lost (%s: %s); "
            "%d connections were sent wsbus.gap (%d such losses since the last warning; "
            "Stats.gaps_heard counts them all)",
            self._node,
            reason,
            detail,
            notified,
            max(count, 1),
        )

    # -- observing -----------------------------------------------------------------------

    def stats(self) -> Stats:
        """Return a snapshot of every counter."""
        sessions = self._sessions.values()
        for session in sessions:
            if session.unconfirmed is not None:
                session.settle()
        return self._counters.snapshot(
            connections=len(self.registry),
            deliveries_pending=sum(s.pending for s in sessions),
        )

    def connections_by_codec(self) -> dict[str, int]:
        """Open connections now (those still authenticating too), by codec subprotocol."""
        counts: dict[str, int] = {}
        for session in self._sessions.values():
            codec = str(session.codec)
            counts[codec] = counts.get(codec, 0) + 1
        return counts

    @property
    def bus_available(self) -> bool | None:
        """Whether the bus says it can take envelopes now; None when it cannot tell."""
        availability = self._availability
        return None if availability is None else availability.available

    @property
    def bus_reconnects(self) -> int | None:
        """Times the bus's link reconnected, when the bus counts them (else None)."""
        reconnects = getattr(self.bus, "reconnects", None)
        return reconnects if isinstance(reconnects, int) else None

    async def probe(self, timeout: float) -> tuple[float, float]:  # noqa: ASYNC109
        """Send a probe round the bus and back to this gateway; wait up to ``timeout`` s.

        The probe is a ``wsbus.probe`` envelope from this gateway to itself, which the bus
        delivers the way it delivers messages from services (:class:`~wsbus.bus.Probes`).
        Nothing here runs per message: probes are sent by ``/readyz`` and the metrics.

        Returns:
            Seconds until the bus took it (the publish), and until it came back.

        Raises:
            BusUnavailable: the bus refused it, cannot probe, or the gateway is not running.
            TimeoutError: it did not come back within ``timeout``.
        """
        bus = self.bus
        if self._state != "running":
            raise BusUnavailable(f"the gateway is {self._state}")
        if not isinstance(bus, Probes):
            raise BusUnavailable(f"the bus {type(bus).__name__} cannot be probed")
        loop = asyncio.get_running_loop()
        envelope = Envelope(
            id=self._next_id(),
            type=PROBE,
            sender=self._outbound.address,
            to=self._outbound.address,
            created=self._clock(),
        )
        back: asyncio.Future[float] = loop.create_future()
        self._probes[envelope.id] = back
        start = loop.time()
        try:
            async with asyncio.timeout(timeout):
                await bus.probe(envelope)
                published = loop.time() - start
                came_back = await back
        finally:
            self._probes.pop(envelope.id, None)
        return published, came_back - start

    def _probe_back(self, envelope: Envelope) -> None:
        """A probe came back from the bus (called by Outbound on the loop thread)."""
        back = self._probes.get(envelope.id)
        if back is not None and not back.done():
            back.set_result(asyncio.get_running_loop().time())

    async def live_services(self) -> dict[str, int] | None:
        """The services on the bus now, with their live instances; None: the bus cannot say.

        Raises:
            BusUnavailable: the bus could not be asked.
        """
        bus = self.bus
        if not isinstance(bus, ListsServices):
            return None
        return await bus.live_services()

    def clients(self) -> list[ClientInfo]:
        """Return a snapshot of every open connection."""
        return self.registry.clients()


async def _authenticate(
    conn: ClientConnection, hooks: Hooks, config: GatewayConfig
) -> Identity | tuple[int, str]:
    """Return who the client is, or the close code and reason that refuse it."""
    request = conn.request
    result: Identity | Refusal | tuple[int, str] | None = _run_authenticate(hooks, request)
    if result is None and config.auth_frame:
        result = await _authenticate_by_frame(conn, hooks, config)
    if isinstance(result, Identity | tuple):
        return result
    if isinstance(result, Refusal):
        log.info("client %s refused: %s", request.remote, result.reason)
    return CloseCode.AUTH_FAILED, AUTH_FAILED_REASON


def _run_authenticate(
    hooks: Hooks, request: HandshakeRequest
) -> Identity | Refusal | tuple[int, str] | None:
    try:
        return hooks.authenticate(request)
    except PluginError:
        # The server's fault (Hooks logged it, rate-limited), not the client's
        # credentials: a close the client may retry after, not 4401.
        return CloseCode.TRY_AGAIN_LATER, "server error; try again later"
    except Exception:
        log.exception("authenticating a client failed; it is told to try again later")
        return CloseCode.TRY_AGAIN_LATER, "server error; try again later"


async def _authenticate_by_frame(
    conn: ClientConnection, hooks: Hooks, config: GatewayConfig
) -> Identity | Refusal | tuple[int, str] | None:
    try:
        async with asyncio.timeout(config.auth_timeout):
            data = await conn.receive()
    except TimeoutError:
        return CloseCode.AUTH_TIMEOUT, "no authentication in time"
    except ConnectionClosed as exc:
        return exc.code, exc.reason
    if isinstance(data, str) is not conn.codec.is_text:
        return CloseCode.UNSUPPORTED_DATA, "frame type does not match the codec"
    frame = decode_client_frame(data, conn.codec, config.wire, allowed_control=CLIENT_CONTROL_TYPES)
    if isinstance(frame, Rejection) or frame.type != "wsbus.auth":
        return Refusal("first frame was not a valid wsbus.auth frame")
    token = frame.content.get("token") if isinstance(frame.content, dict) else None
    if not isinstance(token, str):
        return Refusal("wsbus.auth frame has no token")
    request = msgspec.structs.replace(conn.request, token=token, via="frame")
    return _run_authenticate(hooks, request)
