"""The NATS bus (gateway side) with real nats-server processes and real service instances."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec
import nats
import nats.aio.client
import pytest
import pytest_asyncio

from tests.conftest import assert_balanced
from wsbus import Codec, Context, Gateway, GatewayConfig, Service, control, handles, memory_pair
from wsbus.bus import (
    Bus,
    ClaimsAliases,
    KeepsHistory,
    KeepsSessions,
    ListsServices,
    Probes,
    ReportsAvailability,
)
from wsbus.edge import MemoryClient
from wsbus.envelope import (
    ClientAddress,
    ConnId,
    Envelope,
    EnvelopeId,
    Recipients,
    ServiceAddress,
    encode_envelope,
)
from wsbus.errors import BusUnavailable, ConfigError, NoRoute
from wsbus.ready import Readiness
from wsbus_nats import NatsBus, NatsConfig, ServiceHost
from wsbus_nats.directory import ServiceEntry, alias_key
from wsbus_nats.servers import NatsCluster, NatsServer
from wsbus_testing.conformance import (
    BusConformance,
    MakeBus,
    MakeUnavailable,
    RecordingSink,
    client_message,
)
from wsbus_testing.services import Director, Probe, Sequencer


class TestNatsBusConformance(BusConformance):
    """The conformance suite every bus passes, with service instances on the same NATS."""

    capabilities = frozenset(
        {ReportsAvailability, ClaimsAliases, KeepsHistory, KeepsSessions, Probes, ListsServices}
    )
    spans_gateways = True
    # JetStream's per-entry expiry counts whole seconds.
    session_ttl = 1.0

    @pytest.fixture
    def wsbus_make_unavailable(self, wsbus_nats_server: NatsServer) -> MakeUnavailable:
        """Stop the nats-server (by its own pid)."""

        async def make_unavailable(bus: Bus) -> None:
            await asyncio.to_thread(wsbus_nats_server.stop)

        return make_unavailable

    @pytest_asyncio.fixture
    async def wsbus_make_bus(self, nats_config: NatsConfig) -> AsyncIterator[MakeBus]:
        hosts: list[ServiceHost] = []
        buses: list[NatsBus] = []

        async def make(services: list[type[Service]]) -> Bus:
            for cls in services:
                host = ServiceHost(cls(), nats_config)
                await host.start()
                hosts.append(host)
            bus = NatsBus(nats_config)
            buses.append(bus)
            return bus

        yield make
        for bus in buses:
            await bus.close()
        for host in hosts:
            await host.close()


# -- helpers ---------------------------------------------------------------------------------


class LossSink(RecordingSink):
    """A stand-in gateway that also hears of lost deliveries (a HearsLoss)."""

    def __init__(self, bus: Bus, node: str = "sink") -> None:
        super().__init__(bus, node)
        self.notices: list[tuple[str, str]] = []

    def deliveries_lost(self, reason: str, detail: str) -> None:
        """Record a loss notice."""
        self.notices.append((reason, detail))


class Tally(Service):
    """Records the id of every ``tally.hit`` it gets (per instance)."""

    name = "tally"

    def __init__(self) -> None:
        self.seen: list[str] = []

    @handles("tally.hit")
    async def hit(self, message: Envelope, ctx: Context) -> None:
        """Record the id."""
        self.seen.append(message.id)


class Audit(Tally):
    """Another service declaring ``tally.hit``: it gets every one too."""

    name = "audit"


class Stuck(Service):
    """Takes one ``stuck.wait`` and waits on :attr:`release` (its inbox then fills)."""

    name = "stuck"

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()

    @handles("stuck.wait")
    async def wait(self, message: Envelope, ctx: Context) -> None:
        """Wait until released."""
        self.started.set()
        await self.release.wait()


class Hosts:
    """Service instances and buses on one NATS, all closed after the test."""

    def __init__(self, config: NatsConfig) -> None:
        self.config = config
        self.hosts: list[ServiceHost] = []
        self.buses: list[NatsBus] = []
        self.gateways: list[Gateway] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def host(
        self, service: Service, config: NatsConfig | None = None, **kwargs: Any
    ) -> ServiceHost:
        host = ServiceHost(service, config or self.config, **kwargs)
        await host.start()
        self.hosts.append(host)
        return host

    async def sink(self, node: str = "sink", config: NatsConfig | None = None) -> LossSink:
        bus = NatsBus(config or self.config)
        self.buses.append(bus)
        sink = LossSink(bus, node)
        await bus.start(sink)
        return sink

    async def gateway(self, node: str, **settings: Any) -> Gateway:
        config = GatewayConfig(node=node, **settings)
        gateway = Gateway(NatsBus(self.config), config=config, entry_points=False)
        await gateway.start()
        self.gateways.append(gateway)
        return gateway

    async def client(self, gateway: Gateway) -> MemoryClient:
        conn, client = memory_pair(Codec.JSON)
        self.tasks.append(asyncio.create_task(gateway.serve(conn)))
        welcome = await client.receive()
        client.conn_id = welcome["content"]["conn_id"]
        return client

    async def close(self) -> None:
        for gateway in self.gateways:
            await gateway.close()
        await asyncio.gather(*self.tasks)
        for bus in self.buses:
            await bus.close()
        for host in self.hosts:
            await host.close()


@pytest_asyncio.fixture
async def kit(nats_config: NatsConfig) -> AsyncIterator[Hosts]:
    hosts = Hosts(nats_config)
    try:
        yield hosts
    finally:
        await hosts.close()


async def _until(client: MemoryClient, type: str) -> dict[str, Any]:
    return await client.receive_until(type, timeout=10)


async def _first_of(client: MemoryClient, *types: str) -> dict[str, Any]:
    async with asyncio.timeout(10):
        while True:
            frame = await client.receive(10)
            if frame["type"] in types:
                return frame


def _from(node: str, type: str, content: Any, n: int = 1) -> Envelope:
    """A client message as gateway ``node`` publishes it (from its client ``node.1``)."""
    message = client_message(type, content, n)
    return msgspec.structs.replace(message, sender=ClientAddress(ConnId(f"{node}.1")))


async def _raw(config: NatsConfig) -> nats.aio.client.Client:
    return await nats.connect(list(config.servers))


# -- routing ---------------------------------------------------------------------------------


async def test_instances_of_a_service_share_its_traffic_and_each_service_gets_it_once(
    kit: Hosts,
) -> None:
    one, two, audit = Tally(), Tally(), Audit()
    for service in (one, two, audit):
        await kit.host(service)
    sink = await kit.sink()
    ids = [f"m{i}" for i in range(200)]
    for i in range(200):
        await sink.bus.publish(client_message("tally.hit", None, i))
    # publish returned: every target service holds each envelope already.
    async with asyncio.timeout(10):
        while len(one.seen) + len(two.seen) < 200 or len(audit.seen) < 200:
            await asyncio.sleep(0.01)
    assert one.seen and two.seen, "both instances of the service take a share"
    assert sorted(one.seen + two.seen) == sorted(ids)  # each message once, to one of them
    assert audit.seen == ids  # the other service got every one, in order
    assert one.seen == sorted(one.seen, key=ids.index)  # each instance's share in order


async def test_conn_ids_reach_their_gateway_and_shared_recipients_every_gateway(
    kit: Hosts,
) -> None:
    await kit.host(Director())
    g1 = await kit.gateway("g1")
    g2 = await kit.gateway("g2")
    a = await kit.client(g1)
    b = await kit.client(g2)
    b.send("director.alias", {"alias": "bee"})
    await _until(b, "director.alias.reply")
    for client in (a, b):
        client.send("director.join", {"group": "both"})
        assert (await _until(client, "director.join.reply"))["content"] == {"joined": True}

    a.send("director.send", {"recipients": {"aliases": ["bee"]}, "body": "cross"})
    assert (await _until(b, "director.item"))["content"] == "cross"
    a.send("director.send", {"recipients": {"conn_ids": [b.conn_id]}, "body": "by id"})
    assert (await _until(b, "director.item"))["content"] == "by id"
    b.send("director.send", {"recipients": {"groups": ["both"]}, "body": "group"})
    for client in (a, b):
        assert (await _until(client, "director.item"))["content"] == "group"
    a.send("director.send", {"recipients": {"everyone": True}, "body": "all"})
    for client in (a, b):
        assert (await _until(client, "director.item"))["content"] == "all"
    # Order per sender and client, across the engine.
    for i in range(100):
        a.send("director.send", {"recipients": {"conn_ids": [b.conn_id]}, "body": str(i)})
    got = [(await _until(b, "director.item"))["content"] for _ in range(100)]
    assert got == [str(i) for i in range(100)]
    # A conn id went to its own gateway only: g1 saw none of the messages to b's id.
    s1, s2 = g1.stats(), g2.stats()
    assert s2.bus_envelopes > s1.bus_envelopes
    # A shared message reaches the right gateway and nobody is reported missing.
    a.send("director.missed", None)
    assert (await _until(a, "director.missed.reply"))["content"] == {"missed": []}
    for gateway in (g1, g2):
        assert_balanced(gateway.stats())


async def test_publish_refuses_what_no_service_can_take_now(
    kit: Hosts, nats_config: NatsConfig
) -> None:
    stuck = Stuck()
    await kit.host(stuck, inbox_size=1)
    sink = await kit.sink()
    bus = sink.bus
    with pytest.raises(NoRoute):
        await bus.publish(client_message("nobody.handles.this", None))
    await bus.publish(client_message("stuck.wait", None, 1))  # taken by the handler
    await asyncio.wait_for(stuck.started.wait(), 10)
    await bus.publish(client_message("stuck.wait", None, 2))  # waits in the inbox
    with pytest.raises(BusUnavailable) as refused:
        await bus.publish(client_message("stuck.wait", None, 3))
    assert not refused.value.whole_bus and "busy" in refused.value.reason
    stuck.release.set()

    # An instance listed in the directory that no longer answers (it died a moment ago).
    nc = await _raw(nats_config)
    try:
        kv = await nc.jetstream().key_value(f"{nats_config.prefix}_services")
        entry = ServiceEntry("ghost", "dead1", ["ghost.boo"])
        await kv.put("ghost.dead1", msgspec.msgpack.encode(entry))
        directory = bus.directory  # type: ignore[attr-defined]
        async with asyncio.timeout(10):
            while not directory.service_live("ghost"):
                await asyncio.sleep(0.01)
        with pytest.raises(BusUnavailable) as gone:
            await bus.publish(client_message("ghost.boo", None))
        assert not gone.value.whole_bus and "no instance" in gone.value.reason
    finally:
        await nc.close()


async def test_a_sender_that_is_not_the_subject_is_dropped_and_counted(
    kit: Hosts, nats_config: NatsConfig
) -> None:
    tally = Tally()
    host = await kit.host(tally)
    sink = await kit.sink()
    bus = sink.bus
    assert isinstance(bus, NatsBus)
    forged = Envelope(
        id=EnvelopeId("f1"), type="x", sender=ServiceAddress("tally"), recipients=Recipients()
    )
    nc = await _raw(nats_config)
    try:
        # To the gateway, on another service's subject; then bytes that are no envelope.
        await nc.publish("wsbus.gw.sink.svc.evil", encode_envelope(forged))
        await nc.publish("wsbus.gw.sink.svc.tally", b"\xc1 not msgpack")
        # To the service, as gateway sink, with a service as sender.
        hit = Envelope(id=EnvelopeId("h1"), type="tally.hit", sender=ServiceAddress("x"))
        answer = await nc.request("wsbus.svc.tally.gw.sink", encode_envelope(hit), timeout=10)
        assert answer.data == b"refused"
        # A client of another gateway, claimed by gateway sink.
        other = Envelope(
            id=EnvelopeId("h2"), type="tally.hit", sender=ClientAddress(ConnId("gw2.1"))
        )
        answer = await nc.request("wsbus.svc.tally.gw.sink", encode_envelope(other), timeout=10)
        assert answer.data == b"refused"
        # The real thing still passes.
        await nc.flush()
        await bus.publish(client_message("tally.hit", None))
    finally:
        await nc.close()
    async with asyncio.timeout(10):
        while bus.counters.sender_mismatches < 2:
            await asyncio.sleep(0.01)
    assert sink.delivered == []
    assert tally.seen == ["m1"]
    assert host.counters.sender_mismatches == 2


async def test_an_envelope_over_max_payload_is_refused_too_large(kit: Hosts) -> None:
    await kit.host(Probe())
    sink = await kit.sink()
    bus = sink.bus
    assert isinstance(bus, NatsBus)
    with pytest.raises(BusUnavailable) as refused:
        await bus.publish(client_message("probe.echo", "x" * 2_000_000))
    assert not refused.value.whole_bus and "too_large" in refused.value.reason
    assert bus.counters.too_large == 1
    await bus.publish(client_message("probe.echo", "small"))
    [reply] = await sink.wait_for(lambda d: len(d) >= 1)
    assert reply.content["x"] == "small"


# -- the link breaking -----------------------------------------------------------------------


async def test_a_server_restart_flips_availability_refuses_meanwhile_and_tells_the_gateway(
    kit: Hosts, wsbus_nats_server: NatsServer
) -> None:
    await kit.host(Probe())
    sink = await kit.sink()
    bus = sink.bus
    assert isinstance(bus, NatsBus)
    await bus.publish(client_message("probe.echo", "before", 1))
    await sink.wait_for(lambda d: len(d) >= 1)

    await asyncio.to_thread(wsbus_nats_server.kill)
    async with asyncio.timeout(10):
        while bus.available:
            await asyncio.sleep(0.01)
    with pytest.raises(BusUnavailable) as refused:
        await bus.publish(client_message("probe.echo", "during", 2))
    assert refused.value.whole_bus
    # Down for several backoffs: more attempts than nats-py's first connection allows.
    await asyncio.sleep(1.5)
    await asyncio.to_thread(wsbus_nats_server.restart)

    async with asyncio.timeout(20):
        while not bus.available:
            await asyncio.sleep(0.01)
        while True:
            try:
                await bus.publish(client_message("probe.echo", "after", 3))
                break
            except (BusUnavailable, NoRoute):
                await asyncio.sleep(0.05)  # the service instance reconnects too
    delivered = await sink.wait_for(lambda d: any(e.content["x"] == "after" for e in d))
    assert [e.content["x"] for e in delivered] == ["before", "after"]
    assert "bus_disconnected" in {reason for reason, _ in sink.notices}
    counters = bus.counters
    assert counters.disconnects >= 1 and counters.reconnects >= 1 and counters.refused >= 1


async def test_nothing_is_lost_silently_across_a_server_restart(
    kit: Hosts, wsbus_nats_server: NatsServer
) -> None:
    """Every message is delivered, refused, or covered by a loss notice: never nothing."""
    probe = Probe()
    await kit.host(probe)
    sink = await kit.sink()
    bus = sink.bus
    accepted: list[int] = []
    refused: list[int] = []
    notices_before: dict[int, int] = {}

    async def send() -> None:
        for i in range(600):
            notices_before[i] = len(sink.notices)
            try:
                await bus.publish(client_message("probe.echo", i, i))
            except (BusUnavailable, NoRoute):
                refused.append(i)
                await asyncio.sleep(0.005)
            else:
                accepted.append(i)
            if i % 20 == 0:
                await asyncio.sleep(0)

    sender = asyncio.create_task(send())
    async with asyncio.timeout(20):
        while len(accepted) < 100:
            await asyncio.sleep(0.005)
    await asyncio.to_thread(wsbus_nats_server.kill)
    await asyncio.sleep(0.5)
    await asyncio.to_thread(wsbus_nats_server.restart)
    async with asyncio.timeout(60):
        await sender
    await asyncio.sleep(0.5)  # let the last replies arrive
    replied = {e.content["x"] for e in sink.delivered if e.type == "probe.echo.reply"}
    assert refused, "the restart refused some messages"
    assert len(accepted) + len(refused) == 600
    missing = [i for i in accepted if i not in replied]
    # A reply that never came is covered by a loss notice heard after it was sent.
    assert all(len(sink.notices) > notices_before[i] for i in missing), (missing, sink.notices)


async def test_a_slow_gateway_hears_of_what_nats_dropped(
    kit: Hosts, nats_config: NatsConfig
) -> None:
    await kit.host(Sequencer())
    # A subscription that holds one message unread: a burst overflows it.
    small = msgspec.structs.replace(nats_config, pending_msgs=1)
    sink = await kit.sink(config=small)
    bus = sink.bus
    assert isinstance(bus, NatsBus)
    await bus.publish(client_message("sequence", {"n": 3000}))
    async with asyncio.timeout(20):
        while "slow_consumer" not in {reason for reason, _ in sink.notices}:
            await asyncio.sleep(0.01)
    assert bus.counters.slow_consumers > 0  # NATS messages dropped (each a batch, or one)
    await asyncio.sleep(0.5)  # let the rest arrive (or not): nothing below depends on it
    # What did arrive arrived in order, and not all of it did: the gateway was told.
    contents = [e.content for e in sink.delivered]
    assert contents == sorted(contents) and len(contents) < 3000


# -- aliases ---------------------------------------------------------------------------------


async def test_an_alias_is_unique_across_gateways(kit: Hosts) -> None:
    a = await kit.sink("ga")
    b = await kit.sink("gb")
    bus_a, bus_b = a.bus, b.bus
    assert isinstance(bus_a, NatsBus) and isinstance(bus_b, NatsBus)
    assert await bus_a.claim_alias("sam", ConnId("ga.1"))
    assert await bus_a.claim_alias("sam", ConnId("ga.1"))  # held already: still True
    assert not await bus_b.claim_alias("sam", ConnId("gb.1"))
    assert not await bus_a.claim_alias("sam", ConnId("ga.2"))
    await bus_b.release_alias("sam", ConnId("gb.1"))  # not the holder: nothing happens
    assert not await bus_b.claim_alias("sam", ConnId("gb.1"))
    await bus_a.release_alias("sam", ConnId("ga.1"))
    assert await bus_b.claim_alias("sam", ConnId("gb.1"))
    # Any alias fits the table (it is encoded), and a claim is atomic: of many racing
    # connections on two gateways, exactly one wins.
    results = await asyncio.gather(
        *(
            bus.claim_alias("Zoë ☃ . * >", ConnId(f"{node}.{i}"))
            for i in range(10)
            for bus, node in ((bus_a, "ga"), (bus_b, "gb"))
        )
    )
    assert results.count(True) == 1


async def test_a_dead_gateways_aliases_are_taken_over(kit: Hosts, nats_config: NatsConfig) -> None:
    a = await kit.sink("ga")
    b = await kit.sink("gb")
    assert isinstance(a.bus, NatsBus) and isinstance(b.bus, NatsBus)
    assert await a.bus.claim_alias("ann", ConnId("ga.1"))
    # A clean stop deletes the gateway's entry: its aliases are free at once.
    await a.bus.close()
    async with asyncio.timeout(10):
        while b.bus.directory.gateway_live("ga"):
            await asyncio.sleep(0.01)
    assert await b.bus.claim_alias("ann", ConnId("gb.1"))

    # A gateway that dies without a word: its entry stops being refreshed.
    nc = await _raw(nats_config)
    try:
        js = nc.jetstream()
        gateways = await js.key_value(f"{nats_config.prefix}_gateways")
        aliases = await js.key_value(f"{nats_config.prefix}_aliases")
        await gateways.put("gz", b"1")
        await aliases.put(alias_key("zed"), b"gz.7")
    finally:
        await nc.close()
    async with asyncio.timeout(10):
        while not b.bus.directory.gateway_live("gz"):
            await asyncio.sleep(0.01)
    assert not await b.bus.claim_alias("zed", ConnId("gb.2"))  # gz is live yet
    async with asyncio.timeout(10 * nats_config.heartbeat * 3):
        while not await b.bus.claim_alias("zed", ConnId("gb.2")):
            await asyncio.sleep(nats_config.heartbeat / 2)
    assert await b.bus.directory.alias_holder("zed") == "gb.2"


async def test_claims_refuse_when_nats_is_down(kit: Hosts, wsbus_nats_server: NatsServer) -> None:
    sink = await kit.sink()
    bus = sink.bus
    assert isinstance(bus, NatsBus)
    await asyncio.to_thread(wsbus_nats_server.stop)
    with pytest.raises(BusUnavailable):
        await bus.claim_alias("sam", ConnId("sink.1"))
    with pytest.raises(BusUnavailable):
        await bus.release_alias("sam", ConnId("sink.1"))


async def test_names_that_are_not_subject_tokens_are_refused(nats_config: NatsConfig) -> None:
    bus = NatsBus(nats_config)
    with pytest.raises(ConfigError, match="subject token"):
        await bus.start(RecordingSink(bus, "bad.node"))
    await bus.close()
    with pytest.raises(ConfigError, match="subject token"):
        NatsConfig(prefix="a.b")


async def test_no_server_is_a_clear_bus_unavailable(tmp_path: Any) -> None:
    from wsbus_testing.children import free_port

    config = NatsConfig(servers=(f"nats://127.0.0.1:{free_port()}",), connect_timeout=0.5)
    bus = NatsBus(config)
    with pytest.raises(BusUnavailable, match="no NATS server could be reached"):
        await bus.start(RecordingSink(bus))
    await bus.close()


# -- a cluster -------------------------------------------------------------------------------


async def test_a_gateway_moves_to_another_node_when_its_node_dies(
    wsbus_nats_cluster: NatsCluster,
) -> None:
    """Gateway A on node 1, gateway B on node 2, the service on node 3; node 2 dies."""
    base = NatsConfig(kv_replicas=3, heartbeat=1.0, reconnect_wait=0.05, reconnect_wait_max=0.5)
    urls = wsbus_nats_cluster.urls
    kit = Hosts(base)
    try:
        await kit.host(Probe(), msgspec.structs.replace(base, servers=(urls[2],)))
        a = await kit.sink("ga", msgspec.structs.replace(base, servers=(urls[0],)))
        b = await kit.sink("gb", msgspec.structs.replace(base, servers=(urls[1],)))
        bus_a, bus_b = a.bus, b.bus
        assert isinstance(bus_a, NatsBus) and isinstance(bus_b, NatsBus)
        assert await bus_b.claim_alias("bee", ConnId("gb.1"))
        await bus_b.publish(_from("gb", "probe.echo", "before"))
        await b.wait_for(lambda d: len(d) >= 1)

        await asyncio.to_thread(wsbus_nats_cluster.kill, 1)
        # Gateway A's directory may have followed the buckets through node 2: its watches
        # are made anew, and meanwhile nothing it knows is declared dead. It routes on.
        for i in range(8):
            await bus_a.publish(_from("ga", "probe.echo", i, i))
            await asyncio.sleep(base.heartbeat / 2)
        await a.wait_for(lambda d: len(d) >= 8)
        async with asyncio.timeout(30):
            while True:
                try:
                    await bus_b.publish(_from("gb", "probe.echo", "after", 2))
                    break
                except (BusUnavailable, NoRoute):
                    await asyncio.sleep(0.05)

        def echoes(delivered: list[Envelope]) -> list[Any]:
            # The echoes only: on a busy machine the service's instance may miss heartbeats
            # while node 2 dies, and the gateway then reports what it held (wsbus.failed).
            return [e.content["x"] for e in delivered if e.type == "probe.echo.reply"]

        await b.wait_for(lambda d: "after" in echoes(d))
        assert echoes(b.delivered) == ["before", "after"]
        assert "bus_disconnected" in {reason for reason, _ in b.notices}
        assert bus_b.counters.reconnects >= 1
        # The alias table survived the node (three replicas; reachable again once its
        # stream has a leader). B's claim holds, unless B was cut off long enough for A
        # to take it for dead: then A may take the alias over, and B gives it up (its
        # gateway is told to clear it). Never both.
        async with asyncio.timeout(30):
            while True:
                try:
                    took = await bus_a.claim_alias("bee", ConnId("ga.1"))
                    break
                except BusUnavailable:
                    await asyncio.sleep(0.1)
        holder = await bus_a.directory.alias_holder("bee")
        assert holder == ("ga.1" if took else "gb.1")
        if took:
            await b.wait_for(lambda d: any(e.type == control.ALIAS_CLEAR for e in d), 30)
            [clear] = [e for e in b.delivered if e.type == control.ALIAS_CLEAR]
            assert clear.content == {"conn_id": "gb.1"}
        # A, on a live node all along, heard of no loss.
        assert a.notices == []
    finally:
        await kit.close()


async def test_gateways_on_nats_keep_an_alias_unique(kit: Hosts) -> None:
    await kit.host(Director())
    g1 = await kit.gateway("g1")
    g2 = await kit.gateway("g2")
    a = await kit.client(g1)
    b = await kit.client(g2)
    a.send("director.alias", {"alias": "sam"})
    assert (await _until(a, "director.alias.reply"))["content"] == {"alias": "sam"}
    b.send("director.alias", {"alias": "sam"}, id="b1")
    reply = await _first_of(b, "director.alias.reply", "wsbus.error")
    # Refused (the handler raised alias_taken: service_error), or given another name.
    assert reply["content"] != {"alias": "sam"}, "the second gateway gave sam away again"
    # One message to sam reaches one client.
    b.send("director.send", {"recipients": {"aliases": ["sam"]}, "body": "hi sam"})
    assert (await _until(a, "director.item"))["content"] == "hi sam"
    b.send("director.send", {"recipients": {"conn_ids": [b.conn_id]}, "body": "marker"})
    assert (await _until(b, "director.item"))["content"] == "marker"  # nothing before it
    # When a leaves, sam is free for b.
    a.close()
    async with asyncio.timeout(10):
        while True:
            b.send("director.alias", {"alias": "sam"}, id="b2")
            reply = await _first_of(b, "director.alias.reply", "wsbus.error")
            if reply["content"] == {"alias": "sam"}:
                break
            await asyncio.sleep(0.05)


async def test_a_gateway_back_from_a_cut_gives_up_aliases_taken_meanwhile(
    kit: Hosts, wsbus_nats_server: NatsServer, nats_config: NatsConfig
) -> None:
    a = await kit.sink("ga")
    bus = a.bus
    assert isinstance(bus, NatsBus)
    assert await bus.claim_alias("ann", ConnId("ga.1"))
    assert await bus.claim_alias("bob", ConnId("ga.2"))
    await asyncio.to_thread(wsbus_nats_server.kill)
    await asyncio.to_thread(wsbus_nats_server.restart)
    # Meanwhile (as another gateway that took ga for dead would) ann changes hands.
    nc = await _raw(nats_config)
    try:
        aliases = await nc.jetstream().key_value(f"{nats_config.prefix}_aliases")
        await aliases.put(alias_key("ann"), b"gz.1")
    finally:
        await nc.close()
    await a.wait_for(lambda d: any(e.type == control.ALIAS_CLEAR for e in d), 30)
    [clear] = [e for e in a.delivered if e.type == control.ALIAS_CLEAR]
    assert clear.content == {"conn_id": "ga.1"} and clear.to == clear.sender
    # What it still holds stays its own.
    assert await bus.directory.alias_holder("bob") == "ga.2"


async def test_clients_of_a_gateway_whose_link_broke_are_sent_a_gap(
    kit: Hosts, wsbus_nats_server: NatsServer
) -> None:
    await kit.host(Director())
    gateway = await kit.gateway("g1")
    client = await kit.client(gateway)
    client.send("director.join", {"group": "g"})
    await _until(client, "director.join.reply")
    await asyncio.to_thread(wsbus_nats_server.kill)
    await asyncio.to_thread(wsbus_nats_server.restart)
    gap = await client.receive_until("wsbus.gap", timeout=30)
    assert gap["content"]["reason"] == "bus_disconnected"
    assert gateway.stats().gaps_heard >= 1
    # And the traffic resumes (the service instance is back too).
    async with asyncio.timeout(30):
        while True:
            client.send("director.send", {"recipients": {"groups": ["g"]}, "body": "back"})
            frame = await _first_of(client, "director.item", "wsbus.error")
            if frame["type"] == "director.item":
                assert frame["content"] == "back"
                break
            await asyncio.sleep(0.1)


async def test_a_service_that_moves_to_another_node_tells_the_gateways(
    wsbus_nats_cluster: NatsCluster,
) -> None:
    """The gateway's own link never broke; what the service sent as its link broke may be
    lost all the same: the gateway is told (and tells its clients)."""
    base = NatsConfig(kv_replicas=3, heartbeat=1.0, reconnect_wait=0.05, reconnect_wait_max=0.5)
    urls = wsbus_nats_cluster.urls
    kit = Hosts(base)
    try:
        await kit.host(Probe(), msgspec.structs.replace(base, servers=(urls[2],)))
        sink = await kit.sink("ga", msgspec.structs.replace(base, servers=(urls[0],)))
        bus = sink.bus
        assert isinstance(bus, NatsBus)
        # The service sends the gateway something first: a gateway believes a service's
        # lost notice only when it sent there since its last (nothing else could be lost).
        async with asyncio.timeout(30):
            while True:
                try:
                    await bus.publish(_from("ga", "probe.echo", "first"))
                    break
                except (BusUnavailable, NoRoute):
                    await asyncio.sleep(0.05)
        await sink.wait_for(lambda d: any(e.content["x"] == "first" for e in d), 30)
        await asyncio.to_thread(wsbus_nats_cluster.kill, 2)
        async with asyncio.timeout(30):
            while not sink.notices:
                await asyncio.sleep(0.01)
        [(reason, detail)] = sink.notices
        assert reason == "bus_disconnected" and "probe" in detail
        assert bus.counters.disconnects == 0
        async with asyncio.timeout(30):
            while True:
                try:
                    await bus.publish(_from("ga", "probe.echo", "again"))
                    break
                except (BusUnavailable, NoRoute):
                    await asyncio.sleep(0.05)
        await sink.wait_for(lambda d: any(e.content["x"] == "again" for e in d), 30)
    finally:
        await kit.close()


# -- one node id, one gateway ---------------------------------------------------------------


async def test_a_second_gateway_with_a_node_id_in_use_is_refused(kit: Hosts) -> None:
    observer = await kit.host(Tally())
    first = await kit.sink("g1")
    second = NatsBus(kit.config)
    with pytest.raises(ConfigError, match="'g1'") as refused:
        await second.start(LossSink(second, "g1"))
    await second.close()
    assert "--node" in str(refused.value)
    # The refused one took nothing from the live one: still listed and routed to.
    await asyncio.sleep(kit.config.heartbeat * 4)
    assert observer.directory is not None and observer.directory.gateway_live("g1")
    await first.bus.publish(_from("g1", "tally.hit", None))
    # Once the first stopped cleanly, the node id is free at once.
    first_bus = kit.buses[0]
    await first_bus.close()
    kit.buses.remove(first_bus)
    await kit.sink("g1")


@pytest.fixture
def gateway_process(nats_config: NatsConfig) -> Iterator[subprocess.Popen[str]]:
    """A gateway (a NatsBus with a recording sink) with node id g1 in its own process."""
    code = (
        "import asyncio; from wsbus_nats import NatsBus, NatsConfig; "
        "from wsbus_testing.conformance import RecordingSink\n"
        "async def main():\n"
        f"    bus = NatsBus(NatsConfig(servers=({nats_config.servers[0]!r},), heartbeat=0.5))\n"
        "    await bus.start(RecordingSink(bus, 'g1'))\n"
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


async def test_a_gateway_restarted_after_a_crash_takes_its_node_id_back(
    kit: Hosts, gateway_process: subprocess.Popen[str]
) -> None:
    assert gateway_process.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(gateway_process.stdout.readline), 30)
    assert "ready" in line, line
    # While the other process lives, its node id is refused here.
    refused = NatsBus(kit.config)
    with pytest.raises(ConfigError, match="'g1'"):
        await refused.start(LossSink(refused, "g1"))
    await refused.close()
    # Killed (no clean stop: its entry stays), a gateway with its node id starts once the
    # entry has aged out, and gets the traffic for g1.
    gateway_process.kill()
    await asyncio.to_thread(gateway_process.wait, 10)
    observer = await kit.host(Tally())
    sink = await kit.sink("g1")
    assert observer.directory is not None
    async with asyncio.timeout(30):
        while not observer.directory.gateway_live("g1"):
            await asyncio.sleep(0.05)
    await sink.bus.publish(_from("g1", "tally.hit", None))


async def test_readiness_follows_the_nats_server_killed_and_started_again(
    kit: Hosts, wsbus_nats_server: NatsServer
) -> None:
    await kit.host(Probe())
    gateway = await kit.gateway("ready1")
    readiness = Readiness(gateway, timeout=2.0, reuse=0.0, services=("probe",))
    try:
        report = await readiness.check()
        assert report.ready, report
        assert report.services is not None and report.services.get("probe", 0) >= 1
        assert gateway.bus_reconnects == 0
        await asyncio.to_thread(wsbus_nats_server.kill)
        report = await readiness.check()
        assert not report.ready and report.bus.status in ("unavailable", "timeout"), report
        await asyncio.to_thread(wsbus_nats_server.restart)
        async with asyncio.timeout(60):
            while not (report := await readiness.check()).ready:
                await asyncio.sleep(0.1)
        assert gateway.bus_reconnects is not None and gateway.bus_reconnects >= 1
    finally:
        await readiness.close()


async def test_a_probe_answered_late_leaves_the_gateway_hearing_its_bus(
    wsbus_nats_server: NatsServer,
) -> None:
    # Review 17's F1: the probe once was nats-py's flush(); cancelled by the probe's
    # deadline, the late PONG stopped nats-py's reader for good: the gateway went deaf
    # and /readyz said ready. A relay holds the server's bytes for longer than the deadline.
    hold = asyncio.Event()
    hold.set()
    tasks: set[asyncio.Task[None]] = set()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, gated: bool) -> None:
        try:
            while data := await reader.read(65536):
                if gated:
                    await hold.wait()
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(
            "127.0.0.1", wsbus_nats_server.client_port
        )
        for coro in (pipe(client_r, server_w, False), pipe(server_r, client_w, True)):
            task = asyncio.create_task(coro)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    relay = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = relay.sockets[0].getsockname()[1]
    config = NatsConfig(servers=(wsbus_nats_server.url,), heartbeat=0.5)
    host = ServiceHost(Probe(), config)
    await host.start()
    gateway = Gateway(
        NatsBus(msgspec.structs.replace(config, servers=(f"nats://127.0.0.1:{port}",))),
        config=GatewayConfig(node="late1"),
        entry_points=False,
    )
    await gateway.start()
    readiness = Readiness(gateway, timeout=0.5, reuse=0.0)
    conn, client = memory_pair(Codec.JSON)
    serving = asyncio.create_task(gateway.serve(conn))
    try:
        await client.receive_until("wsbus.welcome")
        assert (await readiness.check()).ready
        hold.clear()  # the server's answers are late: past the probe's deadline
        report = await readiness.check()
        assert not report.ready and report.bus.status in ("timeout", "unavailable"), report
        await asyncio.sleep(0.3)
        hold.set()
        async with asyncio.timeout(30):
            while not (await readiness.check()).ready:
                await asyncio.sleep(0.05)
        # Ready, and it is true: a client's message still goes round.
        client.send("probe.echo", "after", id="after")
        reply = await client.receive_until("probe.echo.reply", timeout=10)
        assert reply["content"]["x"] == "after"
    finally:
        await readiness.close()
        await conn.close(1000)
        await asyncio.wait_for(serving, 10)
        await gateway.close()
        await host.close()
        relay.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
