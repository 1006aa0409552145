"""Group history in JetStream (wsbus_nats.history), on a real nats-server.

Service instances (real ServiceHosts) append what they send to a group keeping history;
stand-in gateways (real NatsBuses with a recording sink) receive it stamped and read it back.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import nats
import pytest
import pytest_asyncio

import wsbus_nats.history
from wsbus import Context, Service, handles
from wsbus.bus import KeepsHistory, KeepsSessions
from wsbus.envelope import (
    ClientAddress,
    ConnId,
    Envelope,
    EnvelopeId,
    NodeId,
    Recipients,
    ServiceAddress,
    encode_envelope,
)
from wsbus.errors import ConfigError
from wsbus.history import HistoryConfig, Position, position_of
from wsbus_nats import NatsBus, NatsConfig, ServiceHost
from wsbus_nats.history import HISTORY_KEEP, HistoryCounters, HistoryWriter, check_stream
from wsbus_nats.link import Link
from wsbus_nats.subjects import Subjects, group_token
from wsbus_testing.conformance import client_message

WAIT = 20.0
"""Seconds any one step may take on a busy two-core machine before the test fails."""
ROOMS = HistoryConfig(groups=("room.*",), size=50, age=60.0)
SUBJECTS = Subjects("wsbus")


class Sink:
    """A stand-in gateway: records what the bus delivers and the gateways it finds dead."""

    def __init__(self, node: str) -> None:
        self._node = NodeId(node)
        self.delivered: list[Envelope] = []
        self.gone: list[tuple[NodeId, bool]] = []
        self._changed = asyncio.Event()

    @property
    def node(self) -> NodeId:
        """The stand-in's node id."""
        return self._node

    def deliver(self, envelope: Envelope) -> None:
        """Record an envelope."""
        self.delivered.append(envelope)
        self._changed.set()

    def gateway_lost(self, node: NodeId, report: bool) -> None:
        """Record a dead gateway."""
        self.gone.append((node, report))
        self._changed.set()

    def of(self, type: str) -> list[Envelope]:
        """What was delivered of ``type``, in order."""
        return [e for e in self.delivered if e.type == type]

    async def until(self, done: Callable[[], bool]) -> None:
        """Wait (bounded) until ``done()``."""
        async with asyncio.timeout(WAIT):
            while not done():
                self._changed.clear()
                await self._changed.wait()


class Caster(Service):
    """``cast.burst`` ``{"group", "n"}``: sends the group ``cast.item`` ``{"i", "by"}`` n times."""

    name = "caster"

    def __init__(self) -> None:
        self.missed: list[dict[str, Any]] = []

    @handles("cast.burst")
    async def burst(self, message: Envelope, ctx: Context) -> None:
        """Send n items to the group, in order."""
        content = message.content
        for i in range(content["n"]):
            ctx.send(Recipients(groups=(content["group"],)), "cast.item", {"i": i, "by": self.name})

    @handles("wsbus.undeliverable")
    async def undeliverable(self, message: Envelope, ctx: Context) -> None:
        """Keep an undeliverable report."""
        self.missed.append(message.content)


class OtherCaster(Caster):
    """The same, as another service."""

    name = "othercaster"


class Deployment:
    """Stand-in gateways and service instances on one server, closed at the end."""

    def __init__(self, config: NatsConfig) -> None:
        self.config = config
        self.buses: list[NatsBus] = []
        self.hosts: list[ServiceHost] = []

    async def gateway(self, node: str, history: HistoryConfig = ROOMS) -> tuple[NatsBus, Sink]:
        bus = NatsBus(self.config)
        bus.keep_history(history)
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


async def _listed(bus: NatsBus, *services: str) -> None:
    async with asyncio.timeout(WAIT):
        while any(not bus.directory.service_live(s) for s in services):
            await asyncio.sleep(0.02)


async def _burst(bus: NatsBus, group: str, n: int, k: int = 1) -> None:
    message = client_message("cast.burst", {"group": group, "n": n}, k)
    sender = ClientAddress(ConnId(f"{bus.directory.node}.1"))
    await bus.publish(msgspec.structs.replace(message, sender=sender))


def _positions(envelopes: list[Envelope]) -> list[Position]:
    found = [position_of(e) for e in envelopes]
    assert all(f is not None for f in found)
    return [f[1] for f in found if f is not None]


# -- the stream ------------------------------------------------------------------------------


