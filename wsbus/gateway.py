"""The Gateway: validates, wraps and publishes client messages; routes service messages.

The one place in the core that awaits. Per connection it runs a reader (frames in order:
validate, stamp the sender, hooks, publish, ack) and a writer (a bounded FIFO of encoded
frames). Envelopes from the bus arrive through :meth:`Gateway.deliver`, on the loop
thread, and are resolved, encoded once per codec and queued on each target connection in
arrival order: that is what keeps per-sender, per-client order.

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
from collections.abc import Callable, Iterable
from typing import Any, Final, Literal

import msgspec

from . import control
from .bus import SHARED_HEADER, Bus
from .edge import ClientConnection, ConnectionClosed
from .envelope import (
    ClientAddress,
    ConnId,
    Envelope,
    EnvelopeId,
    GatewayAddress,
    IdFactory,
    NodeId,
    Recipients,
    ServiceAddress,
    node_of,
)
from .errors import (
    AliasTaken,
    BusUnavailable,
    ConfigError,
    InvalidName,
    NoRoute,
    PluginError,
    UnknownConnection,
)
from .hooks import Drop, HandshakeRequest, Hooks, Identity, Refusal
from .limits import ErrorBudget, TokenBucket
from .plugins import AllowAnonymous
from .registry import DEFAULT_NAME_PATTERN, AliasPolicy, ClientInfo, ClientRegistry
from .router import Router
from .wire import (
    CLIENT_CONTROL_TYPES,
    Codec,
    ErrorCode,
    Rejection,
    ServerFrame,
    WireLimits,
    decode_client_frame,
    encode_server_frame,
    frame_id,
)

__all__ = ["CloseCode", "Gateway", "GatewayConfig", "Stats"]

log = logging.getLogger("wsbus.gateway")


class CloseCode:
    """The WebSocket close codes the gateway uses (SPEC section 3)."""

    NORMAL: Final = 1000
    GOING_AWAY: Final = 1001
    UNSUPPORTED_DATA: Final = 1003
    INVALID_DATA: Final = 1007
    POLICY: Final = 1008
    TOO_BIG: Final = 1009
    INTERNAL_ERROR: Final = 1011
    TRY_AGAIN_LATER: Final = 1013
    BAD_GATEWAY: Final = 1014
    ERROR_BUDGET: Final = 4400
    AUTH_FAILED: Final = 4401
    FORBIDDEN: Final = 4403
    AUTH_TIMEOUT: Final = 4408
    RATE_LIMITED: Final = 4429
    SLOW_CONSUMER: Final = 4507


DRAIN_QUIET: Final = 0.05
"""Seconds without a frame read that tell a graceful shutdown the clients' in-flight
frames have all arrived."""

RATE_QUIET: Final = 1.0
"""Seconds without a rate-limit refusal that end a rate-limited episode."""

FLUSH_TIMEOUT: Final = 1.0
"""Seconds a closing connection gets to write the frames that explain why it is closed."""

SETTLE_INTERVAL: Final = 0.1
"""Seconds between two looks at deliveries a connection took and has not sent yet (they
wait in its transport): counted written soon after they reach the socket."""

SETTLE_EVERY: Final = 64
"""Deliveries taken while earlier ones wait in the transport, between two looks inline:
the list of unconfirmed frames stays within what the transport holds plus this."""

AUTH_FAILED_REASON: Final = "authentication failed"
"""The one close reason for every authentication failure: it tells an attacker nothing."""


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


class Stats(msgspec.Struct, frozen=True):
    """A snapshot of the gateway's counters.

    These identities hold at every snapshot (the tests check them exactly):

    - ``frames_received == frames_published + frames_rejected + frames_lost + frames_in_flight``
    - ``deliveries_queued == deliveries_written + deliveries_dropped + deliveries_pending``
    - ``bus_envelopes == control_requests + service_errors + messages_routed +
      messages_unrouted + messages_elsewhere``

    ``messages_unrouted`` (no connection reached at all) and ``messages_partial`` (some
    recipients missed) each sent one ``wsbus.undeliverable`` report, as did every refused
    delivery: ``reports == messages_unrouted + messages_partial + deliveries_refused``.

    Attributes:
        connections: open connections now.
        connections_total: connections accepted since start.
        connections_refused: connections closed before the welcome (auth, capacity, ...).
        frames_received: client frames read, after authentication.
        frames_published: frames put on the bus.
        frames_acked: of those, acked (they carried an id).
        frames_rejected: frames answered with ``wsbus.error``.
        frames_lost: frames that ended with their connection's close (wrong frame type).
        frames_in_flight: frames being published right now.
        rejected_by_code: ``frames_rejected`` by error code.
        bus_envelopes: envelopes the bus delivered to the gateway.
        control_requests: of those, ``wsbus.*`` control requests.
        service_errors: of those, ``wsbus.failed`` reports: a service's handler raised on a
            client's message. Each told that client ``service_error`` (with the message's
            id as ``ref``), unless it had disconnected or the message carried no id.
        messages_routed: messages queued to at least one connection.
        messages_unrouted: messages that reached no connection (reported to the sender).
        messages_partial: routed messages that missed some recipients (reported).
        messages_elsewhere: messages with nothing to deliver and nothing to report: every
            match was excluded, or a shared bus sent them to every gateway and none of the
            recipients was this one's.
        deliveries_queued: (message, connection) pairs queued for writing.
        deliveries_written: of those, written to the connection; with an adapter that can
            tell (``unsent()``, as the WebSocket edge), once they have reached the socket.
        deliveries_dropped: of those, dropped because the connection closed first.
        deliveries_pending: of those, waiting in a queue now, or taken by the connection
            and not yet known to have reached the socket.
        deliveries_refused: deliveries never queued because the queue was full and the
            slow-consumer policy is ``drop`` (reported to the sender).
        dropped_by_close_code: ``deliveries_dropped`` by the close code that ended them.
        reports: ``wsbus.undeliverable`` reports sent.
        reports_lost: reports and control answers that could not be put on the bus.
        closes_by_code: connections closed, by close code.
    """

    connections: int
    connections_total: int
    connections_refused: int
    frames_received: int
    frames_published: int
    frames_acked: int
    frames_rejected: int
    frames_lost: int
    frames_in_flight: int
    rejected_by_code: dict[str, int]
    bus_envelopes: int
    control_requests: int
    service_errors: int
    messages_routed: int
    messages_unrouted: int
    messages_partial: int
    messages_elsewhere: int
    deliveries_queued: int
    deliveries_written: int
    deliveries_dropped: int
    deliveries_pending: int
    deliveries_refused: int
    dropped_by_close_code: dict[int, int]
    reports: int
    reports_lost: int
    closes_by_code: dict[int, int]


class _Counters:
    """The mutable counters behind :class:`Stats`."""

    def __init__(self) -> None:
        self.connections_total = 0
        self.connections_refused = 0
        self.frames_received = 0
        self.frames_published = 0
        self.frames_acked = 0
        self.frames_rejected = 0
        self.frames_lost = 0
        self.frames_in_flight = 0
        self.rejected_by_code: dict[str, int] = {}
        self.bus_envelopes = 0
        self.control_requests = 0
        self.service_errors = 0
        self.messages_routed = 0
        self.messages_unrouted = 0
        self.messages_partial = 0
        self.messages_elsewhere = 0
        self.deliveries_queued = 0
        self.deliveries_written = 0
        self.deliveries_dropped = 0
        self.deliveries_refused = 0
        self.dropped_by_close_code: dict[int, int] = {}
        self.reports = 0
        self.reports_lost = 0
        self.closes_by_code: dict[int, int] = {}


REF_DECODE_LIMIT: Final = 4096
"""Refused frames up to this size are skimmed for their id, for the error's ``ref``;
larger ones are not, so that refusing a flood stays cheap."""


READ_YIELD_BYTES: Final = 16 * 1024
"""A connection's reader gives other tasks a turn after reading this many bytes of frames
without waiting: at most one large frame's work between turns (an echo round trip takes a
few turns), and a yield per about 160 frames of 100 bytes, so typical frames pay nothing."""


def _ref(data: str | bytes, codec: Codec) -> str | None:
    """Return the id of a frame being refused without processing, if it is cheap to find.

    Only the top-level ``id`` is read (msgspec skips the rest in C): the frame is not
    validated, so a refusal costs what skimming at most REF_DECODE_LIMIT bytes costs.
    """
    if len(data) > REF_DECODE_LIMIT:
        return None
    return frame_id(data, codec)


_HEX: Final = frozenset("0123456789abcdef")


def _bump(counter: dict[Any, int], key: Any, n: int = 1) -> None:
    counter[key] = counter.get(key, 0) + n


class _Client:
    """One open connection's state."""

    __slots__ = (
        "address",
        "bucket",
        "budget",
        "busy",
        "close_code",
        "close_reason",
        "codec",
        "conn",
        "conn_id",
        "draining",
        "flushed",
        "outbox",
        "outbox_bytes",
        "pending_deliveries",
        "rate_limited_last",
        "rate_limited_since",
        "send_nowait",
        "unconfirmed",
        "unsent",
        "writer",
    )

    def __init__(self, conn: ClientConnection, conn_id: ConnId, config: GatewayConfig) -> None:
        self.conn = conn
        self.conn_id = conn_id
        # The address stamped on this connection's messages; refreshed when its alias changes.
        self.address = ClientAddress(conn_id)
        self.codec = conn.codec
        self.send_nowait: Callable[[bytes], bool] | None = getattr(conn, "send_nowait", None)
        # An adapter that can tell which frames reached the socket (see wsbus.edge): the
        # deliveries it took are written only once it says so; until then they are
        # pending, and dropped if the connection ends first. ``unconfirmed`` holds, for
        # each frame taken but not known to have reached the socket, whether it is a
        # delivery; None when there are none (the usual case).
        self.unsent: Callable[[], int] | None = getattr(conn, "unsent", None)
        self.unconfirmed: deque[bool] | None = None
        # (encoded frame, is a delivery); the head stays queued until it is written. Made,
        # with the task that writes it and the event a flushing close waits on, only once a
        # frame has to wait: an idle connection carries none of them (memory per
        # connection is a number users plan capacity with).
        self.outbox: deque[tuple[bytes, bool]] | None = None
        self.outbox_bytes = 0
        self.pending_deliveries = 0
        self.writer: asyncio.Task[None] | None = None
        self.flushed: asyncio.Event | None = None
        self.bucket = TokenBucket(config.rate, config.burst)
        self.budget = ErrorBudget(config.error_budget, config.error_window)
        self.rate_limited_since: float | None = None
        self.rate_limited_last = 0.0
        self.close_code: int | None = None
        self.close_reason = ""
        self.draining = False
        self.busy = False

    def writer_ended(self) -> None:
        """Forget the writer task and wake a close that waits for the queue to flush."""
        self.writer = None
        if self.flushed is not None:
            self.flushed.set()


