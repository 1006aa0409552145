"""The gateway's side of the Pyro bus: :class:`PyroBus`, a :class:`wsbus.Bus` on Pyro5.

The gateway is a Pyro object (``wsbus.gateway.<node>`` in the name server) whose daemon's
listening socket sits in the gateway's asyncio loop (``loop.add_reader``), as in the
original design. Each accepted Pyro connection's handshake is read by the daemon's doorman
thread (:mod:`wsbus_pyro.doorman`) and the connection then served by a thread of Pyro's pool;
every envelope it delivers is handed to the loop with ``call_soon_threadsafe``: a stalled
or hostile peer holds one pool thread for at most ``comm_timeout``, never the loop.

``PyroConfig(single_thread=True)`` runs the original single-thread mode instead: a
multiplexing daemon fully inside the loop, its reader set re-synced by file descriptor
after every event. Only for trusted loopback set-ups: a peer that stops mid-message
stalls the loop for up to ``comm_timeout``.

Services deliver to the gateway directly what is for its connections alone
(:meth:`GatewayEndpoint.deliver_direct`, checked as the message bus checks what a service
routes, bounded in bytes waiting for the loop); the rest comes through the message bus.

Publishing never blocks the loop either: a forwarder thread owns the proxy to the message
bus, batches envelopes, and reports each one's fate back to the loop.

Aliases are unique across every gateway on the bus: :class:`PyroBus` is a
:class:`wsbus.bus.ClaimsAliases`, and claims each alias in the message bus's table (on a
thread of its own, never the loop) before the gateway sets it. It remembers what it
holds, so that it claims it all again when it re-registers with a restarted bus; an alias
another gateway's connection took meanwhile is cleared here, and the gateway (a
:class:`wsbus.bus.HearsLoss`) is told that its clients may have missed messages.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import socket
import threading
import time
from base64 import b64decode as _b64decode
from collections.abc import Callable
from typing import Any

import msgspec
from Pyro5 import errors as pyro_errors
from Pyro5.client import Proxy
from Pyro5.server import expose

from wsbus import control
from wsbus.bus import BusSink, HearsGateways, HearsLoss
from wsbus.envelope import ConnId, Envelope, NodeId, ServiceAddress
from wsbus.errors import BusUnavailable, ConfigError, NoRoute
from wsbus.history import HistoryConfig, Position, position_of
from wsbus.resume import SessionRecord

from .config import PyroConfig, SecureDaemon, apply
from .transport import (
    BUS_ADDRESS,
    GATEWAY_LOST,
    NO_ROUTE,
    OK,
    REFUSED,
    REREGISTERING,
    TAKEN,
    UNAVAILABLE,
    Forwarder,
    RecentIds,
    decode_batch,
    direct_node,
    encode_batch,
    from_service,
    lookup,
    name_server,
    to_bytes,
)

__all__ = ["PyroBus"]

log = logging.getLogger("wsbus.pyro.gateway")

_SERVED_LIMIT = 100_000
"""The most types and service names a gateway remembers as served (a bound on memory)."""

_UNRELEASED_LIMIT = 10_000
"""The most releases the bus could not be told of that a gateway keeps to send again."""

_ROOM_WAIT = 0.2
"""The longest a direct call waits for room for its batch (less than the service's
``DIRECT_TIMEOUT``, so that the gateway answers before the service gives up)."""

_ENCODER = msgspec.msgpack.Encoder()
_SESSION_RECORD = msgspec.msgpack.Decoder(SessionRecord)


@expose
class GatewayEndpoint:
    """The Pyro object the message bus and services deliver to.

    Hands envelopes to the gateway's loop. The bus calls :meth:`deliver`; a service calls
    :meth:`deliver_direct` with what it may deliver without the bus (the one-hop path).

    Args:
        loop: the gateway's event loop.
        sink: the gateway.
        on_loop: Pyro calls are served on the loop itself (``single_thread``).
        node: the gateway's node id.
        config: the Pyro settings (how much may wait for the loop, and for how long).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sink: BusSink,
        on_loop: bool,
        node: str = "",
        config: PyroConfig | None = None,
    ) -> None:
        config = config if config is not None else PyroConfig()
        self._loop = loop
        self._sink = sink
        self._on_loop = on_loop
        self._node = node
        # A service sends again what a crashed bus did not confirm, and through the bus what
        # a failed direct call may have delivered: deliver it once, whichever way it came.
        self.recent = RecentIds()
        # Direct batches handed to the loop and not yet taken there, in bytes: bounded, so
        # that services faster than the loop wait (on their calls' threads), never pile up.
        self._waiting = threading.Condition()
        self._waiting_bytes = 0
        # In encoded bytes: a batch decoded takes several times that in memory.
        self._waiting_limit = config.max_message_size // 4
        self._wait_for = min(config.call_timeout, _ROOM_WAIT)
        # The bus's deliveries wait longer (they cannot be sent again), but less than the
        # bus's call may take.
        self._bus_wait = min(config.call_timeout, config.comm_timeout, 2.0) / 2
        self._behind_logged = float("-inf")
        self.direct_batches = 0
        """Batches services delivered here directly."""
        self.refused = 0
        """Envelopes refused on the direct path (a service may not send them, or not here)."""
        self.bus_overdue = 0
        """Batches from the message bus taken past the bound: the loop made no room in time."""
        self._refused_logged = 0.0

    def deliver(self, blob: Any) -> None:
        """Take a batch of envelopes from the message bus; returns before they are processed.

        The batches waiting for the loop are bounded as for :meth:`deliver_direct` (one
        bound for both paths, counted in encoded bytes before decoding), and the bus's go
        first: one is taken whenever less than the bound waits, whatever its size (at most
        half of ``max_message_size``), so direct batches cannot keep it out. Otherwise the
        call waits on its Pyro thread. The bus sends to a gateway one call at a time, so a
        loop that falls behind holds back the bus's sending to it rather than piling
        batches up in the gateway's memory. The bus cannot send a batch again, so none is
        refused: after a wait of half the shorter of ``call_timeout`` and
        ``comm_timeout``, at most 1 s (the bus's call must not time out first), the batch
        is taken anyway, and a warning says the loop is that far behind.
        """
        if self._on_loop:
            self._deliver_all(decode_batch(blob))
            return
        data = to_bytes(blob)
        size = len(data)
        if not self._room_for(size, self._bus_wait, first=True):
            self._behind(size)
        handed = False
        try:
            envelopes = decode_batch(data)
            self._loop.call_soon_threadsafe(self._deliver_bus, envelopes, size)
            handed = True
        finally:
            if not handed:
                self._taken(size)

    def _deliver_bus(self, envelopes: list[Envelope], size: int) -> None:
        """Hand a batch from the message bus to the gateway (on the loop)."""
        try:
            self._deliver_all(envelopes)
        finally:
            self._taken(size)

    def _behind(self, size: int) -> None:
        """Take ``size`` more bytes past the bound, and say so (at most every 10 s)."""
        now = time.monotonic()
        with self._waiting:
            self._waiting_bytes += size
            self.bus_overdue += 1
            waiting = self._waiting_bytes
            if now - self._behind_logged < 10.0:
                return
            self._behind_logged = now
        log.warning(
            "gateway %s: its event loop has not made room for the bus's deliveries in %.1f s "
            "(%d bytes wait for it, bound %d); taking the next batch anyway (%d so far). The "
            "loop is stalled or overloaded: look for a blocking call or a CPU-bound handler",
            self._node,
            self._bus_wait,
            waiting,
            self._waiting_limit,
            self.bus_overdue,
        )

    def deliver_direct(self, blob: Any) -> str | None:
        """Take a batch a service delivers straight to this gateway.

        Checked as the message bus checks what a service routes through it
        (:func:`~wsbus_pyro.transport.from_service`: a service's sender, no presence
        events, no bus notices, no history positions of the sender's own), and only what a
        service may deliver directly (:func:`~wsbus_pyro.transport.direct_node`: a
        service's application message to connections of this gateway alone). The caller
        proved the shared secret in its handshake, as every peer of a wsbus daemon does.

        Returns before the envelopes are processed, once they are on the loop's queue, as
        :meth:`deliver` does: what the service sends next, by either path, comes after.
        Room is reserved from the batch's encoded length before it is decoded: when the
        direct batches waiting for the loop already hold a quarter of
        ``max_message_size``, the call waits (on its Pyro thread, never the loop) for at
        most 0.2 s (``call_timeout`` if shorter), then answers ``unavailable``.

        Args:
            blob: the batch, as bytes or as base64 text (cheaper for Pyro's serializer to
                read: a string, not the dict it wraps bytes in).

        Returns:
            None when every envelope was taken. Otherwise one status for the whole batch,
            none of which was taken: ``refused`` (something in it a service may not
            deliver directly), ``no_route`` (connections of another gateway: the
            service's directory is stale) or ``unavailable`` (no room); the service then
            sends it through the bus.
        """
        data = _b64decode(blob, validate=True) if isinstance(blob, str) else to_bytes(blob)
        size = 0 if self._on_loop else len(data)
        if size and not self._room_for(size):
            return UNAVAILABLE
        handed = False
        try:
            envelopes = decode_batch(data)
            taken: list[Envelope] = []
            for envelope in envelopes:
                node = direct_node(envelope)
                checked = None if node is None else from_service(envelope)
                if checked is None or node != self._node:
                    status = REFUSED if checked is None else NO_ROUTE
                    self._refuse(envelope, status, len(envelopes))
                    return status
                taken.append(checked)
            if not taken:
                return None
            if self._on_loop:
                self._deliver_direct(taken, 0)
            else:
                try:
                    self._loop.call_soon_threadsafe(self._deliver_direct, taken, size)
                except RuntimeError:  # the loop closed: the gateway is stopping
                    return UNAVAILABLE
            handed = True
        finally:
            if not handed:
                self._taken(size)
        return None  # all taken: the shortest answer to serialize, on the critical path

    def _room_for(self, size: int, wait: float | None = None, first: bool = False) -> bool:
        """Wait (a Pyro thread, never the loop) until ``size`` more bytes may wait.

        At most ``wait`` seconds (the direct path's when None); False: no room by then,
        and nothing reserved. With ``first``, there is room whenever less than the bound
        waits (the bus's batches); otherwise only for the whole of ``size``.
        """
        deadline = 0.0
        limit = self._waiting_limit
        with self._waiting:
            while self._waiting_bytes and (
                self._waiting_bytes >= limit if first else self._waiting_bytes + size > limit
            ):
                now = time.monotonic()
                if not deadline:
                    deadline = now + (self._wait_for if wait is None else wait)
                elif now >= deadline:
                    return False
                self._waiting.wait(deadline - now)
            self._waiting_bytes += size
        return True

    def _taken(self, size: int) -> None:
        if size:
            with self._waiting:
                self._waiting_bytes -= size
                self._waiting.notify_all()

    def _deliver_direct(self, envelopes: list[Envelope], size: int) -> None:
        """Hand a service's direct batch to the gateway (on the loop)."""
        self.direct_batches += 1  # counted here, on the one loop thread
        try:
            deliver = self._sink.deliver
            recent = self.recent
            for envelope in envelopes:
                if recent.seen(envelope):
                    continue
                deliver(envelope)
                recent.remember(envelope)
        finally:
            self._taken(size)

    def _refuse(self, envelope: Envelope, status: str, count: int) -> None:
        """Count and log (at most every 10 s) a direct batch refused (a Pyro thread)."""
        now = time.monotonic()
        with self._waiting:  # many Pyro threads count here
            self.refused += count
            if now - self._refused_logged < 10.0:
                return
            self._refused_logged = now
        sender = envelope.sender
        who = sender.name if isinstance(sender, ServiceAddress) else type(sender).__name__
        if status == REFUSED:
            log.warning(
                "gateway %s refused a direct delivery of %r from %s: a service may not "
                "deliver that without the message bus (%d envelope(s) refused so far). A "
                "peer that holds the secret and sends this is not a wsbus service",
                self._node,
                envelope.type,
                who,
                self.refused,
            )
        else:
            log.info(
                "gateway %s was sent %r for another gateway's connections, from %s: the "
                "service's directory of gateways is out of date; it sends it through the bus",
                self._node,
                envelope.type,
                who,
            )

    def _deliver_all(self, envelopes: list[Envelope]) -> None:
        # The duplicate check runs here, on the loop, where the gateway takes each
        # envelope: an id is recorded only once its envelope was handed to the gateway
        # (never for a batch whose hand-off failed), and copies arriving in two batches
        # at once are checked one after the other.
        deliver = self._sink.deliver
        recent = self.recent
        for envelope in envelopes:
            if envelope.type == GATEWAY_LOST and envelope.sender == BUS_ADDRESS:
                self._gateway_lost(envelope)
                continue
            if recent.seen(envelope):
                continue
            deliver(envelope)
            recent.remember(envelope)

    def _gateway_lost(self, notice: Envelope) -> None:
        """The bus's notice that another gateway died: tell the gateway, in stream order."""
        content = notice.content
        node = content.get("node") if isinstance(content, dict) else None
        if isinstance(node, str) and isinstance(self._sink, HearsGateways):
            # The bus itself tells the services: this gateway only cleans up its own view.
            self._sink.gateway_lost(NodeId(node), False)