async def test_a_gateway_makes_the_stream_and_one_with_other_settings_is_refused(
    deployment: Deployment, nats_config: NatsConfig
) -> None:
    bus, _ = await deployment.gateway("ga")
    assert isinstance(bus, KeepsHistory) and isinstance(bus, KeepsSessions)
    nc = await nats.connect(list(nats_config.servers))
    try:
        info = await nc.jetstream().stream_info(SUBJECTS.history_stream)
    finally:
        await nc.close()
    assert info.config.subjects == ["wsbus.hist.*.*"]
    assert info.config.max_msgs_per_subject == 50 and info.config.max_age == HISTORY_KEEP
    settings, epoch = check_stream(SUBJECTS, info.config)
    assert settings == ROOMS and epoch
    assert json.loads((info.config.metadata or {})["wsbus.history.groups"]) == ["room.*"]

    # The same settings: fine. Others: refused, naming both.
    await deployment.gateway("gb")
    other = HistoryConfig(groups=("room.*", "chat.*"), size=50, age=60.0)
    with pytest.raises(ConfigError) as refused:
        await deployment.gateway("gc", other)
    text = str(refused.value)
    assert "['room.*', 'chat.*']" in text and "['room.*']" in text and "nats stream rm" in text
    with pytest.raises(ConfigError, match="size 10"):
        await deployment.gateway("gd", HistoryConfig(groups=("room.*",), size=10, age=60.0))


async def test_keep_history_after_start_is_refused(deployment: Deployment) -> None:
    bus, _ = await deployment.gateway("ga")
    with pytest.raises(ConfigError):
        bus.keep_history(ROOMS)


# -- appending and reading ---------------------------------------------------------------------


async def test_a_groups_messages_are_stamped_densely_in_order_and_read_back(
    deployment: Deployment,
) -> None:
    bus, sink = await deployment.gateway("ga")
    await deployment.host(Caster())
    await _listed(bus, "caster")
    await _burst(bus, "room.1", 40)
    await _burst(bus, "lobby", 3, k=2)  # keeps no history
    await sink.until(lambda: len(sink.of("cast.item")) == 43)

    room = [e for e in sink.of("cast.item") if e.recipients == Recipients(groups=("room.1",))]
    lobby = [e for e in sink.of("cast.item") if e.recipients == Recipients(groups=("lobby",))]
    assert [e.content["i"] for e in room] == list(range(40))
    positions = _positions(room)
    epoch = positions[0].epoch
    assert positions == [Position(epoch, n) for n in range(1, 41)]
    assert all(position_of(e) is None for e in lobby)

    # Few missed: walked back from the last entry; many: read from the first. Alike.
    for after in (0, 5, 7, 8, 10, 20, 38, 39):
        for limit in (1, 3, 100):
            replay = await bus.history("room.1", Position(epoch, after), limit)
            assert replay is not None
            assert [e.id for e in replay] == [e.id for e in room[after : after + limit]]
            assert _positions(replay) == positions[after : after + limit]
    assert await bus.history("room.1", Position(epoch, 40), 100) == []
    assert await bus.history("room.1", Position(epoch, 41), 100) is None  # beyond the last
    assert await bus.history("room.1", Position("other", 3), 100) is None  # another epoch
    assert await bus.history("room.2", Position(epoch, 1), 100) is None  # nothing kept
    assert bus.history_counters.mismatches == 0


async def test_a_trimmed_history_cannot_be_recovered(deployment: Deployment) -> None:
    bus, sink = await deployment.gateway("ga", HistoryConfig(groups=("room.*",), size=5))
    await deployment.host(Caster())
    await _listed(bus, "caster")
    await _burst(bus, "room.1", 12)
    await sink.until(lambda: len(sink.of("cast.item")) == 12)
    epoch = _positions(sink.of("cast.item"))[0].epoch
    assert await bus.history("room.1", Position(epoch, 3), 100) is None  # 4..7 are gone
    tail = await bus.history("room.1", Position(epoch, 8), 100)
    assert tail is not None and [p.offset for p in _positions(tail)] == [9, 10, 11, 12]


async def test_two_services_appending_at_once_keep_offsets_dense_and_their_own_order(
    deployment: Deployment,
) -> None:
    bus, sink = await deployment.gateway("ga")
    caster = await deployment.host(Caster())
    other = await deployment.host(OtherCaster())
    await _listed(bus, "caster", "othercaster")
    await _burst(bus, "room.1", 40)  # both services declared cast.burst: both send 40
    await sink.until(lambda: len(sink.of("cast.item")) == 80)

    items = sink.of("cast.item")
    offsets = sorted(p.offset for p in _positions(items))
    assert offsets == list(range(1, 81))  # dense, each once
    assert len({p.epoch for p in _positions(items)}) == 1
    for name in ("caster", "othercaster"):
        own = [e for e in items if e.content["by"] == name]
        assert [e.content["i"] for e in own] == list(range(40))  # per-sender order
        assert [p.offset for p in _positions(own)] == sorted(p.offset for p in _positions(own))
    conflicts = caster.history_counters.conflicts + other.history_counters.conflicts
    appends = caster.history_counters.appends + other.history_counters.appends
    assert appends == 80
    # The whole group reads back in offset order, whoever appended.
    epoch = _positions(items)[0].epoch
    everything = await bus.history("room.1", Position(epoch, 0), 1000)
    assert everything is not None and [p.offset for p in _positions(everything)] == offsets
    assert conflicts >= 0  # counted, however the two interleaved