class Gateway:
    """Connects client connections to a bus, safely.

    Args:
        bus: the bus to publish client messages on and take service messages from.
        config: settings; :class:`GatewayConfig` defaults when omitted.
        plugins: plugin objects to register, in order, after those from entry points.
        entry_points: load plugins from the ``wsbus`` entry-point group.

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
    ) -> None:
        self.bus = bus
        self.config = config if config is not None else GatewayConfig()
        self._node = NodeId(self.config.node or os.urandom(3).hex())
        if "." in self._node:
            raise ConfigError(f"node id {self._node!r} must not contain '.'")
        self.address = GatewayAddress(self._node)
        self.registry = ClientRegistry(
            alias_policy=self.config.alias_policy, name_pattern=self.config.name_pattern
        )
        self.router = Router(self.registry)
        self.hooks = Hooks(plugins, entry_points=entry_points)
        if self.config.allow_anonymous:
            self.hooks.register(AllowAnonymous(), name="wsbus.allow_anonymous")
        self._counters = _Counters()
        self._clients: dict[ConnId, _Client] = {}
        self._serial = itertools.count(1)
        self._ids = IdFactory(f"{self._node}")
        self._next_id = self._ids.next
        self._state: Literal["new", "running", "closing", "closed"] = "new"
        self._reports: asyncio.Queue[Envelope] | None = None
        self._reporter: asyncio.Task[None] | None = None
        self._bus_down_since: float | None = None
        self._last_read = 0.0
        self._background: set[asyncio.Task[Any]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def node(self) -> NodeId:
        """This gateway's node id."""
        return self._node

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start the bus and begin accepting connections."""
        if self._state != "new":
            raise ConfigError("a gateway can be started once")
        self._reports = asyncio.Queue(self.config.report_queue)
        self._reporter = asyncio.create_task(self._report_loop(), name="wsbus-reports")
        await self.bus.start(self)
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
        for client in self._clients.values():
            client.draining = True
        loop = asyncio.get_running_loop()
        started = loop.time()
        self._last_read = started
        deadline = started + self.config.drain_timeout
        # Polling is fine here: it runs once, at shutdown, and is bounded by the deadline.
        # Wait for the queues to empty and for the frames clients had in flight (read within
        # the last DRAIN_QUIET seconds) to be answered, so they end refused, not lost.
        while loop.time() < deadline and (  # noqa: ASYNC110
            loop.time() - self._last_read < DRAIN_QUIET
            or any(c.outbox or c.busy for c in self._clients.values() if c.close_code is None)
        ):
            await asyncio.sleep(0.01)
        for client in list(self._clients.values()):
            self._close(client, CloseCode.GOING_AWAY, "server shutting down")
        try:
            async with asyncio.timeout(self.config.drain_timeout + 5.0):
                await self._idle.wait()
        except TimeoutError:
            log.warning("%d connections did not close in time", len(self._clients))
        if self._reporter is not None:
            assert self._reports is not None
            try:
                async with asyncio.timeout(1.0):
                    await self._reports.join()
            except TimeoutError:
                log.warning("shutdown: %d reports were not sent", self._reports.qsize())
            self._reporter.cancel()
            await asyncio.gather(self._reporter, return_exceptions=True)
        if was_running:
            await self.bus.close()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self._state = "closed"
        log.info("gateway %s closed", self._node)

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def open_connections(self) -> int:
        """Connections open now, counting those still authenticating."""
        return len(self._clients)

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
            code, reason = refusal
            await self._refuse(conn, code, reason)
            return
        self._idle.clear()
        conn_id = ConnId(f"{self._node}.{next(self._serial):x}")
        # Reserve the slot before the first await, so concurrent handshakes see it.
        client = _Client(conn, conn_id, self.config)
        self._clients[conn_id] = client
        try:
            identity = await self._authenticate(conn)
            if isinstance(identity, tuple):
                await self._refuse(conn, *identity)
                return
            await self._run(client, identity)
        finally:
            self._clients.pop(conn_id, None)
            if not self._clients:
                self._idle.set()

    def _admission(self) -> tuple[int, str] | None:
        if self._state != "running":
            return CloseCode.GOING_AWAY, "server shutting down"
        if len(self._clients) >= self.config.max_connections:
            return CloseCode.TRY_AGAIN_LATER, "server is at its connection limit; retry later"
        since = self._bus_down_since
        if since is not None and getattr(self.bus, "available", False):
            # The bus says it is back, though no publish has succeeded since.
            self._bus_down_since = since = None
        if since is not None and time.monotonic() - since > self.config.bus_down_close_after:
            return CloseCode.BAD_GATEWAY, "message bus unreachable; retry later"
        return None

    async def _refuse(self, conn: ClientConnection, code: int, reason: str) -> None:
        self._counters.connections_refused += 1
        _bump(self._counters.closes_by_code, code)
        try:
            await conn.close(code, reason)
        except Exception:
            log.debug("closing a refused connection failed", exc_info=True)

    async def _authenticate(self, conn: ClientConnection) -> Identity | tuple[int, str]:
        request = conn.request
        result: Identity | Refusal | tuple[int, str] | None = self._run_authenticate(request)
        if result is None and self.config.auth_frame:
            result = await self._authenticate_by_frame(conn)
        if isinstance(result, Identity | tuple):
            return result
        if isinstance(result, Refusal):
            log.info("client %s refused: %s", request.remote, result.reason)
        return CloseCode.AUTH_FAILED, AUTH_FAILED_REASON

    def _run_authenticate(
        self, request: HandshakeRequest
    ) -> Identity | Refusal | tuple[int, str] | None:
        try:
            return self.hooks.authenticate(request)
        except PluginError:
            # The server's fault (Hooks logged it, rate-limited), not the client's
            # credentials: a close the client may retry after, not 4401.
            return CloseCode.TRY_AGAIN_LATER, "server error; try again later"
        except Exception:
            log.exception("authenticating a client failed; it is told to try again later")
            return CloseCode.TRY_AGAIN_LATER, "server error; try again later"

    async def _authenticate_by_frame(
        self, conn: ClientConnection
    ) -> Identity | Refusal | tuple[int, str] | None:
        try:
            async with asyncio.timeout(self.config.auth_timeout):
                data = await conn.receive()
        except TimeoutError:
            return CloseCode.AUTH_TIMEOUT, "no authentication in time"
        except ConnectionClosed as exc:
            return exc.code, exc.reason
        if isinstance(data, str) is not conn.codec.is_text:
            return CloseCode.UNSUPPORTED_DATA, "frame type does not match the codec"
        frame = decode_client_frame(
            data, conn.codec, self.config.wire, allowed_control=CLIENT_CONTROL_TYPES
        )
        if isinstance(frame, Rejection) or frame.type != "wsbus.auth":
            return Refusal("first frame was not a valid wsbus.auth frame")
        token = frame.content.get("token") if isinstance(frame.content, dict) else None
        if not isinstance(token, str):
            return Refusal("wsbus.auth frame has no token")
        request = msgspec.structs.replace(conn.request, token=token, via="frame")
        return self._run_authenticate(request)

    async def _run(self, client: _Client, identity: Identity) -> None:
        counters = self._counters
        conn_id = client.conn_id
        try:
            address = self.registry.connect(conn_id, user=identity.user)
            if identity.alias is not None:
                self.registry.set_alias(conn_id, identity.alias)
                address = self.registry.address(conn_id)
            client.address = address
        except (InvalidName, AliasTaken) as exc:
            log.warning("identity for %s not usable: %s", client.conn.request.remote, exc)
            if conn_id in self.registry:
                self.registry.disconnect(conn_id)
            await self._refuse(client.conn, CloseCode.AUTH_FAILED, AUTH_FAILED_REASON)
            return
        counters.connections_total += 1
        self._send_control(client, "wsbus.welcome", self._welcome(client, address.user))
        self.hooks.client_connected(address, client.conn.request)
        code, reason = CloseCode.NORMAL, ""
        try:
            code, reason = await self._read(client)
        finally:
            if client.close_code is None:
                client.close_code, client.close_reason = code, reason
            writer = client.writer
            if writer is not None:
                writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)
                # A writer cancelled before it ran never reached its own clean-up.
                client.writer_ended()
            # The connection is closed: what the socket never took is dropped with it.
            self._settle(client)
            client.unconfirmed = None
            dropped = client.pending_deliveries
            if dropped:
                counters.deliveries_dropped += dropped
                _bump(counters.dropped_by_close_code, client.close_code, dropped)
                client.pending_deliveries = 0
            client.outbox = None
            _bump(counters.closes_by_code, client.close_code)
            address = self.registry.address(conn_id)
            self.registry.disconnect(conn_id)
            self.hooks.client_disconnected(address, client.close_code, client.close_reason)

    def _welcome(self, client: _Client, user: str | None) -> dict[str, Any]:
        config = self.config
        return {
            "protocol": "wsbus.v1",
            "conn_id": client.conn_id,
            "codec": client.codec.value,
            "user": user,
            "limits": {
                "max_frame_bytes": config.wire.max_frame_bytes,
                "max_depth": config.wire.max_depth,
                "max_items": config.wire.max_items,
                "rate": config.rate,
                "burst": config.burst,
                "error_budget": config.error_budget,
            },
        }

    # -- reading -------------------------------------------------------------------------

    async def _read(self, client: _Client) -> tuple[int, str]:
        conn = client.conn
        codec = client.codec
        is_text = codec.is_text
        limits = self.config.wire
        counters = self._counters
        loop = asyncio.get_running_loop()
        publish_nowait: Callable[[Envelope], bool] | None = getattr(
            self.bus, "publish_nowait", None
        )
        # An adapter may offer its transport's own receive, untranslated, with a function
        # that translates its errors: one coroutine less per frame (see wsbus.edge).
        hooks = self.hooks
        next_id = self._next_id
        wall_clock = time.time
        receive = getattr(conn, "raw_receive", None)
        translate: Callable[[BaseException], ConnectionClosed | None] | None = getattr(
            conn, "closed_error", None
        )
        if receive is None or translate is None:
            receive, translate = conn.receive, None
        # An adapter's receive returns at once while frames are buffered: without a yield
        # of its own, a client's burst of large frames would hold the loop until it is read.
        unyielded = 0
        while True:
            try:
                data = await receive()
            except ConnectionClosed as exc:
                return exc.code, exc.reason
            except Exception as exc:
                closed = translate(exc) if translate is not None else None
                if closed is None:
                    raise
                return closed.code, closed.reason
            counters.frames_received += 1
            unyielded += len(data)
            if unyielded > READ_YIELD_BYTES:
                unyielded = 0
                await asyncio.sleep(0)  # other connections get a turn
            if client.close_code is not None:
                # Read after we decided to close: it goes down with the connection.
                counters.frames_lost += 1
                continue
            if client.draining:
                self._last_read = loop.time()
                message = "the server is shutting down"
                self._reject(client, ErrorCode.SHUTTING_DOWN, message, _ref(data, codec))
                continue
            if isinstance(data, str) is not is_text:
                counters.frames_lost += 1
                kind = "binary" if is_text else "text"
                self._close(
                    client,
                    CloseCode.UNSUPPORTED_DATA,
                    f"{kind} frame on a {codec.value} connection",
                )
                continue
            now = loop.time()
            if not client.bucket.take(now):
                self._rate_limited(client, now, data, codec)
                continue
            frame = decode_client_frame(data, codec, limits)
            if isinstance(frame, Rejection):
                self._reject(client, frame.code, frame.message, frame.ref)
                continue
            frame_id = frame.id
            envelope = Envelope(
                # The client's own id, when it gave one, so that replies can point at it.
                id=EnvelopeId(frame_id) if frame_id is not None else next_id(),
                type=frame.type,
                sender=client.address,
                content=frame.content,
                reply_to=frame.reply_to,
                created=wall_clock(),
            )
            if hooks.inbound_hooks:
                hooked = self._inbound(client, envelope, frame_id)
                if hooked is None:
                    continue
                envelope = hooked
            if publish_nowait is None:
                await self._publish(client, envelope, frame_id)
                continue
            # An in-process bus takes the envelope on the spot: no coroutine per frame.
            try:
                taken = publish_nowait(envelope)
            except Exception as exc:
                self._publish_failed(client, envelope, frame_id, exc)
            else:
                if not taken:
                    # The bus is full: wait for room, which holds this client back.
                    await self._publish(client, envelope, frame_id)
                elif frame_id is None and self._bus_down_since is None:
                    counters.frames_published += 1  # _published, when it has nothing else to do
                else:
                    self._published(client, frame_id)

    def _rate_limited(self, client: _Client, now: float, data: str | bytes, codec: Codec) -> None:
        # A flood that is only partly refused is still a flood: frames that get through do
        # not end the episode; a quiet second without a refusal does.
        if client.rate_limited_since is None or now - client.rate_limited_last > RATE_QUIET:
            client.rate_limited_since = now
        client.rate_limited_last = now
        if now - client.rate_limited_since > self.config.rate_limit_close_after:
            self._counters.frames_lost += 1
            self._close(client, CloseCode.RATE_LIMITED, "rate limited for too long", flush=True)
            return
        self._reject(
            client, ErrorCode.RATE_LIMITED, "too many messages; slow down", _ref(data, codec)
        )

    def _inbound(
        self, client: _Client, envelope: Envelope, frame_id: str | None
    ) -> Envelope | None:
        """Run the inbound hooks on a wrapped frame; None when they refused it."""
        address = client.address
        type = envelope.type
        hooks = self.hooks
        try:
            verdict = hooks.authorize(address, envelope)
        except Exception as exc:
            self._plugin_failed(client, exc, type, frame_id)
            return None
        if not verdict.allowed:
            self._reject(client, ErrorCode.FORBIDDEN, verdict.reason or "not allowed", frame_id)
            if verdict.close:
                self._close(client, CloseCode.FORBIDDEN, "forbidden", flush=True)
            return None
        try:
            result = hooks.transform_inbound(address, envelope)
        except Exception as exc:
            self._plugin_failed(client, exc, type, frame_id)
            return None
        if isinstance(result, Drop):
            self._reject(client, ErrorCode.FORBIDDEN, result.reason, frame_id)
            return None
        if result.sender != address:
            # Plugins may rewrite a message but never its sender.
            result = msgspec.structs.replace(result, sender=address)
        return result

    def _plugin_failed(
        self, client: _Client, exc: Exception, type: str, frame_id: str | None
    ) -> None:
        """Answer a frame whose inbound hook raised: the server's fault, so ``unavailable``."""
        if not isinstance(exc, PluginError):
            # Hooks wraps what plugins raise (and logs it, rate-limited); anything else is
            # a bug of wsbus's own.
            log.exception("the inbound hooks failed on %r", type)
        # Not the client's fault: unavailable is retryable and never charged to the budget.
        message = "the server could not process this message; retry"
        self._reject(client, ErrorCode.UNAVAILABLE, message, frame_id)

    async def _publish(self, client: _Client, envelope: Envelope, frame_id: str | None) -> None:
        counters = self._counters
        client.busy = True
        counters.frames_in_flight += 1
        try:
            await self.bus.publish(envelope)
        except Exception as exc:
            counters.frames_in_flight -= 1
            self._publish_failed(client, envelope, frame_id, exc)
        else:
            counters.frames_in_flight -= 1
            self._published(client, frame_id)
        finally:
            client.busy = False

    def _published(self, client: _Client, frame_id: str | None) -> None:
        counters = self._counters
        counters.frames_published += 1
        self._bus_down_since = None
        if frame_id is not None:
            counters.frames_acked += 1
            self._send_control(client, "wsbus.ack", {"ref": frame_id})

    def _publish_failed(
        self, client: _Client, envelope: Envelope, frame_id: str | None, exc: Exception
    ) -> None:
        if isinstance(exc, NoRoute):
            message = f"nothing handles type {envelope.type!r}"
            self._reject(client, ErrorCode.NO_ROUTE, message, frame_id)
            return
        if isinstance(exc, BusUnavailable):
            if exc.whole_bus:
                self._bus_failed(exc)
        else:
            log.error("publishing %r failed: %r", envelope.type, exc, exc_info=exc)
            self._bus_failed(exc)
        self._reject(client, ErrorCode.UNAVAILABLE, "service unavailable; retry", frame_id)

    def _bus_failed(self, exc: Exception) -> None:
        if self._bus_down_since is None:
            self._bus_down_since = time.monotonic()
            log.warning("the bus refused a message (%s); clients are told to retry", exc)

    def _reject(self, client: _Client, code: ErrorCode, message: str, ref: str | None) -> None:
        counters = self._counters
        counters.frames_rejected += 1
        _bump(counters.rejected_by_code, code.value)
        content: dict[str, Any] = {"code": code.value, "message": message, "retry": code.retry}
        if ref is not None:
            content["ref"] = ref
        self._send_control(client, "wsbus.error", content)
        if code.client_fault and not client.budget.spend(asyncio.get_running_loop().time()):
            self._close(client, CloseCode.ERROR_BUDGET, "too many bad frames", flush=True)

    # -- writing -------------------------------------------------------------------------

    def _send_control(self, client: _Client, type: str, content: Any) -> None:
        data = encode_server_frame(ServerFrame(type, content, self._ids()), client.codec)
        self._enqueue(client, data, delivery=False)

    def _enqueue(self, client: _Client, data: bytes, *, delivery: bool) -> bool:
        """Queue one frame; False when it was not queued (closing, or refused as full)."""
        counters = self._counters
        config = self.config
        outbox = client.outbox
        if client.close_code is None and (
            (outbox is not None and len(outbox) >= config.outbound_queue)
            or client.outbox_bytes + len(data) > config.outbound_bytes
        ):
            if delivery and config.slow_consumer == "drop":
                counters.deliveries_refused += 1
                return False
            self._close(client, CloseCode.SLOW_CONSUMER, "slow consumer: messages were missed")
        if client.close_code is not None:
            if delivery:
                # Counted as queued and dropped at once: it goes down with the connection.
                counters.deliveries_queued += 1
                counters.deliveries_dropped += 1
                _bump(counters.dropped_by_close_code, client.close_code)
            return False
        if not outbox and client.send_nowait is not None and client.send_nowait(data):
            # Taken at once: nothing queued, so the order is kept.
            if delivery:
                counters.deliveries_queued += 1
                client.pending_deliveries += 1
            self._taken(client, delivery)
            return True
        if outbox is None:
            outbox = client.outbox = deque()
        outbox.append((data, delivery))
        client.outbox_bytes += len(data)
        if delivery:
            client.pending_deliveries += 1
            counters.deliveries_queued += 1
        if client.writer is None:
            client.writer = asyncio.create_task(
                self._write(client, outbox), name=f"wsbus-writer-{client.conn_id}"
            )
        return True

    async def _write(self, client: _Client, outbox: deque[tuple[bytes, bool]]) -> None:
        """Write the queue out in order, then end: the next queued frame starts another."""
        send = client.conn.send
        try:
            while outbox:
                if client.close_code is not None and not client.draining:
                    return
                data, delivery = outbox[0]
                await send(data)
                outbox.popleft()
                client.outbox_bytes -= len(data)
                self._taken(client, delivery)
        except ConnectionClosed:
            return
        except Exception as exc:
            # A bug in the connection adapter: writing again would repeat the same frame.
            log.error(
                "writing to %s failed (%r); closing it: this is a bug in the connection adapter %s",
                client.conn_id,
                exc,
                type(client.conn).__name__,
                exc_info=exc,
            )
            self._close(client, CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            client.writer_ended()

    def _taken(self, client: _Client, delivery: bool) -> None:
        """Count a frame the connection took written once it has reached the socket."""
        unsent = client.unsent
        if unsent is None or (client.unconfirmed is None and not unsent()):
            # Adapters that cannot tell count what they take; the common case of one
            # that can: the socket took everything so far.
            if delivery:
                client.pending_deliveries -= 1
                self._counters.deliveries_written += 1
            return
        flags = client.unconfirmed
        if flags is None:
            flags = client.unconfirmed = deque()
            # Frames gathered in this pass are written when it ends: look again then, and
            # every SETTLE_INTERVAL while some wait in the transport.
            asyncio.get_running_loop().call_soon(self._settling, client, flags)
        flags.append(delivery)
        if len(flags) % SETTLE_EVERY == 0:
            # The list grows only with deliveries: settled inline every so many, it stays
            # bounded however long the transport keeps holding a few bytes.
            self._settle(client)

    def _settling(self, client: _Client, flags: deque[bool]) -> None:
        # One chain of looks per list: a newer list (after this one emptied) has its own.
        if client.unconfirmed is not flags:
            return
        self._settle(client)
        if client.unconfirmed is flags:
            asyncio.get_running_loop().call_later(SETTLE_INTERVAL, self._settling, client, flags)

    def _settle(self, client: _Client) -> None:
        """Count written the deliveries the connection says have reached the socket."""
        flags = client.unconfirmed
        unsent = client.unsent
        if flags is None or unsent is None:
            return
        confirmed = len(flags) - unsent()
        counters = self._counters
        while confirmed > 0:
            if flags.popleft():
                client.pending_deliveries -= 1
                counters.deliveries_written += 1
            confirmed -= 1
        if not flags:
            client.unconfirmed = None

    def _close(self, client: _Client, code: int, reason: str, *, flush: bool = False) -> None:
        """Begin closing one connection: nothing more is read or queued.

        With ``flush`` what is queued (say, the error frame that explains the close) is
        written first, for at most ``FLUSH_TIMEOUT`` seconds; otherwise it is dropped.
        """
        if client.close_code is not None:
            return
        client.close_code = code
        client.close_reason = reason
        client.draining = flush
        if code not in (CloseCode.NORMAL, CloseCode.GOING_AWAY):
            log.info("closing %s with %d: %s", client.conn_id, code, reason)
        self._spawn(self._close_connection(client, code, reason, flush))

    async def _close_connection(self, client: _Client, code: int, reason: str, flush: bool) -> None:
        if flush:
            try:
                async with asyncio.timeout(FLUSH_TIMEOUT):
                    while client.outbox and client.writer is not None:
                        if client.flushed is None:
                            client.flushed = asyncio.Event()
                        client.flushed.clear()
                        await client.flushed.wait()
            except TimeoutError:
                pass
            # A writer still blocked on a slow client stops after its current frame.
            client.draining = False
        await client.conn.close(code, reason)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- from the bus --------------------------------------------------------------------

    def deliver(self, envelope: Envelope) -> None:
        """Take one envelope from the bus: a message to clients or a control request.

        Called by the bus on the loop thread, in the order it received them. Never raises:
        every failure becomes a report to the sending service.
        """
        counters = self._counters
        counters.bus_envelopes += 1
        if envelope.type.startswith("wsbus."):
            if envelope.type == control.FAILED:
                counters.service_errors += 1
                self._service_failed(envelope)
                return
            counters.control_requests += 1
            self._control(envelope)
            return
        if envelope.recipients is None:
            counters.messages_unrouted += 1
            self._report(envelope, "no_match", Recipients(), "the message names no recipients")
            return
        try:
            result = self.hooks.transform_outbound(envelope)
        except Exception as exc:
            if not isinstance(exc, PluginError):  # a PluginError was logged by the hooks
                log.exception("an outbound transform plugin raised on %r", envelope.type)
            result = Drop("an outbound plugin failed")
        if isinstance(result, Drop):
            counters.messages_unrouted += 1
            self._report(envelope, "filtered", envelope.recipients, result.reason)
            return
        recipients = result.recipients
        if recipients is None:
            recipients = envelope.recipients
        targets, unmatched = self.router.resolve(recipients)
        if unmatched is not None and result.headers.get(SHARED_HEADER) == "1":
            unmatched = self._own_misses(unmatched)
        if not targets and unmatched is None:
            # Nothing to deliver and nothing missed: every match was excluded, or the
            # message was shared with other gateways and none of it was this one's.
            counters.messages_elsewhere += 1
            return
        if not targets:
            counters.messages_unrouted += 1
            self._report(result, "no_match", unmatched or recipients, "no open connection matched")
            return
        frame = ServerFrame(
            result.type, result.content, result.id, result.reply_to, result.sender.public_name
        )
        encoded: dict[Codec, bytes] = {}
        try:
            for codec in {self._clients[conn_id].codec for conn_id in targets}:
                encoded[codec] = encode_server_frame(frame, codec)
        except (msgspec.EncodeError, TypeError, ValueError, OverflowError) as exc:
            counters.messages_unrouted += 1
            self._report(result, "encode_failed", recipients, f"content cannot be encoded: {exc}")
            return
        counters.messages_routed += 1
        clients = self._clients
        refused: list[ConnId] = []
        for conn_id in targets:
            client = clients[conn_id]
            if not self._enqueue(client, encoded[client.codec], delivery=True) and (
                client.close_code is None
            ):
                refused.append(conn_id)
        if unmatched is not None:
            counters.messages_partial += 1
            self._report(result, "no_match", unmatched, "some recipients matched no connection")
        for conn_id in refused:
            self._report(
                result,
                "slow_consumer",
                Recipients(conn_ids=(conn_id,)),
                "the client's queue is full",
            )

    def _own_misses(self, unmatched: Recipients) -> Recipients | None:
        own = tuple(c for c in unmatched.conn_ids if node_of(c) == self._node)
        return Recipients(conn_ids=own) if own else None

    def _report(self, envelope: Envelope, reason: str, recipients: Recipients, detail: str) -> None:
        self._counters.reports += 1
        self.hooks.delivery_failed(envelope, control.Undeliverable(reason, recipients, detail))
        if isinstance(envelope.sender, ServiceAddress):
            content = control.Undeliverable(reason, recipients, detail)
            self._to_bus(control.UNDELIVERABLE, envelope, content)

    def _to_bus(self, type: str, about: Envelope, content: msgspec.Struct) -> None:
        sender = about.sender
        if not isinstance(sender, ServiceAddress):
            return
        envelope = Envelope(
            id=self._ids(),
            type=type,
            sender=self.address,
            content=msgspec.to_builtins(content),
            reply_to=about.id,
            created=time.time(),
            to=sender,
        )
        assert self._reports is not None
        try:
            self._reports.put_nowait(envelope)
        except asyncio.QueueFull:
            self._counters.reports_lost += 1
            log.warning("report queue full: %s for %s to %s lost", type, about.id, sender.name)

    async def _report_loop(self) -> None:
        assert self._reports is not None
        queue = self._reports
        while True:
            envelope = await queue.get()
            try:
                await self.bus.publish(envelope)
            except Exception as exc:
                self._counters.reports_lost += 1
                log.warning(
                    "could not send %s to service %r: %s",
                    envelope.type,
                    getattr(envelope.to, "name", "?"),
                    exc,
                )
            finally:
                queue.task_done()

    # -- control -------------------------------------------------------------------------

    def _control(self, envelope: Envelope) -> None:
        request_type = control.REQUEST_TYPES.get(envelope.type)
        if request_type is None:
            if envelope.type not in (control.RESULT, control.UNDELIVERABLE):
                self._answer(
                    envelope,
                    control.Result(
                        False, None, "unknown_request", f"{envelope.type!r} is not a request"
                    ),
                )
            return
        try:
            request = msgspec.convert(envelope.content, request_type)
            value = self._do_control(envelope.type, request)
            result = control.Result(True, value)
        except msgspec.ValidationError as exc:
            result = control.Result(False, None, "invalid_request", str(exc))
        except UnknownConnection as exc:
            result = control.Result(False, None, "unknown_connection", str(exc))
        except AliasTaken as exc:
            result = control.Result(False, None, "alias_taken", str(exc))
        except InvalidName as exc:
            result = control.Result(False, None, "invalid_name", str(exc))
        self._answer(envelope, result)

    def _answer(self, envelope: Envelope, result: control.Result) -> None:
        self._to_bus(control.RESULT, envelope, result)

    def _service_failed(self, envelope: Envelope) -> None:
        """Tell a client that the service handling its message failed (``wsbus.failed``)."""
        try:
            report = msgspec.convert(envelope.content, control.Failed)
        except msgspec.ValidationError as exc:
            log.warning("a malformed %s report from %s: %s", envelope.type, envelope.sender, exc)
            return
        client = self._clients.get(report.conn_id)
        if client is None or report.conn_id not in self.registry or self._made_here(report.ref):
            # Gone, or the frame had no id of its own: there is nothing to point the error at.
            return
        # Not counted as a rejection: the frame was published (and acked) already. No text
        # of the service's: what went wrong is in its log, under this id.
        content = {
            "code": ErrorCode.SERVICE_ERROR.value,
            "message": "the service failed handling this message; its log says why",
            "ref": report.ref,
            "retry": ErrorCode.SERVICE_ERROR.retry,
        }
        self._send_control(client, "wsbus.error", content)

    def _made_here(self, ref: str) -> bool:
        """Return True when ``ref`` has the form of an id this gateway made for a frame.

        Frames sent without an id get one of the gateway's ids (``<node>-<hex>``) on the bus.
        """
        prefix = self._ids.prefix
        return (
            len(ref) > len(prefix) + 1
            and ref.startswith(prefix)
            and ref[len(prefix)] == "-"
            and all(c in _HEX for c in ref[len(prefix) + 1 :])
        )

    def _do_control(self, type: str, request: Any) -> Any:
        registry = self.registry
        if type == control.JOIN:
            return registry.join(request.conn_id, request.group)
        if type == control.LEAVE:
            return registry.leave(request.conn_id, request.group)
        if type == control.ALIAS_SET:
            given = registry.set_alias(request.conn_id, request.alias)
            self._clients[request.conn_id].address = registry.address(request.conn_id)
            return given
        if type == control.ALIAS_CLEAR:
            registry.clear_alias(request.conn_id)
            self._clients[request.conn_id].address = registry.address(request.conn_id)
            return None
        if type == control.CLIENTS:
            infos: list[ClientInfo]
            if request.group is None:
                infos = registry.clients()
            else:
                infos = [registry.info(c) for c in registry.members(request.group)]
            return msgspec.to_builtins(infos)
        assert type == control.DISCONNECT
        code = request.code
        if not (code in (1000, 1001, 1008) or 4000 <= code <= 4999):
            raise msgspec.ValidationError("code must be 1000, 1001, 1008 or 4000-4999")
        client = self._clients.get(request.conn_id)
        if client is None or request.conn_id not in registry:
            raise UnknownConnection(request.conn_id)
        reason = request.reason.encode()[:120].decode("utf-8", "ignore")
        self._close(client, code, reason, flush=True)
        return None

    # -- observing -----------------------------------------------------------------------

    def stats(self) -> Stats:
        """Return a snapshot of every counter."""
        c = self._counters
        for client in self._clients.values():
            if client.unconfirmed is not None:
                self._settle(client)
        return Stats(
            connections=len(self.registry),
            connections_total=c.connections_total,
            connections_refused=c.connections_refused,
            frames_received=c.frames_received,
            frames_published=c.frames_published,
            frames_acked=c.frames_acked,
            frames_rejected=c.frames_rejected,
            frames_lost=c.frames_lost,
            frames_in_flight=c.frames_in_flight,
            rejected_by_code=dict(c.rejected_by_code),
            bus_envelopes=c.bus_envelopes,
            control_requests=c.control_requests,
            service_errors=c.service_errors,
            messages_routed=c.messages_routed,
            messages_unrouted=c.messages_unrouted,
            messages_partial=c.messages_partial,
            messages_elsewhere=c.messages_elsewhere,
            deliveries_queued=c.deliveries_queued,
            deliveries_written=c.deliveries_written,
            deliveries_dropped=c.deliveries_dropped,
            deliveries_pending=sum(cl.pending_deliveries for cl in self._clients.values()),
            deliveries_refused=c.deliveries_refused,
            dropped_by_close_code=dict(c.dropped_by_close_code),
            reports=c.reports,
            reports_lost=c.reports_lost,
            closes_by_code=dict(c.closes_by_code),
        )

    def clients(self) -> list[ClientInfo]:
        """Return a snapshot of every open connection."""
        return self.registry.clients()
