"""A bus with several gateways in one process, for tests of one cluster's semantics.

The in-memory bus hosts one gateway. :class:`Cluster` hosts several real
:class:`~wsbus.Gateway` objects, each attached through its own :class:`GatewayBus`, and
routes between them and in-process services the way a bus between processes does (rules of
:mod:`wsbus.bus`): a connection id reaches only its node; aliases, users, groups and
everyone reach every gateway, marked shared; a request ``to`` a gateway reaches that node.
With ``claims=True`` each gateway's bus is also a :class:`~wsbus.bus.ClaimsAliases` over
one shared table, :attr:`Cluster.aliases`.

What tests turn: :attr:`Cluster.silent` (nodes whose control requests vanish, as to a
gateway that died after it was listed), :attr:`Cluster.table_down` (the alias table cannot
be reached), :attr:`Cluster.claim_gate` (claims wait for it to be set).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable

import msgspec

from wsbus.bus import SHARED_HEADER, BusSink, is_for_gateway, is_presence_event
from wsbus.edge import MemoryClient, memory_pair
from wsbus.envelope import (
    ConnId,
    Envelope,
    GatewayAddress,
    NodeId,
    ServiceAddress,
    decode_envelope,
    encode_envelope,
)
from wsbus.errors import BusUnavailable, NoRoute
from wsbus.gateway import Gateway, GatewayConfig
from wsbus.hooks import HandshakeRequest
from wsbus.service import Service, ServiceRunner


class Cluster:
    """Gateways and services on one simulated bus (one event loop).

    Args:
        services: services to run once :meth:`start_services` is called.
        claims: give each gateway's bus ``claim_alias`` and ``release_alias``.
        timeout: seconds services wait for a gateway's answer.
    """

    def __init__(
        self, services: Iterable[Service] = (), *, claims: bool = False, timeout: float = 5.0
    ) -> None:
        self.claims = claims
        self.timeout = timeout
        self.sinks: dict[NodeId, BusSink] = {}
        self.runners: dict[str, ServiceRunner] = {}
        self._services = list(services)
        self.aliases: dict[str, ConnId] = {}
        """The shared alias table: alias -> the connection that holds it."""
        self.claim_log: list[tuple[str, str, ConnId]] = []
        """Every claim and release asked of the table: ("claim"|"release", alias, conn_id)."""
        self.silent: set[NodeId] = set()
        self.table_down = False
        self.claim_gate: asyncio.Event | None = None

    def bus(self) -> GatewayBus:
        """A bus for one more gateway."""
        return ClaimingBus(self) if self.claims else GatewayBus(self)

    async def start_services(self) -> None:
        """Start the services, each told how to list the live gateways."""
        for service in self._services:
            runner = ServiceRunner(
                service, self._from_service, timeout=self.timeout, gateways=self.live_gateways
            )
            await runner.start()
            self.runners[service.name] = runner

    async def stop_services(self) -> None:
        """Stop every service."""
        for runner in self.runners.values():
            await runner.stop()
        self.runners.clear()

    async def live_gateways(self) -> list[NodeId]:
        """The node ids of the attached gateways, in the order they started."""
        return list(self.sinks)

    def _from_service(self, envelope: Envelope) -> None:
        envelope = decode_envelope(encode_envelope(envelope))
        to = envelope.to
        if isinstance(to, GatewayAddress):
            if to.node not in self.sinks:
                raise NoRoute(f"gateway node {to.node}")
            if to.node not in self.silent:
                self.sinks[to.node].deliver(envelope)
            return
        if is_for_gateway(envelope):
            if not self.sinks:
                raise BusUnavailable("no gateway is attached")
            if envelope.recipients is None:
                # A control request with no node: the first gateway, as a bus that does
                # not span gateways would.
                next(iter(self.sinks.values())).deliver(envelope)
                return
            shared = msgspec.structs.replace(
                envelope, headers={**envelope.headers, SHARED_HEADER: "1"}
            )
            for sink in list(self.sinks.values()):
                sink.deliver(shared)
            return
        self._to_services(envelope)

    def _to_services(self, envelope: Envelope) -> None:
        to = envelope.to
        if isinstance(to, ServiceAddress):
            runners = [self.runners[to.name]] if to.name in self.runners else []
        else:
            runners = [r for r in self.runners.values() if envelope.type in r.types]
        if not runners:
            raise NoRoute(envelope.type)
        for runner in runners:
            runner.accept(envelope)

    # -- the shared alias table ----------------------------------------------------------

    async def claim(self, alias: str, conn_id: ConnId) -> bool:
        """Claim ``alias`` for ``conn_id`` in the shared table (see ClaimsAliases)."""
        self.claim_log.append(("claim", alias, conn_id))
        if self.claim_gate is not None:
            await self.claim_gate.wait()
        if self.table_down:
            raise BusUnavailable("the alias table is down")
        holder = self.aliases.setdefault(alias, conn_id)
        return holder == conn_id

    async def release(self, alias: str, conn_id: ConnId) -> None:
        """Release ``alias`` if ``conn_id`` holds it (see ClaimsAliases)."""
        self.claim_log.append(("release", alias, conn_id))
        if self.table_down:
            raise BusUnavailable("the alias table is down")
        if self.aliases.get(alias) == conn_id:
            del self.aliases[alias]


class GatewayBus:
    """One gateway's view of a :class:`Cluster`: a :class:`~wsbus.bus.Bus`."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.sink: BusSink | None = None

    async def start(self, sink: BusSink) -> None:
        """Attach the gateway."""
        self.sink = sink
        self.cluster.sinks[sink.node] = sink

    async def publish(self, envelope: Envelope) -> None:
        """Route a gateway's envelope to services (or to a gateway's answer's service)."""
        envelope = decode_envelope(encode_envelope(envelope))
        if is_presence_event(envelope):
            # Rule 5: the services that declared it and every other gateway; nobody
            # listening is fine.
            for node, sink in list(self.cluster.sinks.items()):
                if self.sink is None or node != self.sink.node:
                    sink.deliver(envelope)
            for runner in self.cluster.runners.values():
                if envelope.type in runner.types:
                    runner.accept(envelope)
            return
        self.cluster._to_services(envelope)

    async def close(self) -> None:
        """Detach the gateway."""
        if self.sink is not None:
            self.cluster.sinks.pop(self.sink.node, None)
            self.sink = None