class PyroBus:
    """A :class:`wsbus.Bus` over Pyro5: the gateway joins a message bus found by name.

    It is also a :class:`wsbus.bus.ClaimsAliases` (the alias table is the message bus's),
    a :class:`wsbus.bus.ReportsAvailability`, a :class:`wsbus.bus.KeepsHistory` and a
    :class:`wsbus.bus.KeepsSessions` (history and closed sessions are kept in the message
    bus process, in memory, for every gateway on it).

    Args:
        config: Pyro settings; the name server at ``ns_host:ns_port`` must be running, and
            a message bus (``wsbus bus``) registered in it.
    """

    def __init__(self, config: PyroConfig | None = None) -> None:
        self.config = config if config is not None else PyroConfig()
        self._reconnects = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._daemon: SecureDaemon | None = None
        self._publisher: Forwarder | None = None
        self._watchdog: threading.Thread | None = None
        self._stop = threading.Event()
        self._watched: dict[int, socket.socket] = {}
        self._node = ""
        self._bus_reachable = True
        # Types (and service names) the bus took from this gateway: after a bus restart,
        # they are "unavailable" (retry) while their services re-register, not "no_route".
        self._served: set[tuple[bool, str]] = set()
        self.uri = ""
        self.name = ""
        self._sink: BusSink | None = None
        self._endpoint: GatewayEndpoint | None = None
        # The aliases this gateway's connections hold on the bus, claimed again when the
        # gateway re-registers (the bus restarted, or dropped it). Changed on the loop,
        # read by the watchdog thread: under the lock.
        self._claims: dict[str, ConnId] = {}
        self._claiming: dict[str, int] = {}
        self._unreleased: dict[str, ConnId] = {}
        self._claims_lock = threading.Lock()
        # Claims and releases are calls to the bus on this one thread, which owns their
        # proxy (Pyro proxies belong to one thread), in the order they were made.
        self._control: _BusLine | None = None
        self._reclaimed = True
        """False while a registration's alias claims are not all sent."""
        self._displaced = False
        self._history: bytes | None = None
        # History reads and session records: calls to the bus on a thread of their own, in
        # the order made (a session saved here is saved before a take made after it).
        self._store: _BusLine | None = None

    # -- Bus -----------------------------------------------------------------------------

    async def start(self, sink: BusSink) -> None:
        """Start the daemon in the loop, join the bus, and keep the registration alive.

        Raises:
            BusUnavailable: no name server or message bus could be reached; the message
                says where it looked.
        """
        if self._loop is not None:
            raise ConfigError("this PyroBus is started already")
        config = self.config
        apply(config)
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._sink = sink
        self._node = str(sink.node)
        self.name = f"{config.gateway_prefix}{self._node}"
        self._control = _BusLine(f"wsbus-aliases-{self._node}", self._bus_proxy, config)
        self._store = _BusLine(f"wsbus-store-{self._node}", self._bus_proxy, config)
        daemon = SecureDaemon(config)
        self._daemon = daemon
        endpoint = GatewayEndpoint(
            loop, sink, on_loop=config.single_thread, node=self._node, config=config
        )
        self._endpoint = endpoint
        self.uri = str(daemon.register(endpoint, objectId=self.name))
        if config.single_thread:
            self._sync_readers()
        else:
            listener: socket.socket = daemon.sock
            listener.setblocking(False)
            loop.add_reader(listener.fileno(), self._accept, listener)
            self._watched[listener.fileno()] = listener
        self._publisher = Forwarder(
            "message bus", self._bus_proxy, "publish", config, retry_after=0.2
        )
        self._publisher.start()
        try:
            await asyncio.to_thread(self._register)
        except Exception:
            await self.close()
            raise
        self._watchdog = threading.Thread(
            target=self._watch, name=f"wsbus-watchdog-{self._node}", daemon=True
        )
        self._watchdog.start()
        log.info("gateway %s on the Pyro bus at %s", self._node, self.uri)

    async def publish(self, envelope: Envelope) -> None:
        """Put an envelope on the bus; return once the services it is for have it.

        Raises:
            NoRoute: no service handles its type.
            BusUnavailable: the bus or the service cannot take it now; retry later.
        """
        assert self._loop is not None and self._publisher is not None
        loop = self._loop
        future: asyncio.Future[str] = loop.create_future()

        def settle(status: str) -> None:
            loop.call_soon_threadsafe(_set, future, status)

        self._publisher.put(envelope, settle)
        try:
            async with asyncio.timeout(self.config.call_timeout + self.config.comm_timeout):
                status = await future
        except TimeoutError:
            raise BusUnavailable("the message bus did not answer in time") from None
        to = envelope.to
        key = (True, to.name) if isinstance(to, ServiceAddress) else (False, envelope.type)
        if status == OK:
            if key not in self._served and len(self._served) < _SERVED_LIMIT:
                self._served.add(key)
            return
        if status == NO_ROUTE or (status == REREGISTERING and key not in self._served):
            raise NoRoute(envelope.type)
        if status == REREGISTERING:
            raise BusUnavailable(f"the service for {envelope.type!r} is re-registering", False)
        # The bus answered but a service could not take it: the bus itself is fine.
        whole_bus = self._publisher is None or self._publisher.down
        raise BusUnavailable(f"the bus could not deliver {envelope.type!r} now", whole_bus)

    async def probe(self, envelope: Envelope) -> None:
        """Send a probe round the message bus and back to this gateway (``wsbus.bus.Probes``).

        Raises:
            BusUnavailable: the message bus cannot be reached, or does not know this
                gateway (it registers again within ``reregister_interval``).
        """
        status = await self._call_bus("probe", encode_batch([envelope]))
        if status != OK:
            raise BusUnavailable("the message bus does not know this gateway yet; it registers")

    async def live_services(self) -> dict[str, int]:
        """The services registered on the message bus and not marked down, one instance each.

        Raises:
            BusUnavailable: the message bus cannot be reached.
        """
        info = await self._call_bus("info")
        services = info.get("services", {}) if isinstance(info, dict) else {}
        return {
            str(name): 1
            for name, state in services.items()
            if isinstance(state, dict) and not state.get("down")
        }

    @property
    def reconnects(self) -> int:
        """Times this gateway registered again with a message bus that no longer knew it.

        A restarted bus, or one that dropped the gateway; read by the metrics
        (``wsbus_bus_reconnects_total``).
        """
        return self._reconnects

    @property
    def direct_batches(self) -> int:
        """Batches services delivered to this gateway directly, not through the bus."""
        return 0 if self._endpoint is None else self._endpoint.direct_batches

    @property
    def available(self) -> bool:
        """True while the message bus is reachable.

        That is, the watchdog's last check (every ``reregister_interval``) or the last
        publish reached it.
        """
        if self._publisher is None:
            return False
        return self._bus_reachable or not self._publisher.down

    async def close(self) -> None:
        """Leave the bus, stop the daemon and the threads. Idempotent."""
        self._stop.set()
        loop = self._loop
        if loop is not None:
            for fd in list(self._watched):
                loop.remove_reader(fd)
            self._watched.clear()
        if self._watchdog is not None:
            await asyncio.to_thread(self._watchdog.join, self.config.reregister_interval + 1)
            self._watchdog = None
            await asyncio.to_thread(self._unregister)
        if self._publisher is not None:
            await asyncio.to_thread(self._publisher.stop, 2.0)
            self._publisher = None
        lines, self._control, self._store = (self._control, self._store), None, None
        for line in lines:
            if line is not None:
                await line.close()
        if self._daemon is not None:
            daemon, self._daemon = self._daemon, None
            await asyncio.to_thread(daemon.close)

    # -- ClaimsAliases -------------------------------------------------------------------

    async def claim_alias(self, alias: str, conn_id: ConnId) -> bool:
        """Claim ``alias`` for ``conn_id`` in the message bus's table, across every gateway.

        Returns:
            True when ``conn_id`` holds it now (or did already); False when another
            connection, on this gateway or another, holds it.

        Raises:
            BusUnavailable: the bus cannot be reached, this gateway is re-registering with
                it, or it restarted a moment ago and the gateways are claiming their
                aliases again; nothing was claimed. Retry.
        """
        with self._claims_lock:
            self._claiming[alias] = self._claiming.get(alias, 0) + 1
            if self._unreleased.get(alias) == conn_id:
                # Claimed again before the bus heard of the release: keep it held.
                del self._unreleased[alias]
        try:
            status = await self._call_bus("claim_alias", alias, conn_id)
            if status == OK:
                with self._claims_lock:
                    self._claims[alias] = conn_id
                return True
        finally:
            with self._claims_lock:
                left = self._claiming[alias] - 1
                if left:
                    self._claiming[alias] = left
                else:
                    del self._claiming[alias]
        if status == TAKEN:
            return False
        if status == REREGISTERING:
            raise BusUnavailable(
                "the message bus restarted a moment ago and the gateways are claiming their "
                "aliases again",
                False,
            )
        raise BusUnavailable(f"gateway {self._node} is re-registering with the message bus", False)

    async def release_alias(self, alias: str, conn_id: ConnId) -> None:
        """Free ``alias`` in the bus's table if ``conn_id`` holds it; nothing otherwise.

        Raises:
            BusUnavailable: the bus cannot be reached. The release is sent again with the
                gateway's next registration check (every ``reregister_interval``), and
                the bus frees every alias of a gateway that leaves or stops checking in.
        """
        with self._claims_lock:
            if self._claims.get(alias) == conn_id:
                del self._claims[alias]
        try:
            await self._call_bus("release_alias", alias, conn_id)
        except BusUnavailable:
            with self._claims_lock:
                if len(self._unreleased) >= _UNRELEASED_LIMIT:
                    # The oldest is given up: the bus frees it when this gateway leaves.
                    del self._unreleased[next(iter(self._unreleased))]
                self._unreleased[alias] = conn_id
            raise

    async def _call_bus(self, method: str, *args: Any) -> Any:
        """Call the message bus on the alias thread; BusUnavailable when it cannot."""
        if self._control is None:
            raise BusUnavailable("this gateway is not on the bus (not started, or closed)")
        return await self._control.call(method, *args)

    def _clear_refused(self, alias: str, conn_id: ConnId) -> None:
        """On the loop: drop an alias the bus gave another gateway while this one was away."""
        with self._claims_lock:
            if self._claims.get(alias) != conn_id:
                return  # cleared or changed meanwhile
            del self._claims[alias]
        sink = self._sink
        if sink is None:
            return
        log.warning(
            "alias %r of connection %s was cleared: another gateway's connection claimed it "
            "while this gateway was cut off from the message bus",
            alias,
            conn_id,
        )
        # As a service would: the gateway clears it in its registry (a request with no
        # service sender gets no answer).
        sink.deliver(control.alias_lost(sink.node, conn_id, time.time()))

    # -- KeepsHistory, KeepsSessions -----------------------------------------------------

    def keep_history(self, config: HistoryConfig) -> None:
        """Say which groups keep history; sent to the message bus with the registration.

        Call it before :meth:`start`. The message bus keeps history as the gateway that
        registered last says (every gateway of a bus should say the same; a change is
        logged there and starts history again under a new epoch).
        """
        self._history = _ENCODER.encode(config)

    async def history(self, group: str, after: Position, limit: int) -> list[Envelope] | None:
        """Return ``group``'s envelopes after ``after`` from the message bus, oldest first.

        At most ``limit``; they come in as many calls as Pyro's message size needs.

        Returns:
            The stamped envelopes; None when they cannot all be given (the bus keeps no
            history for the group, ``after`` is of another epoch (the bus restarted), or
            entries after it were trimmed).

        Raises:
            BusUnavailable: the message bus cannot be reached.
        """
        found: list[Envelope] = []
        while len(found) < limit:
            answer = await self._call_store(
                "history", group, [after.epoch, after.offset], limit - len(found)
            )
            if answer is None:
                return None
            batch = decode_batch(answer[0])
            found.extend(batch)
            if not answer[1] or not batch:
                break
            stamped = position_of(batch[-1])
            if stamped is None:
                break
            after = stamped[1]
        return found

    async def save_session(self, record: SessionRecord, ttl: float) -> None:
        """Keep a closed connection's record in the message bus for ``ttl`` seconds.

        Raises:
            BusUnavailable: the message bus cannot be reached, or the record is larger than
                a Pyro message may carry (its unacknowledged deliveries are too big).
        """
        blob = _ENCODER.encode(record)
        if len(blob) > self.config.max_message_size // 2:
            raise BusUnavailable(
                f"the session record of {record.sid[:6]}... is {len(blob)} bytes, more than a "
                "Pyro message may carry (its unacknowledged deliveries): not kept",
                False,
            )
        if await self._call_store("save_session", blob, float(ttl)) != OK:
            raise BusUnavailable("the message bus refused a session record", False)

    async def take_session(self, sid: str) -> SessionRecord | None:
        """Return the record of ``sid`` from the message bus and delete it there.

        A second take gets None.

        Raises:
            BusUnavailable: the message bus cannot be reached.
        """
        blob = await self._call_store("take_session", sid)
        if blob is None:
            return None
        try:
            return _SESSION_RECORD.decode(to_bytes(blob))
        except (msgspec.MsgspecError, TypeError, ValueError) as exc:
            log.warning("the message bus gave a session record this gateway cannot read: %s", exc)
            return None

    async def _call_store(self, method: str, *args: Any) -> Any:
        """Call the message bus on the store thread; BusUnavailable when it cannot."""
        if self._store is None:
            raise BusUnavailable("this gateway is not on the bus (not started, or closed)")
        return await self._store.call(method, *args)

    # -- the daemon in the loop ----------------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        """Accept one Pyro connection and give it to a pool thread (threadpool mode)."""
        try:
            conn, address = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("accepting a Pyro connection failed: %s", exc)
            return
        daemon = self._daemon
        if daemon is None:
            conn.close()
            return
        # The doorman reads the handshake off the pool (never on this loop, never on a
        # worker), so idle or half-open peers cannot hold the workers.
        daemon.admit(conn, address)

    def _on_event(self, sock: socket.socket) -> None:
        """Serve one event of the multiplexing daemon (single-thread mode)."""
        daemon = self._daemon
        if daemon is None:
            return
        try:
            daemon.events([sock])
        except Exception:
            log.exception("the Pyro daemon failed on an event")
        self._sync_readers()

    def _sync_readers(self) -> None:
        """Watch exactly the daemon's sockets, by file descriptor (they come and go)."""
        loop = self._loop
        daemon = self._daemon
        if loop is None or daemon is None:
            return
        current: dict[int, socket.socket] = {}
        for sock in daemon.sockets:
            fd = sock.fileno()
            if fd >= 0:
                current[fd] = sock
        for fd in list(self._watched):
            if fd not in current or current[fd] is not self._watched[fd]:
                loop.remove_reader(fd)
                del self._watched[fd]
        for fd, sock in current.items():
            if fd not in self._watched:
                loop.add_reader(fd, self._on_event, sock)
                self._watched[fd] = sock

    # -- registration (threads only) -----------------------------------------------------

    def _bus_proxy(self) -> Proxy:
        config = self.config
        # Resolved here, not with PYRONAME: the proof in the handshake names the address.
        return lookup(config.bus_name, config)

    def _register(self) -> None:
        """Register with the name server and the bus (blocking: a thread's work)."""
        config = self.config
        try:
            with name_server(config) as ns:
                ns.register(self.name, self.uri)
        except (pyro_errors.CommunicationError, OSError) as exc:
            raise BusUnavailable(
                f"no Pyro name server at {config.ns_host}:{config.ns_port} ({exc}); "
                "start one with `wsbus nameserver`, or pass its address"
            ) from None
        try:
            with self._bus_proxy() as bus:
                answer = bus.register_gateway(self._node, self.uri, [], False, True, self._history)
        except (pyro_errors.CommunicationError, pyro_errors.NamingError, OSError) as exc:
            raise BusUnavailable(
                f"no message bus named {config.bus_name!r} in the name server ({exc}); "
                "start one with `wsbus bus`"
            ) from None
        taken_by = answer.get("taken_by") if isinstance(answer, dict) else None
        if taken_by is not None:
            raise ConfigError(
                f"another gateway with node id {self._node!r} is on this bus (at {taken_by}): "
                "give each gateway its own --node, or leave it out for a random one"
            )

    def _unregister(self) -> None:
        config = self.config
        try:
            with name_server(config) as ns:
                ns.remove(self.name)
            with self._bus_proxy() as bus:
                # Only this process's registration (and with it every alias it holds).
                bus.unregister_gateway(self._node, self.uri)
        except Exception as exc:
            log.info("leaving the bus: %s", exc)

    def _watch(self) -> None:
        """Check in with the bus and the name server every interval; re-register if needed.

        The bus check comes first and never waits on the name server: it is how the bus
        knows this gateway is alive (one that stops checking in loses its aliases).
        """
        config = self.config
        ns: Proxy | None = None
        bus: Proxy | None = None
        while not self._stop.wait(config.reregister_interval):
            bus = self._check_bus(bus)
            ns = self._check_name_server(ns)
        for proxy in (ns, bus):
            if proxy is not None:
                proxy._pyroRelease()

    def _check_bus(self, bus: Proxy | None) -> Proxy | None:
        try:
            if bus is None:
                bus = self._bus_proxy()
            registered = bus.registered("gateway", self._node, self.uri)
            if (not registered or not self._reclaimed) and self._reregister(
                bus, again=not registered
            ):
                log.info("gateway %s re-registered with the message bus", self._node)
                if not registered:
                    # The bus restarted, or had dropped this gateway: it is back on it.
                    self._reconnects += 1
            self._bus_reachable = True
            self._send_releases(bus)
        except Exception as exc:  # never let the watchdog die: it is how we recover
            self._bus_reachable = False
            if not isinstance(exc, pyro_errors.PyroError | OSError):
                log.warning("checking the message bus registration failed: %s", exc)
            if bus is not None:
                bus._pyroRelease()
            bus = None
        return bus

    def _check_name_server(self, ns: Proxy | None) -> Proxy | None:
        try:
            if ns is None:
                ns = name_server(self.config)
            if str(ns.lookup(self.name)) != self.uri:
                raise pyro_errors.NamingError("registration changed")
        except pyro_errors.NamingError:
            self._try_register(ns, "name server")
        except Exception as exc:
            if not isinstance(exc, pyro_errors.CommunicationError | OSError):
                log.warning("checking the name server registration failed: %s", exc)
            if ns is not None:
                ns._pyroRelease()
            ns = None
        return ns

    def _tell_loss(self) -> None:
        """Tell the gateway its clients may have missed messages (a thread's call).

        The bus did not have this gateway for a while (it restarted, or dropped it) and
        settled envelopes for gateways meanwhile: sends to aliases, users, groups and
        everyone went to the other gateways only, and sends to its connections were
        reported to their services, not to the clients.
        """
        sink, loop = self._sink, self._loop
        if loop is None or not isinstance(sink, HearsLoss):
            return
        detail = (
            f"gateway {self._node} was not registered with the message bus for a while (the "
            "bus restarted, or dropped it): what was sent to its clients meanwhile is lost"
        )
        with contextlib.suppress(RuntimeError):  # the loop closed
            loop.call_soon_threadsafe(sink.deliveries_lost, "bus_disconnected", detail)

    def _reregister(self, bus: Proxy, again: bool) -> bool:
        """Register again with every alias held: the bus restarted, or dropped this gateway.

        The aliases go in calls of at most a quarter of ``max_message_size`` each (a Pyro
        message has a size limit); if one fails, the next check sends them all again.

        Returns:
            False when another gateway process with this node id holds it now.
        """
        with self._claims_lock:
            held = [[alias, conn_id] for alias, conn_id in self._claims.items()]
        self._reclaimed = False
        refused: list[list[str]] = []
        for index, chunk in enumerate(_chunks(held, self.config.max_message_size // 4)):
            answer = bus.register_gateway(
                self._node, self.uri, chunk, again and index == 0, False, self._history
            )
            if answer.get("taken_by") is not None:
                # Another live gateway took this node id while this one was cut off.
                if not self._displaced:
                    log.error(
                        "another gateway with node id %r is on the bus (at %s): this one gets "
                        "no messages while that one runs. Give each gateway its own --node",
                        self._node,
                        answer["taken_by"],
                    )
                self._displaced = True
                return False  # tried again next interval
            self._displaced = False
            refused.extend(answer["refused"])
            if answer["missed"]:
                self._tell_loss()
        self._reclaimed = True
        loop = self._loop
        for alias, conn_id in refused:
            if loop is not None:
                with contextlib.suppress(RuntimeError):  # the loop closed
                    loop.call_soon_threadsafe(self._clear_refused, str(alias), ConnId(str(conn_id)))
        refused_aliases = {str(alias) for alias, _ in refused}
        with self._claims_lock:
            # Released while the registration was on its way: the bus holds them again.
            stale = [
                (alias, conn_id)
                for alias, conn_id in held
                if alias not in refused_aliases
                and self._claims.get(alias) != conn_id
                and alias not in self._claiming
            ]
        for alias, conn_id in stale:
            bus.release_alias(alias, conn_id)
        return True

    def _send_releases(self, bus: Proxy) -> None:
        """Send again the releases the bus could not be told of when they were made."""
        with self._claims_lock:
            pending = list(self._unreleased.items())
        for alias, conn_id in pending:
            bus.release_alias(alias, conn_id)
            with self._claims_lock:
                if self._unreleased.get(alias) == conn_id:
                    del self._unreleased[alias]

    def _try_register(self, ns: Proxy | None, what: str) -> None:
        if ns is None:
            return
        try:
            ns.register(self.name, self.uri)
            log.info("gateway %s re-registered with the %s", self._node, what)
        except Exception as exc:
            log.info("re-registering with the %s failed: %s", what, exc)


class _BusLine:
    """Calls to the message bus from the loop, made in order on one thread of their own.

    The thread owns the line's proxy (Pyro proxies belong to one thread); the loop only
    awaits the answers.
    """

    def __init__(self, name: str, connect: Callable[[], Proxy], config: PyroConfig) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name)
        self._connect = connect
        self._config = config
        self._proxy: Proxy | None = None
        self._used = 0.0

    async def call(self, method: str, *args: Any) -> Any:
        """Call ``method`` on the bus; BusUnavailable when it cannot be reached in time."""
        loop = asyncio.get_running_loop()
        try:
            # A lookup and two tries of the call, each bounded by comm_timeout.
            async with asyncio.timeout(3 * self._config.comm_timeout):
                return await loop.run_in_executor(self._executor, self._call, method, args)
        except TimeoutError:
            raise BusUnavailable("the message bus did not answer in time") from None
        except RuntimeError:  # the executor was shut down: the gateway is closing
            raise BusUnavailable("this gateway is leaving the bus") from None

    async def close(self) -> None:
        """Release the proxy (on its thread) and end the thread."""
        await asyncio.get_running_loop().run_in_executor(self._executor, self._release)
        self._executor.shutdown(wait=False)

    def _call(self, method: str, args: tuple[Any, ...]) -> Any:
        """Make one call on the line's proxy (the line's thread only)."""
        if (
            self._proxy is not None
            and time.monotonic() - self._used > self._config.comm_timeout / 2
        ):
            # The bus drops connections idle for comm_timeout: a fresh one, not a dead one.
            self._release()
        try:
            try:
                reused = self._proxy is not None
                if self._proxy is None:
                    self._proxy = self._connect()
                result = getattr(self._proxy, method)(*args)
            except pyro_errors.ConnectionClosedError:
                if not reused:
                    raise
                # The bus closed a connection we held: it never read this call (and claims,
                # releases and reads may be made twice anyway; a save is the same twice).
                self._release()
                self._proxy = self._connect()
                result = getattr(self._proxy, method)(*args)
        except (pyro_errors.CommunicationError, pyro_errors.NamingError, OSError) as exc:
            self._release()
            raise BusUnavailable(f"the message bus cannot be reached ({exc})") from None
        self._used = time.monotonic()
        return result

    def _release(self) -> None:
        if self._proxy is not None:
            self._proxy._pyroRelease()
            self._proxy = None


def _chunks(pairs: list[list[str]], size: int) -> list[list[list[str]]]:
    """Split ``[alias, conn_id]`` pairs into lists of about ``size`` bytes (at least one)."""
    chunks: list[list[list[str]]] = [[]]
    used = 0
    for pair in pairs:
        # Serpent's cost of a pair: its strings, quoted, and a little punctuation.
        cost = len(pair[0].encode()) + len(pair[1].encode()) + 16
        if chunks[-1] and used + cost > size:
            chunks.append([])
            used = 0
        chunks[-1].append(pair)
        used += cost
    return chunks


def _set(future: asyncio.Future[str], status: str) -> None:
    if not future.done():
        future.set_result(status)