async def test_an_append_that_fails_fails_the_send(
    deployment: Deployment, nats_config: NatsConfig
) -> None:
    bus, sink = await deployment.gateway("ga")
    caster = Caster()
    host = await deployment.host(caster)
    await _listed(bus, "caster")
    await _burst(bus, "room.1", 2)
    await sink.until(lambda: len(sink.of("cast.item")) == 2)

    nc = await nats.connect(list(nats_config.servers))
    try:
        await nc.jetstream().delete_stream(SUBJECTS.history_stream)
    finally:
        await nc.close()
    await _burst(bus, "room.1", 3, k=2)
    await _burst(bus, "lobby", 1, k=3)  # keeps no history: still goes
    async with asyncio.timeout(WAIT):
        while len(caster.missed) < 3:
            await asyncio.sleep(0.02)
    lobby = Recipients(groups=("lobby",))
    await sink.until(lambda: any(e.recipients == lobby for e in sink.delivered))
    # Never sent without its position: the three failed sends reached no gateway.
    assert len(sink.of("cast.item")) == 3
    assert {m["reason"] for m in caster.missed} == {"unavailable"}
    assert host.history_counters.append_failures == 3


async def test_appending_one_envelope_twice_stores_it_once(nats_config: NatsConfig) -> None:
    deployment = Deployment(nats_config)
    try:
        await deployment.gateway("ga")
        link = Link(nats_config, "test writer")
        await link.connect()
        try:
            counters = HistoryCounters()
            writer = HistoryWriter(link, SUBJECTS, "caster", counters)
            assert await writer.refresh() == ROOMS
            envelope = _service_envelope("e1")
            first = await writer.append("room.1", envelope)
            again = await writer.append("room.1", envelope)  # a retry, the tail known
            writer._tails.clear()  # a retry after the tail was forgotten
            third = await writer.append("room.1", envelope)
            assert position_of(first) == position_of(again) == position_of(third)
            assert counters.appends == 1 and counters.duplicates == 2
            nxt = await writer.append("room.1", _service_envelope("e2"))
            found = position_of(nxt)
            assert found is not None and found[1].offset == 2
        finally:
            await link.close()
    finally:
        await deployment.close()


async def test_an_entry_wsbus_did_not_make_is_not_replayed(
    deployment: Deployment, nats_config: NatsConfig
) -> None:
    bus, sink = await deployment.gateway("ga")
    await deployment.host(Caster())
    await _listed(bus, "caster")
    await _burst(bus, "room.1", 3)
    await sink.until(lambda: len(sink.of("cast.item")) == 3)
    epoch = _positions(sink.of("cast.item"))[0].epoch

    # Entry 4, appended on caster's subject but naming another service as its sender.
    forged = msgspec.structs.replace(
        _service_envelope("forged", "impostor"),
        headers={"wsbus-group": "room.1", "wsbus-pos": f"{epoch}:4"},
    )
    nc = await nats.connect(list(nats_config.servers))
    try:
        subject = f"wsbus.hist.{group_token('room.1')}.caster"
        await nc.jetstream().publish(subject, encode_envelope(forged))
    finally:
        await nc.close()
    assert await bus.history("room.1", Position(epoch, 1), 100) is None
    assert bus.history_counters.mismatches >= 1


async def test_entries_past_their_age_are_not_replayed_and_offsets_go_on(
    deployment: Deployment,
) -> None:
    bus, sink = await deployment.gateway("ga", HistoryConfig(groups=("room.*",), age=0.5))
    await deployment.host(Caster())
    await _listed(bus, "caster")
    await _burst(bus, "room.1", 2)
    await sink.until(lambda: len(sink.of("cast.item")) == 2)
    first, last = _positions(sink.of("cast.item"))
    async with asyncio.timeout(WAIT):
        while await bus.history("room.1", first, 10) is not None:
            await asyncio.sleep(0.1)  # entry 2 passes its age after half a second
    assert await bus.history("room.1", last, 10) == []  # nothing missed after the last
    await _burst(bus, "room.1", 1, k=2)
    await sink.until(lambda: len(sink.of("cast.item")) == 3)
    assert _positions(sink.of("cast.item"))[-1] == Position(last.epoch, last.offset + 1)


