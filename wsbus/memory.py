"""The in-memory bus: the embedded default, and the fake every bus is measured against.

Services run in the gateway's process and event loop. Routing follows the rules in
:mod:`wsbus.bus`; an envelope handed to a service or to the gateway is handed over on the
spot, so the order of everything one sender emits is kept end to end.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from .bus import BusSink, is_for_gateway
from .envelope import (
    Envelope,
    GatewayAddress,
    ServiceAddress,
    decode_envelope,
    encode_envelope,
)
from .errors import BusUnavailable, ConfigError, NoRoute
from .service import Service, ServiceRunner

__all__ = ["MemoryBus"]

log = logging.getLogger("wsbus.memory")


class MemoryBus:
    """A bus inside one process, routing by message type to in-process services.

    Args:
        services: services to run; more can be added with :meth:`add_service`.
        record: keep every envelope the gateway publishes in :attr:`published` (for
            tests; it grows without bound).
        inbox_size: how many envelopes each service may have waiting before the bus
            refuses more with ``unavailable``.
        timeout: seconds a service waits for the gateway's answer to a control request.
        serialize: encode and decode every envelope on its way, as a bus between processes
            does, so that services see exactly what they would see over Pyro (lists, not
            tuples; no object shared with the sender) and content that cannot cross a
            process boundary fails here too. Costs a microsecond or two per envelope.
    """

    def __init__(
        self,
        services: Iterable[Service] = (),
        *,
        record: bool = False,
        inbox_size: int = 1000,
        timeout: float = 5.0,
        serialize: bool = True,
    ) -> None:
        self.record = record
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
        """Route an envelope from the gateway (rules 1 and 4 of :mod:`wsbus.bus`)."""
        self.publish_nowait(envelope)

    def publish_nowait(self, envelope: Envelope) -> bool:
        """Route an envelope at once; the gateway uses this to skip a coroutine per frame.

        Returns:
            True: the envelope was taken.

        Raises:
            NoRoute: nothing handles the type.
            BusUnavailable: the bus is marked down or the service's inbox is full.
        """
        if self.down:
            raise BusUnavailable("the in-memory bus is marked down")
        self._route_to_services(self._carry(envelope))
        if self.record:
            self.published.append(envelope)
        return True

    async def close(self) -> None:
        """Stop every service and detach the gateway."""
        for name in list(self._runners):
            await self.remove_service(name)
        self._sink = None

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
            service, self._from_service, inbox_size=self.inbox_size, timeout=self.timeout
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
            self._sink.deliver(envelope)
            return
        self._route_to_services(envelope)

    def _route_to_services(self, envelope: Envelope) -> None:
        to = envelope.to
        if to is None:
            pass  # by type, below: the common case, tested first
        elif isinstance(to, ServiceAddress):
            runner = self._runners.get(to.name)
            if runner is None:
                raise NoRoute(envelope.type)
            runner.accept(envelope)
            return
        else:
            raise NoRoute(envelope.type)
        runners = self._by_type.get(envelope.type)
        if not runners:
            raise NoRoute(envelope.type)
        if len(runners) == 1:
            runners[0].accept(envelope)
            return
        # All or nothing: a message either reaches every subscriber or none of them.
        for runner in runners:
            if not runner.has_room():
                raise BusUnavailable(f"service {runner.name!r} is busy (inbox full)", False)
        for runner in runners:
            runner.accept(envelope)
