"""Presence events and dead gateways on the NATS bus, on a real nats-server.

A gateway's presence event goes on ``P.ev.gw.<node>`` to every other gateway and to one
instance of each service that declared ``wsbus.presence``; a gateway whose directory entry
dies is reported to every live gateway (``HearsGateways.gateway_lost``), the one with the
lowest node id reporting it to services.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator

import msgspec
import nats
import pytest
import pytest_asyncio

from wsbus import Context, Service, control, handles
from wsbus.envelope import (
    ConnId,
    Envelope,
    EnvelopeId,
    GatewayAddress,
    NodeId,
    encode_envelope,
)
from wsbus_nats import NatsBus, NatsConfig, ServiceHost

WAIT = 20.0
"""Seconds any one step may take on a busy two-core machine before the test fails."""


class Sink:
    """A stand-in gateway: records what the bus delivers and the gateways it finds dead."""

    def __init__(self, node: str) -> None:
        self._node = NodeId(node)
        self.delivered: list[Envelope] = []
        self.gone: list[tuple[NodeId, bool]] = []

    @property
    def node(self) -> NodeId:
        """The stand-in's node id."""
        return self._node

    def deliver(self, envelope: Envelope) -> None:
        """Record an envelope."""
        self.delivered.append(envelope)

    def gateway_lost(self, node: NodeId, report: bool) -> None:
        """Record a dead gateway."""
        self.gone.append((node, report))


class Watcher(Service):
    """Keeps every presence event it hears."""

    name = "watcher"

    def __init__(self) -> None:
        self.events: list[Envelope] = []

    @handles(control.PRESENCE)
    async def presence(self, message: Envelope, ctx: Context) -> None:
        """Keep it."""
        self.events.append(message)


class OtherWatcher(Watcher):
    """The same, as another service."""

    name = "otherwatcher"


class Deaf(Service):
    """Declares no presence events."""

    name = "deaf"

    @handles("deaf.ping")
    async def ping(self, message: Envelope, ctx: Context) -> None:
        """Nothing."""


def _event(node: str, n: int, event: str = "join") -> Envelope:
    conn_id = ConnId(f"{node}.{n}")
    content = control.PresenceEvent(event, NodeId(node), group="room.1", conn_id=conn_id)
    return Envelope(
        id=EnvelopeId(f"{node}-presence-{n}"),
        type=control.PRESENCE,
        sender=GatewayAddress(NodeId(node)),
        content=msgspec.to_builtins(content),
        created=time.time(),
    )


async def _until(done: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT):
        while not done():
            await asyncio.sleep(0.02)


class Deployment:
    """Stand-in gateways and service instances on one server, closed at the end."""

    def __init__(self, config: NatsConfig) -> None:
        self.config = config
        self.buses: list[NatsBus] = []
        self.hosts: list[ServiceHost] = []

    async def gateway(self, node: str) -> tuple[NatsBus, Sink]:
        bus = NatsBus(self.config)
        sink = Sink(node)
        self.buses.append(bus)
        await bus.start(sink)
        return bus, sink

    async def host(self, service: Service) -> ServiceHost:
        host = ServiceHost(service, self.config)
        self.hosts.append(host)
        await host.start()
        return host

    async def close(self) -> None:
        for bus in self.buses:
            await bus.close()
        for host in self.hosts:
            await host.close()


@pytest_asyncio.fixture
async def deployment(nats_config: NatsConfig) -> AsyncIterator[Deployment]:
    made = Deployment(nats_config)
    try:
        yield made
    finally:
        await made.close()


