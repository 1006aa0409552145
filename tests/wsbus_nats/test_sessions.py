"""Closed sessions in the bucket P_sessions (wsbus_nats.sessions), on a real nats-server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import pytest
import pytest_asyncio

from wsbus.envelope import ConnId, Envelope, EnvelopeId, NodeId, ServiceAddress
from wsbus.errors import BusUnavailable
from wsbus.resume import SessionRecord
from wsbus_nats import NatsBus, NatsConfig
from wsbus_nats.buckets import SESSIONS_MAX_AGE, sessions_spec
from wsbus_nats.servers import NatsServer
from wsbus_nats.subjects import Subjects

WAIT = 20.0
"""Seconds any one step may take on a busy two-core machine before the test fails."""


class Sink:
    """A stand-in gateway that takes nothing."""

    def __init__(self, node: str) -> None:
        self._node = NodeId(node)

    @property
    def node(self) -> NodeId:
        """The stand-in's node id."""
        return self._node

    def deliver(self, envelope: Envelope) -> None:
        """Ignore it."""


def _record(sid: str = "s" * 22, **changes: object) -> SessionRecord:
    fields: dict[str, object] = {
        "sid": sid,
        "user": "ann",
        "alias": "annie",
        "groups": ("room.1", "room.2"),
        "conn_ids": (ConnId("ga.1"), ConnId("gb.7")),
        "closed": 1_700_000_000.0,
        "code": 1006,
        "unacked": (Envelope(id=EnvelopeId("m1"), type="chat.say", sender=ServiceAddress("chat")),),
    }
    fields.update(changes)
    return SessionRecord(**fields)  # type: ignore[arg-type]


@pytest_asyncio.fixture
async def buses(nats_config: NatsConfig) -> AsyncIterator[tuple[NatsBus, NatsBus]]:
    a, b = NatsBus(nats_config), NatsBus(nats_config)
    try:
        await a.start(Sink("ga"))
        await b.start(Sink("gb"))
        yield a, b
    finally:
        await a.close()
        await b.close()


async def test_a_saved_session_is_taken_once_on_any_gateway(
    buses: tuple[NatsBus, NatsBus],
) -> None:
    a, b = buses
    record = _record()
    await a.save_session(record, 60)
    assert await b.take_session(record.sid) == record  # on another gateway
    assert await a.take_session(record.sid) is None
    assert await b.take_session(record.sid) is None
    # Saved again (a resumed session closing again), taken again.
    await b.save_session(record, 60)
    assert await a.take_session(record.sid) == record


async def test_two_gateways_taking_one_session_at_once_one_gets_it(
    buses: tuple[NatsBus, NatsBus],
) -> None:
    a, b = buses
    for n in range(20):
        record = _record(f"race-{n:02d}-" + "x" * 16)
        await a.save_session(record, 60)
        taken = await asyncio.gather(a.take_session(record.sid), b.take_session(record.sid))
        assert sorted(t is None for t in taken) == [False, True], (n, taken)


async def test_a_session_expires_after_its_ttl(buses: tuple[NatsBus, NatsBus]) -> None:
    a, b = buses
    await a.save_session(_record("short-" + "y" * 16), 1)
    await a.save_session(_record("long-" + "z" * 16), 600)
    async with asyncio.timeout(WAIT):
        # Looked at without taking it: the server drops it after about a second.
        while True:
            kv = await _bucket(a)
            try:
                await kv.get("short-" + "y" * 16)
            except nats.js.errors.NotFoundError:
                break
            await asyncio.sleep(0.2)
    assert await b.take_session("short-" + "y" * 16) is None
    assert await b.take_session("long-" + "z" * 16) is not None


async def test_session_ids_that_cannot_be_keys_are_refused(
    buses: tuple[NatsBus, NatsBus],
) -> None:
    a, _ = buses
    for sid in ("", "short", "a.b.c.d.e.f.g.h.i.j", "x" * 200, "with space and more"):
        assert await a.take_session(sid) is None
    with pytest.raises(ValueError, match="session id"):
        await a.save_session(_record("bad.id" * 4), 60)


async def test_the_bucket_is_as_wsbus_makes_it(buses: tuple[NatsBus, NatsBus]) -> None:
    a, _ = buses
    spec = sessions_spec(Subjects("wsbus"))
    nc = await nats.connect(list(a.config.servers))
    try:
        info = await nc.jetstream().stream_info(spec.stream)
    finally:
        await nc.close()
    assert info.config.allow_msg_ttl and info.config.max_age == SESSIONS_MAX_AGE
    assert info.config.max_msgs_per_subject == 1 and not info.config.allow_rollup_hdrs


async def test_sessions_refuse_when_nats_is_down(
    buses: tuple[NatsBus, NatsBus], wsbus_nats_server: NatsServer
) -> None:
    a, _ = buses
    await asyncio.to_thread(wsbus_nats_server.stop)
    with pytest.raises(BusUnavailable):
        await a.save_session(_record(), 60)
    with pytest.raises(BusUnavailable):
        await a.take_session("s" * 22)


async def _bucket(bus: NatsBus) -> nats.js.kv.KeyValue:
    assert bus._link is not None
    return await bus._link.nc.jetstream().key_value("wsbus_sessions")


async def test_a_record_larger_than_an_entry_may_be_is_refused(
    buses: tuple[NatsBus, NatsBus],
) -> None:
    a, _ = buses
    big = Envelope(
        id=EnvelopeId("m1"), type="chat.say", sender=ServiceAddress("chat"), content="x" * 600_000
    )
    record = _record("big-" + "w" * 16, unacked=(big, big))
    with pytest.raises(BusUnavailable, match="bytes") as refused:
        await a.save_session(record, 60)
    assert not refused.value.whole_bus
    assert await a.take_session(record.sid) is None
    await a.save_session(_record("small-" + "w" * 16), 60)  # the bucket still takes others
