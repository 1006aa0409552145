"""The in-memory bus: the embedded default, and the fake every bus is measured against.

Services run in the gateway's process and event loop. Routing follows the rules in
:mod:`wsbus.bus`; an envelope handed to a service or to the gateway is handed over on the
spot, so the order of everything one sender emits is kept end to end.

Each service has a bounded inbox. When a client's message finds it full, the bus does not
refuse it: :meth:`MemoryBus.publish_nowait` says False and :meth:`MemoryBus.publish` waits
for room, so the gateway stops reading that client until the service catches up, as TCP
holds back a sender on a bus between processes. Only a service that takes nothing for the
bus's ``timeout`` gets its callers ``unavailable``: that service is stuck. Clients held
back are let in, first come first served, once the service has drained its inbox to half,
each with a share of the room, which it fills without waiting again (see
:class:`~wsbus.service.ServiceRunner`): backpressure costs a wait per batch, not per message.

It keeps group history (:class:`~wsbus.bus.KeepsHistory`: it is the one place a service's
messages pass through on their way to the gateway, so it is each group's sequencer) and
closed sessions (:class:`~wsbus.bus.KeepsSessions`) in memory, and routes the gateway's
presence events to the services that declared ``wsbus.presence`` (rule 5; there is no
other gateway).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

import msgspec

from . import control
from .bus import BusSink, is_for_gateway, is_presence_event
from .envelope import (
    Envelope,
    GatewayAddress,
    ServiceAddress,
    decode_envelope,
    encode_envelope,
)
from .errors import BusUnavailable, ConfigError, NoRoute
from .history import (
    GROUP_HEADER,
    POSITION_HEADER,
    HistoryConfig,
    MemoryHistory,
    Position,
    history_group,
)
from .resume import MemorySessions, SessionRecord
from .service import Service, ServiceRunner, client_key

__all__ = ["MemoryBus"]

log = logging.getLogger("wsbus.memory")

_HISTORY_HEADERS = frozenset({POSITION_HEADER, GROUP_HEADER})


class MemoryBus:
    """A bus inside one process, routing by message type to in-process services.

    Args:
        services: services to run; more can be added with :meth:`add_service`.
        record: keep every envelope the gateway publishes in :attr:`published` (for
            tests; it grows without bound).
        inbox_size: how many envelopes each service may have waiting. A client's message
            that finds the inbox full waits for room, holding back the client that sent it
            (:meth:`publish`); a service's message to a service with a full inbox is
            refused (its send raises BusUnavailable), since a service's send cannot wait.
        timeout: seconds a service waits for the gateway's answer to a control request,
            and the longest :meth:`publish` waits for room in a service's inbox before it
            refuses (the client is told ``unavailable``, retry): a service that takes
            nothing for that long is stuck.
        serialize: encode and decode every envelope on its way, as a bus between processes
            does, so that services see exactly what they would see over Pyro (lists, not
            tuples; no object shared with the sender) and content that cannot cross a
            process boundary fails here too. Costs a microsecond or two per envelope.
        clock: the wall clock history ages and session records expire by (tests pass
            their own); ``time.time`` by default.
    """

    def __init__(
        self,
        services: Iterable[Service] = (),
        *,
        record: bool = False,
        inbox_size: int = 1000,
        timeout: float = 5.0,
        serialize: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.record = record
        self.clock = clock
        self.serialize = serialize
        self.published: list[Envelope] = []
        """With ``record``, every envelope the gateway published, in order."""
        self.inbox_size = inbox_size
        self.timeout = timeout
        self._pending: list[Service] = list(services)
        self._runners: dict[str, ServiceRunner] = {}
        self._by_type: dict[str, list[ServiceRunner]] = {}
        self._sink: BusSink | None = None
        self.down = False
        """Set to True to make the bus refuse everything with ``unavailable`` (tests)."""
        self.history_store: MemoryHistory | None = None
        """The group history, once the gateway said which groups keep it."""
        self.sessions = MemorySessions()
        """Closed sessions' records, for clients to resume."""

    # -- the gateway side (Bus) ----------------------------------------------------------

    async def start(self, sink: BusSink) -> None:
        """Attach the gateway and start the services given so far."""
        if self._sink is not None:
            raise ConfigError("this MemoryBus is attached to a gateway already")
        self._sink = sink
        pending, self._pending = self._pending, []
        for service in pending:
            await self.add_service(service)

    async def publish(self, envelope: Envelope) -> None:
        """Route an envelope from the gateway (rules 1 and 4 of :mod:`wsbus.bus`).

        Waits while an inbox it goes to is full (every one, for a type several services
        handle: all or nothing), then hands it over. The gateway's own reports and control
        answers never wait: one stuck behind a full inbox would hold up every answer after
        it, for every service; they are refused instead.

        Raises:
            NoRoute: nothing handles the type.
            BusUnavailable: the bus is marked down, or a service it goes to took nothing
                for ``timeout`` seconds (whole_bus False: that service is stuck), or the
                envelope is the gateway's own and an inbox it goes to is full.
        """
        if self.down:
            raise BusUnavailable("the in-memory bus is marked down")
        await self._publish(envelope, self._carry(envelope))

    async def publish_fresh(self, envelope: Envelope) -> None:
        """As :meth:`publish`, for an envelope only the bus holds (see PublishesFresh).

        Not copied, as with :meth:`publish_fresh_nowait`.
        """
        if self.down:
            raise BusUnavailable("the in-memory bus is marked down")
        await self._publish(envelope, self._carry(envelope) if self.record else envelope)

    async def _publish(self, envelope: Envelope, carried: Envelope) -> None:
        """Hand ``carried`` (``envelope`` or its copy) over, waiting for room."""
        if not self._unheard(carried) and not self._route_now(carried):
            if isinstance(carried.sender, GatewayAddress):
                raise BusUnavailable(
                    f"the inbox of a service {carried.type!r} goes to is full", whole_bus=False
                )
            await self._route_when_room(carried)
        if self.record:
            self.published.append(envelope)

    def publish_nowait(self, envelope: Envelope) -> bool:
        """Route an envelope at once if that needs no waiting; the gateway's fast path.

        Returns:
            True: the envelope was taken. False: an inbox it goes to is full (or others
            wait for it already); nothing was done, and :meth:`publish` waits for room.

        Raises:
            NoRoute: nothing handles the type.
            BusUnavailable: the bus is marked down.
        """
        if self.down:
            raise BusUnavailable("the in-memory bus is marked down")
        carried = decode_envelope(encode_envelope(envelope)) if self.serialize else envelope
        return self._take_nowait(envelope, carried)

    def publish_fresh_nowait(self, envelope: Envelope, handle_now: bool = False) -> bool:
        """As :meth:`publish_nowait`, for an envelope only the bus holds (see PublishesFresh).

        With ``serialize``, it is not copied: nothing but the services it goes to can reach
        it, and its content would cross a process boundary unchanged. With ``record`` it
        is, as :attr:`published` keeps it too. With ``handle_now``, the one service of its
        type, when idle, starts handling it before this returns
        (:meth:`ServiceRunner.offer <wsbus.service.ServiceRunner.offer>`).
        """
        if self.down:
            raise BusUnavailable("the in-memory bus is marked down")
        if self.record:
            copy = self.serialize
            carried = decode_envelope(encode_envelope(envelope)) if copy else envelope
            return self._take_nowait(envelope, carried, handle_now)
        # The common case straight to its service: this runs once per client frame.
        runners = self._by_type.get(envelope.type) if envelope.to is None else None
        if runners is not None and len(runners) == 1:
            return runners[0].offer(envelope, handle_now)
        return self._take_nowait(envelope, envelope, handle_now)

    def _take_nowait(self, envelope: Envelope, carried: Envelope, handle_now: bool = False) -> bool:
        """Hand ``carried`` (``envelope`` or its copy) over if that needs no waiting."""
        # The common case inline (one service for the type, room in its inbox): this runs
        # once per client frame.
        runners = self._by_type.get(carried.type) if carried.to is None else None
        if runners is not None and len(runners) == 1:
            if not runners[0].offer(carried, handle_now):
                return False
        elif not self._unheard(carried) and not self._route_now(carried):
            return False
        if self.record:
            self.published.append(envelope)
        return True

    async def close(self) -> None:
        """Stop every service and detach the gateway."""
        for name in list(self._runners):
            await self.remove_service(name)
        self._sink = None

    # -- history and sessions (KeepsHistory, KeepsSessions) ------------------------------

    def keep_history(self, config: HistoryConfig) -> None:
        """Keep history for the groups ``config`` names (the gateway calls it once)."""
        self.history_store = MemoryHistory(config)

    async def history(self, group: str, after: Position, limit: int) -> list[Envelope] | None:
        """Return ``group``'s messages after ``after``, oldest first, at most ``limit``.

        None when they cannot all be given (see :meth:`MemoryHistory.read`).

        Raises:
            BusUnavailable: the bus is marked down.
        """
        if self.down:
            raise BusUnavailable("the in-memory bus is marked down")
        if self.history_store is None:
            return None
        return self.history_store.read(group, after, self.clock(), limit)

    async def save_session(self, record: SessionRecord, ttl: float) -> None:
        """Keep a closed session's record for ``ttl`` seconds.

        Raises:
            BusUnavailable: the bus is marked down.
        """
        if self.down:
            raise BusUnavailable("the in-memory bus is marked down")
        self.sessions.save(record, ttl, self.clock())

    async def take_session(self, sid: str) -> SessionRecord | None:
        """Return a closed session's record and forget it; None if there is none (now).

        Raises:
            BusUnavailable: the bus is marked down.
        """
        if self.down:
            raise BusUnavailable("the in-memory bus is marked down")
        return self.sessions.take(sid, self.clock())

    # -- services ------------------------------------------------------------------------

    async def add_service(self, service: Service) -> None:
        """Put a service on the bus and start it (at once if the bus is started).

        Raises:
            ConfigError: a service with that name is on the bus already.
        """
        if self._sink is None:
            self._pending.append(service)
            return
        if service.name in self._runners:
            raise ConfigError(f"a service named {service.name!r} is on the bus already")
        runner = ServiceRunner(
            service,
            self._from_service,
            inbox_size=self.inbox_size,
            timeout=self.timeout,
            eager=True,
        )
        await runner.start()
        self._runners[service.name] = runner
        for type_ in runner.types:
            self._by_type.setdefault(type_, []).append(runner)
        log.info("service %r joined the bus, handling %s", service.name, sorted(runner.types))

    async def remove_service(self, name: str) -> None:
        """Take a service off the bus and stop it. Its types get ``no_route`` afterwards."""
        runner = self._runners.pop(name, None)
        if runner is None:
            return
        for type_ in runner.types:
            runners = self._by_type[type_]
            runners.remove(runner)
            if not runners:
                del self._by_type[type_]
        await runner.stop()

    async def probe(self, envelope: Envelope) -> None:
        """Hand a gateway's probe back to it on the next pass of the loop (:class:`Probes`).

        Raises:
            BusUnavailable: the bus is marked down, or has no gateway.
        """
        sink = self._sink
        if self.down or sink is None:
            raise BusUnavailable("the in-memory bus is marked down")
        asyncio.get_running_loop().call_soon(sink.deliver, self._carry(envelope))

    async def live_services(self) -> dict[str, int]:
        """Each service on the bus, with one instance (:class:`ListsServices`).

        Raises:
            BusUnavailable: the bus is marked down.
        """
        if self.down:
            raise BusUnavailable("the in-memory bus is marked down")
        return dict.fromkeys(self._runners, 1)

    @property
    def available(self) -> bool:
        """True unless the bus is marked down."""
        return not self.down

    @property
    def services(self) -> dict[str, Service]:
        """The services on the bus, by name."""
        return {name: runner.service for name, runner in self._runners.items()}

    def _carry(self, envelope: Envelope) -> Envelope:
        if not self.serialize:
            return envelope
        return decode_envelope(encode_envelope(envelope))

    def _from_service(self, envelope: Envelope) -> None:
        if self.down:
            raise BusUnavailable("the in-memory bus is marked down")
        envelope = self._carry(envelope)
        to = envelope.to
        if is_for_gateway(envelope) or isinstance(to, GatewayAddress):
            if self._sink is None:
                raise BusUnavailable("no gateway is attached to the bus")
            if isinstance(to, GatewayAddress) and to.node != self._sink.node:
                raise NoRoute(f"gateway node {to.node}")
            headers = envelope.headers
            if headers and (POSITION_HEADER in headers or GROUP_HEADER in headers):
                # Positions are the bus's to give: a service's own would disorder a group.
                headers = {k: v for k, v in headers.items() if k not in _HISTORY_HEADERS}
                envelope = msgspec.structs.replace(envelope, headers=headers)
            store = self.history_store
            if store is not None:
                group = history_group(envelope, store.config)
                if group is not None:
                    envelope = store.append(group, envelope, self.clock())
            self._sink.deliver(envelope)
            return
        self._route_to_services(envelope)

    def _targets(self, envelope: Envelope) -> list[ServiceRunner]:
        """The services an envelope goes to (rules 1 and 4), never empty.

        Raises:
            NoRoute: none.
        """
        to = envelope.to
        if to is None:
            runners = self._by_type.get(envelope.type)
            if runners:
                return runners
        elif isinstance(to, ServiceAddress):
            runner = self._runners.get(to.name)
            if runner is not None:
                return [runner]
        raise NoRoute(envelope.type)

    def _route_now(self, envelope: Envelope) -> bool:
        """Hand an envelope to its services if each has room; False (nothing done) if not."""
        runners = self._targets(envelope)
        if len(runners) == 1:
            runner = runners[0]
            # An answer to a service's request (or a receipt it waits for) resolves its
            # future: it takes no place.
            if runner.has_room() or envelope.type in (control.RESULT, control.RECEIPT):
                runner.accept(envelope)
                return True
            return False
        # All or nothing: a message either reaches every subscriber or none of them.
        if not all(runner.has_room() for runner in runners):
            return False
        for runner in runners:
            runner.accept(envelope)
        return True

    async def _route_when_room(self, envelope: Envelope) -> None:
        """Wait until every service the envelope goes to has room, then hand it over.

        For a type several services handle, each place got is held while the next is
        waited for (given back to nobody, so the wait ends), taken in order of service
        name, so that two senders waiting for the same services cannot each hold what the
        other waits for. Every place held is given back on a refusal or a cancel.
        """
        loop = asyncio.get_running_loop()
        held: list[ServiceRunner] = []
        runners = self._targets(envelope)
        if len(runners) == 1:
            # The common case on its own: one service, a client's share of its room.
            runner = runners[0]
            key = client_key(envelope)
            if not (runner.has_room() or runner.take_credit(key)):
                try:
                    await runner.wait_for_room(key, loop.time() + self.timeout)
                except TimeoutError:
                    raise self._stuck(runner) from None
            # No await since the place was found free or given: it is ours.
            runner.hold_room()
            held.append(runner)
        try:
            if held:
                if self.down:
                    raise BusUnavailable("the in-memory bus is marked down")
                if self._targets(envelope) == held:  # nobody joined or left meanwhile
                    held.pop().accept_held(envelope)
                    return
            while True:
                runners = self._targets(envelope)  # a service may have joined or left
                for runner in [runner for runner in held if runner not in runners]:
                    held.remove(runner)
                    runner.release_held()
                # A client's share of the room, for its next messages, when it waits for
                # one service: they go in without waiting again (ServiceRunner).
                key = client_key(envelope) if len(runners) == 1 else None
                for runner in sorted(runners, key=_by_name):
                    if runner in held:
                        continue
                    if not (runner.has_room() or (key is not None and runner.take_credit(key))):
                        try:
                            await runner.wait_for_room(key, loop.time() + self.timeout)
                        except TimeoutError:
                            raise self._stuck(runner) from None
                    # No await since the place was found free or given: it is ours.
                    runner.hold_room()
                    held.append(runner)
                    if self.down:
                        raise BusUnavailable("the in-memory bus is marked down")
                runners = self._targets(envelope)
                if len(runners) == len(held) and all(runner in held for runner in runners):
                    while held:
                        held.pop().accept_held(envelope)
                    return
        finally:
            for runner in held:
                runner.release_held()

    def _stuck(self, runner: ServiceRunner) -> BusUnavailable:
        """The refusal of a message a service took no room for in ``timeout`` seconds."""
        return BusUnavailable(
            f"service {runner.name!r} took nothing for {self.timeout:g} s "
            "(its inbox stayed full): it may be stuck",
            whole_bus=False,
        )

    def _unheard(self, envelope: Envelope) -> bool:
        """True for a presence event no service declared: nobody listening is fine (rule 5).

        A presence event some services declared is routed as any type-routed message.
        """
        return is_presence_event(envelope) and envelope.type not in self._by_type

    def _route_to_services(self, envelope: Envelope) -> None:
        """Route a service's envelope to services: refused, never waited for, when full."""
        runners = self._targets(envelope)
        # All or nothing: a message either reaches every subscriber or none of them. A
        # place promised to a client's message waiting for room is not free.
        for runner in runners:
            if not runner.has_room() and envelope.type != control.RESULT:
                raise BusUnavailable(f"service {runner.name!r} is busy (inbox full)", False)
        for runner in runners:
            runner.accept(envelope)


def _by_name(runner: ServiceRunner) -> str:
    return runner.name
