"""Presence (wsbus/presence.py and its wiring in the gateway): events to services that
declare ``wsbus.presence``, frames to members of ``presence_frames`` groups, other
gateways' events, a dead gateway's leave frames, and the presence counters."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import pytest

from tests.conftest import Control, assert_balanced
from wsbus import (
    ClientAddress,
    ConnId,
    Context,
    Envelope,
    Gateway,
    GatewayConfig,
    MemoryBus,
    Service,
    handles,
)
from wsbus.control import PRESENCE, PresenceEvent
from wsbus.edge import MemoryClient, memory_pair
from wsbus.envelope import EnvelopeId, GatewayAddress, NodeId
from wsbus.presence import Presence

Connect = Callable[..., Awaitable[MemoryClient]]


class Room(Service):
    """Joins and removes its senders; records every presence event it hears."""

    name = "room"

    def __init__(self) -> None:
        self.events: list[PresenceEvent] = []
        self.heard = asyncio.Event()

    @handles("room.join")
    async def join(self, message: Envelope, ctx: Context) -> None:
        assert isinstance(message.sender, ClientAddress)
        await ctx.join(message.sender.conn_id, message.content)
        ctx.reply(None)

    @handles("room.leave")
    async def leave(self, message: Envelope, ctx: Context) -> None:
        assert isinstance(message.sender, ClientAddress)
        await ctx.leave(message.sender.conn_id, message.content)
        ctx.reply(None)

    @handles("room.who")
    async def who(self, message: Envelope, ctx: Context) -> None:
        members = await ctx.presence(message.content)
        ctx.reply([m.conn_id for m in members])

    @handles(PRESENCE)
    async def presence(self, message: Envelope, ctx: Context) -> None:
        self.events.append(msgspec.convert(message.content, PresenceEvent))
        self.heard.set()

    async def wait(self, count: int) -> list[PresenceEvent]:
        async with asyncio.timeout(5):
            while len(self.events) < count:
                self.heard.clear()
                await self.heard.wait()
        return self.events


@pytest.fixture
def room() -> Room:
    return Room()


@pytest.fixture
def wsbus_services(room: Room) -> list[Service]:
    return [room]


@pytest.fixture
def wsbus_config() -> GatewayConfig:
    return GatewayConfig(node="test", presence_frames=("room.*",))


async def _call(client: MemoryClient, type: str, content: Any) -> dict[str, Any]:
    client.send(type, content, id=f"{type}-{content}")
    return await client.receive_until(f"{type}.reply")


async def _frames_until_reply(client: MemoryClient, type: str, content: Any) -> list[str]:
    """Send a request; return the types of the frames that came before its reply."""
    client.send(type, content, id=f"{type}-{content}")
    seen = []
    while (frame := await client.receive())["type"] != f"{type}.reply":
        seen.append(frame["type"])
    return seen


async def _settled(gateway: Gateway) -> None:
    """Wait until the report queue has sent every presence event."""
    async with asyncio.timeout(5):
        while gateway.stats().presence_events_queued:
            await asyncio.sleep(0.005)


def test_only_wsbus_presence_is_routed_by_type() -> None:
    class Listener(Service):
        @handles(PRESENCE, "wsbus.processed", "wsbus.receipt", "chat.say")
        async def any(self, message: Envelope, ctx: Context) -> None: ...

    assert Listener.handled_types() == {PRESENCE, "chat.say"}


async def test_services_hear_joins_leaves_and_disconnects(
    wsbus_connect: Connect, wsbus_gateway: Gateway, room: Room
) -> None:
    ann = await wsbus_connect()
    bob = await wsbus_connect()
    await _call(ann, "room.join", "lobby")
    await _call(bob, "room.join", "lobby")
    await _call(ann, "room.join", "lobby")  # in it already: no event
    who = await _call(ann, "room.who", "lobby")
    assert who["content"] == [ann.conn_id, bob.conn_id]
    await _call(ann, "room.leave", "lobby")
    bob.close()
    events = await room.wait(4)
    assert [(e.event, e.conn_id, e.reason) for e in events] == [
        ("join", ann.conn_id, None),
        ("join", bob.conn_id, None),
        ("leave", ann.conn_id, "left"),
        ("leave", bob.conn_id, "disconnected"),
    ]
    assert {(e.node, e.group) for e in events} == {("test", "lobby")}
    await _settled(wsbus_gateway)
    stats = wsbus_gateway.stats()
    assert stats.presence_events == stats.presence_events_sent == 4
    assert_balanced(stats)


async def test_members_of_a_presence_group_get_frames(
    wsbus_connect: Connect, wsbus_gateway: Gateway
) -> None:
    ann = await wsbus_connect()
    bob = await wsbus_connect()
    await _call(ann, "room.join", "room.1")
    # A member is not told of its own join.
    assert PRESENCE not in await _frames_until_reply(bob, "room.join", "room.1")
    joined = await ann.receive_until(PRESENCE)
    assert joined["content"] == {
        "group": "room.1",
        "event": "join",
        "conn_id": bob.conn_id,
        "alias": None,
        "user": None,
    }
    await _call(bob, "room.join", "lobby")  # no frames for a group without them
    bob.close()
    left = await ann.receive(timeout=5)
    assert left["type"] == PRESENCE
    assert left["content"]["event"] == "leave" and left["content"]["conn_id"] == bob.conn_id
    assert_balanced(wsbus_gateway.stats())


def _remote(kind: str, conn_id: str, group: str = "room.1", node: str = "other") -> Envelope:
    event = PresenceEvent(kind, NodeId(node), group, ConnId(conn_id), alias=f"a-{conn_id}")
    return Envelope(
        id=EnvelopeId(f"{node}-{conn_id}-{kind}"),
        type=PRESENCE,
        sender=GatewayAddress(NodeId(node)),
        content=msgspec.to_builtins(event),
    )


async def test_other_gateways_members_are_framed_and_a_dead_gateways_leave(
    wsbus_connect: Connect, wsbus_gateway: Gateway, room: Room
) -> None:
    ann = await wsbus_connect()
    await _call(ann, "room.join", "room.1")
    await room.wait(1)
    wsbus_gateway.deliver(_remote("join", "other.1"))
    wsbus_gateway.deliver(_remote("join", "other.2"))
    wsbus_gateway.deliver(_remote("leave", "other.2"))
    wsbus_gateway.deliver(_remote("join", "other.3", group="lobby"))  # not framed here
    frames = [await ann.receive() for _ in range(3)]
    assert [(f["content"]["event"], f["content"]["conn_id"]) for f in frames] == [
        ("join", "other.1"),
        ("join", "other.2"),
        ("leave", "other.2"),
    ]
    assert frames[0]["content"]["alias"] == "a-other.1"
    wsbus_gateway.gateway_lost(NodeId("other"), report=True)
    lost = await ann.receive()
    assert lost["content"] == {
        "group": "room.1",
        "event": "leave",
        "conn_id": "other.1",
        "alias": "a-other.1",
        "user": None,
    }
    events = await room.wait(2)
    assert events[1] == PresenceEvent("gateway_lost", NodeId("other"))
    # Told twice (by the bus and by another gateway's report): nothing more to say.
    wsbus_gateway.gateway_lost(NodeId("other"), report=False)
    with pytest.raises(TimeoutError):
        await ann.receive(timeout=0.2)
    await _settled(wsbus_gateway)
    stats = wsbus_gateway.stats()
    # The join of ann and the report; events heard from others are not this gateway's.
    assert stats.presence_events == 2
    assert_balanced(stats)


async def test_events_without_listeners_balance() -> None:
    # Nobody declared wsbus.presence: the events go nowhere, never refused as no_route.
    bus = MemoryBus([Control()])
    gateway = Gateway(bus, config=GatewayConfig(node="g"), entry_points=False)
    async with gateway:
        conn, client = memory_pair()
        task = asyncio.create_task(gateway.serve(conn))
        await client.receive_until("wsbus.welcome")
        for group in ("a", "b"):
            client.send("ctl.join", {"group": group}, id=group)
            await client.receive_until("ctl.join.reply")
        client.close()
        async with asyncio.timeout(5):
            await task
        await _settled(gateway)
        stats = gateway.stats()
    assert stats.presence_events == 4  # two joins, two leaves
    assert stats.presence_events_sent + stats.presence_events_lost == 4
    assert_balanced(stats)


def test_a_forged_or_malformed_event_is_ignored() -> None:
    presence = Presence(NodeId("me"), ("*",))
    forged = _remote("join", "victim.1")
    forged = msgspec.structs.replace(forged, sender=GatewayAddress(NodeId("liar")))
    assert presence.heard(forged) == []
    malformed = msgspec.structs.replace(_remote("join", "other.1"), content={"event": 3})
    assert presence.heard(malformed) == []
    own = msgspec.structs.replace(_remote("join", "me.1", node="me"))
    assert presence.heard(own) == []
    assert presence.remembered == 0


def _lost_by(sender: str, dead: str) -> Envelope:
    """A ``gateway_lost`` event about ``dead`` published by gateway ``sender``."""
    return Envelope(
        id=EnvelopeId(f"{sender}-lost-{dead}"),
        type=PRESENCE,
        sender=GatewayAddress(NodeId(sender)),
        content=msgspec.to_builtins(PresenceEvent("gateway_lost", NodeId(dead))),
    )


def test_one_gateway_cannot_erase_anothers_members() -> None:
    # The security review's proof, inverted: gateway a says b is lost; c, which learns a
    # death from its own bus only, keeps b's members and frames no leave.
    c = Presence(NodeId("c"), ("room.*",))
    for n in range(3):
        c.heard(_remote("join", f"b.{n}", node="b"))
    assert c.remembered == 3
    assert c.heard(_lost_by("a", "b")) == []
    assert c.heard(_lost_by("b", "b")) == []  # nor b about itself
    assert c.remembered == 3
    # The bus's word (HearsGateways.gateway_lost) still ends them.
    assert [content["conn_id"] for _, content in c.lost(NodeId("b"))] == ["b.0", "b.1", "b.2"]
    assert c.remembered == 0


async def test_a_gateway_lost_event_heard_from_the_bus_frames_nothing(
    wsbus_connect: Connect, wsbus_gateway: Gateway, room: Room
) -> None:
    ann = await wsbus_connect()
    await _call(ann, "room.join", "room.1")
    await room.wait(1)
    wsbus_gateway.deliver(_remote("join", "other.1"))
    assert (await ann.receive())["content"]["conn_id"] == "other.1"
    wsbus_gateway.deliver(_lost_by("liar", "other"))
    with pytest.raises(TimeoutError):
        await ann.receive(timeout=0.2)
    # Found dead by the bus: other.1's leave frame is still owed, and sent.
    wsbus_gateway.gateway_lost(NodeId("other"), report=False)
    left = await ann.receive()
    assert (left["content"]["event"], left["content"]["conn_id"]) == ("leave", "other.1")
    await _settled(wsbus_gateway)
    assert_balanced(wsbus_gateway.stats())


def test_remote_members_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("wsbus.presence.MAX_REMOTE_MEMBERS", 2)
    presence = Presence(NodeId("me"), ("room.*",))
    for n in range(4):
        # Framed whether remembered or not.
        assert len(presence.heard(_remote("join", f"other.{n}"))) == 1
    assert presence.remembered == 2
    assert [c["conn_id"] for _, c in presence.lost(NodeId("other"))] == ["other.0", "other.1"]
    assert presence.remembered == 0


# -- across gateways (tests/wsbus/cluster.py: the bus rules between gateways) ---------------


async def test_presence_across_gateways_and_a_dead_one() -> None:
    from tests.wsbus.cluster import Cluster, running

    room = Room()
    cluster = Cluster([room])
    async with running(cluster, presence_frames=("room.*",)) as run:
        a, b = run.gateways
        ann = await run.connect(a)
        bob = await run.connect(b)
        await _call(ann, "room.join", "room.1")
        await _call(bob, "room.join", "room.1")
        joined = await ann.receive_until(PRESENCE)
        assert (joined["content"]["event"], joined["content"]["conn_id"]) == ("join", bob.conn_id)
        members = await _call(ann, "room.who", "room.1")
        assert members["content"] == [ann.conn_id, bob.conn_id]  # asked of both gateways
        events = await room.wait(2)
        assert [(e.node, e.conn_id) for e in events] == [("a", ann.conn_id), ("b", bob.conn_id)]
        # The bus finds b dead and picks a to report it.
        a.gateway_lost(NodeId("b"), report=True)
        left = await ann.receive_until(PRESENCE)
        assert (left["content"]["event"], left["content"]["conn_id"]) == ("leave", bob.conn_id)
        events = await room.wait(3)
        assert events[2] == PresenceEvent("gateway_lost", NodeId("b"))
        for gateway in (a, b):
            await _settled(gateway)
            assert_balanced(gateway.stats())