async def test_a_group_with_no_entry_left_starts_a_new_run(
    deployment: Deployment, nats_config: NatsConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As after a day with nothing sent to the group, in a second: its entries are gone.
    monkeypatch.setattr(wsbus_nats.history, "HISTORY_KEEP", 1.0)
    bus, sink = await deployment.gateway("ga", HistoryConfig(groups=("room.*",), age=0.5))
    await deployment.host(Caster())
    await _listed(bus, "caster")
    await _burst(bus, "room.1", 2)
    await sink.until(lambda: len(sink.of("cast.item")) == 2)
    old = _positions(sink.of("cast.item"))[-1]
    nc = await nats.connect(list(nats_config.servers))
    try:
        js = nc.jetstream()
        async with asyncio.timeout(WAIT):
            while (await js.stream_info(SUBJECTS.history_stream)).state.messages:
                await asyncio.sleep(0.1)
    finally:
        await nc.close()
    await _burst(bus, "room.1", 1, k=2)
    await sink.until(lambda: len(sink.of("cast.item")) == 3)
    new = _positions(sink.of("cast.item"))[-1]
    # Offsets cannot go on (the last is gone): a new run, which a client must resync.
    assert new.offset == 1 and new.epoch != old.epoch
    assert new.epoch.split("-")[0] == old.epoch.split("-")[0]  # one stream
    assert await bus.history("room.1", old, 10) is None


def _service_envelope(id: str, service: str = "caster") -> Envelope:
    return Envelope(
        id=EnvelopeId(id),
        type="cast.item",
        sender=ServiceAddress(service),
        content={"i": 0},
        recipients=Recipients(groups=("room.1",)),
    )


async def test_a_service_started_before_any_gateway_stamps_once_one_keeps_history(
    deployment: Deployment,
) -> None:
    host = await deployment.host(Caster())  # no gateway, no history stream yet
    assert host.history_counters.appends == 0
    bus, sink = await deployment.gateway("ga")
    await _listed(bus, "caster")
    await _burst(bus, "room.1", 3)
    await sink.until(lambda: len(sink.of("cast.item")) == 3)
    assert [p.offset for p in _positions(sink.of("cast.item"))] == [1, 2, 3]


async def test_two_instances_of_one_service_appending_at_once_keep_offsets_dense(
    deployment: Deployment,
) -> None:
    bus, sink = await deployment.gateway("ga")
    hosts = [await deployment.host(Caster()), await deployment.host(Caster())]
    async with asyncio.timeout(WAIT):
        while bus.directory.services().get("caster", 0) < 2:
            await asyncio.sleep(0.02)
    # Sixteen bursts, shared out by the queue group: both instances append under one
    # subject (wsbus.hist.<room.1>.caster) at once.
    for k in range(1, 17):
        await _burst(bus, "room.1", 20, k=k)
    await sink.until(lambda: len(sink.of("cast.item")) == 320)
    offsets = sorted(p.offset for p in _positions(sink.of("cast.item")))
    assert offsets == list(range(1, 321))
    assert sum(host.history_counters.appends for host in hosts) == 320


# -- reads keep trying while a leader is elected ----------------------------------------------


class _Electing:
    """A stand-in request that goes unanswered (times out) ``silent`` times, then answers."""

    def __init__(self, silent: int) -> None:
        self.silent = silent
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.silent:
            raise nats.errors.TimeoutError  # sent to a leader that is gone
        return "answer"


class _Streams:
    """A stand-in JetStream context: the stream exists (answers stream_info)."""

    async def stream_info(self, name: str) -> object:
        return object()


async def test_a_read_that_times_out_is_tried_again_and_a_write_is_not() -> None:
    js: Any = _Streams()
    read = _Electing(silent=2)
    # A read: a request to a leader that is gone times out; it is tried again (within the
    # budget, generous here: only its being tried again is checked).
    got = await wsbus_nats.history.answered(read, js, "wsbus_history", WAIT, read=True)
    assert (got, read.calls) == ("answer", 3)
    # A write that timed out may have been done: never tried again by answered().
    write = _Electing(silent=1)
    with pytest.raises(TimeoutError):
        await wsbus_nats.history.answered(write, js, "wsbus_history", WAIT)
    assert write.calls == 1
    # A read whose budget is spent gives up with the last error.
    spent = _Electing(silent=10**6)
    with pytest.raises(TimeoutError):
        await wsbus_nats.history.answered(spent, js, "wsbus_history", 0.0, read=True)
    assert spent.calls == 1