class ClaimingBus(GatewayBus):
    """A :class:`GatewayBus` that is also :class:`~wsbus.bus.ClaimsAliases`."""

    async def claim_alias(self, alias: str, conn_id: ConnId) -> bool:
        """Claim in the cluster's shared table."""
        return await self.cluster.claim(alias, conn_id)

    async def release_alias(self, alias: str, conn_id: ConnId) -> None:
        """Release in the cluster's shared table."""
        await self.cluster.release(alias, conn_id)


class Running:
    """Gateways started on a :class:`Cluster`, and a way to connect clients to them."""

    def __init__(self, cluster: Cluster, gateways: list[Gateway]) -> None:
        self.cluster = cluster
        self.gateways = gateways
        self._tasks: list[asyncio.Task[None]] = []

    async def connect(
        self, gateway: Gateway, request: HandshakeRequest | None = None, *, welcome: bool = True
    ) -> MemoryClient:
        """Connect an in-memory client to ``gateway``; return it welcomed (with ``welcome``)."""
        conn, client = memory_pair(request=request)
        self._tasks.append(asyncio.create_task(gateway.serve(conn)))
        if not welcome:
            return client
        frame = await client.receive()
        assert frame["type"] == "wsbus.welcome", frame
        client.welcome = frame["content"]
        client.conn_id = frame["content"]["conn_id"]
        return client


@contextlib.asynccontextmanager
async def running(
    cluster: Cluster,
    nodes: Iterable[str] = ("a", "b"),
    *,
    plugins: Iterable[object] = (),
    **config: object,
) -> AsyncIterator[Running]:
    """Start a gateway per node on ``cluster`` (GatewayConfig ``config``), then the services.

    Everything is closed on the way out, and a connection task that failed fails the test.
    """
    gateways = [
        Gateway(
            cluster.bus(),
            config=GatewayConfig(node=node, **config),  # type: ignore[arg-type]
            plugins=plugins,
            entry_points=False,
        )
        for node in nodes
    ]
    for gateway in gateways:
        await gateway.start()
    await cluster.start_services()
    run = Running(cluster, gateways)
    try:
        yield run
    finally:
        for gateway in gateways:
            await gateway.close()
        await cluster.stop_services()
        results = await asyncio.gather(*run._tasks, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]