async def test_an_event_reaches_the_other_gateways_and_one_instance_of_each_declaring_service(
    deployment: Deployment,
) -> None:
    a, sink_a = await deployment.gateway("ga")
    # Nobody listens yet: fine, never NoRoute.
    await a.publish(_event("ga", 0))
    _, sink_b = await deployment.gateway("gb")
    watchers = [Watcher(), Watcher()]
    for watcher in watchers:
        await deployment.host(watcher)
    other = OtherWatcher()
    await deployment.host(other)
    await deployment.host(Deaf())

    for n in range(1, 11):
        await a.publish(_event("ga", n))
    await _until(lambda: len(other.events) == 10 and len(sink_b.delivered) == 10)
    await _until(lambda: sum(len(w.events) for w in watchers) == 10)
    ids = [f"ga-presence-{n}" for n in range(1, 11)]
    assert [e.id for e in sink_b.delivered] == ids  # in order, each once
    assert [e.id for e in other.events] == ids
    assert sorted(e.id for w in watchers for e in w.events) == sorted(ids)  # one instance each
    assert sink_a.delivered == []  # not its own
    assert sink_b.delivered[0].content["event"] == "join"


async def test_an_event_whose_sender_is_not_its_subject_is_dropped_and_counted(
    deployment: Deployment, nats_config: NatsConfig
) -> None:
    _, sink_a = await deployment.gateway("ga")
    b, sink_b = await deployment.gateway("gb")
    watcher = Watcher()
    host = await deployment.host(watcher)
    nc = await nats.connect(list(nats_config.servers))
    try:
        # Claims to be gb, on ga's subject; and a client message dressed as an event.
        await nc.publish("wsbus.ev.gw.ga", encode_envelope(_event("gb", 1)))
        not_event = msgspec.structs.replace(_event("ga", 2), type="chat.say")
        await nc.publish("wsbus.ev.gw.ga", encode_envelope(not_event))
        await nc.publish("wsbus.ev.gw.ga", encode_envelope(_event("ga", 3)))
        await nc.flush()
    finally:
        await nc.close()
    await _until(lambda: len(sink_b.delivered) == 1 and len(watcher.events) == 1)
    assert [e.id for e in sink_b.delivered] == ["ga-presence-3"]
    assert [e.id for e in watcher.events] == ["ga-presence-3"]
    assert b.counters.sender_mismatches == 2 and host.counters.sender_mismatches == 2
    assert sink_a.delivered == []


@pytest.fixture
def gateway_gc(nats_config: NatsConfig) -> Iterator[subprocess.Popen[str]]:
    """A gateway (a NatsBus with a sink that takes nothing) with node id gc, in its own process."""
    code = (
        "import asyncio; from wsbus_nats import NatsBus, NatsConfig\n"
        "class Sink:\n"
        "    node = 'gc'\n"
        "    def deliver(self, envelope): pass\n"
        "async def main():\n"
        f"    bus = NatsBus(NatsConfig(servers=({nats_config.servers[0]!r},), heartbeat=0.5))\n"
        "    await bus.start(Sink())\n"
        "    print('ready', flush=True)\n"
        "    await asyncio.Event().wait()\n"
        "asyncio.run(main())\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)
        assert process.stdout is not None
        process.stdout.close()


async def test_a_dead_gateway_is_told_to_every_live_gateway_and_reported_by_the_lowest(
    deployment: Deployment, gateway_gc: subprocess.Popen[str]
) -> None:
    assert gateway_gc.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(gateway_gc.stdout.readline), 30)
    assert "ready" in line, line
    a, sink_a = await deployment.gateway("ga")
    b, sink_b = await deployment.gateway("gb")
    await _until(lambda: all("gc" in bus.directory.live_gateways() for bus in (a, b)))

    # Killed: no clean stop, its entry ages out.
    gateway_gc.kill()
    await asyncio.to_thread(gateway_gc.wait, 10)
    await _until(lambda: bool(sink_a.gone and sink_b.gone))
    assert sink_a.gone == [(NodeId("gc"), True)]  # ga is the lowest live node: it reports
    assert sink_b.gone == [(NodeId("gc"), False)]

    # A clean stop deletes the entry: told at once (no waiting for it to age).
    await b.close()
    await _until(lambda: len(sink_a.gone) == 2)
    assert sink_a.gone[1] == (NodeId("gb"), True)
