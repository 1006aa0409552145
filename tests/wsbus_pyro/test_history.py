"""History and resume across gateways on the Pyro bus, with real name server, bus and services.

The message bus keeps each history group's messages (its ``MemoryHistory``, stamped as it
queues them for the gateways) and closed sessions: a client of one gateway that loses its
connection mid-stream resumes on another gateway (the same resume secret) and misses
nothing. History and sessions live in the message bus process: after it restarts, a new
epoch, and resuming clients are told to resync.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import pytest
import pytest_asyncio

from tests.conftest import assert_balanced
from wsbus import Codec, Envelope, Gateway, GatewayConfig, Service, memory_pair
from wsbus.edge import MemoryClient
from wsbus.envelope import (
    ClientAddress,
    ConnId,
    EnvelopeId,
    GatewayAddress,
    NodeId,
    Recipients,
    ServiceAddress,
)
from wsbus.errors import BusUnavailable
from wsbus.gateway import ResumeSettings
from wsbus.history import GROUP_HEADER, POSITION_HEADER, HistoryConfig, Position, position_of
from wsbus.resume import SessionRecord
from wsbus.service import Context, handles
from wsbus_pyro import MessageBus, PyroBus, PyroConfig, messagebus
from wsbus_pyro.transport import (
    NO_ROUTE,
    OK,
    decode_batch,
    encode_batch,
    gateway_lost_notice,
    lookup,
)
from wsbus_testing.children import Child, free_port

encode = msgspec.msgpack.encode

Spawn = Callable[[str], Child]

WAIT = 30.0
"""The bound on every wait here: generous, for a busy two-core machine."""

SECRET = "5eed" * 16
"""The resume secret every gateway of these tests shares."""


class Streamer(Service):
    """Streams numbered messages to a group, for these tests.

    ``stream.start`` ``{"group", "n", "start", "pad"}`` sends ``stream.item``
    start..start+n-1 (start 0 by default) to the group, a little at a time, and replies
    ``"done"`` once all are sent; with ``pad``, each item is ``{"i": i, "pad": "x" * pad}``.
    ``stream.join`` ``{"group"}`` adds the sender to the group.
    """

    name = "streamer"

    @handles("stream.join")
    async def join(self, message: Envelope, ctx: Context) -> None:
        """Add the sender to the group."""
        assert isinstance(message.sender, ClientAddress)
        ctx.reply({"joined": await ctx.join(message.sender.conn_id, message.content["group"])})

    @handles("stream.start")
    async def start(self, message: Envelope, ctx: Context) -> None:
        """Send the numbered messages, pausing now and then (a stream, not one burst)."""
        recipients = Recipients(groups=(message.content["group"],))
        start = int(message.content.get("start", 0))
        pad = int(message.content.get("pad", 0))
        for i in range(start, start + int(message.content["n"])):
            ctx.send(recipients, "stream.item", {"i": i, "pad": "x" * pad} if pad else i)
            if i % 10 == 9:
                await asyncio.sleep(0.01)
        ctx.reply("done")


class Kit:
    """Gateways on the Pyro bus in this process, keeping history for ``feed.*``."""

    def __init__(self, config: PyroConfig) -> None:
        self.config = config
        self.gateways: list[Gateway] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def gateway(self, node: str) -> Gateway:
        config = GatewayConfig(
            node=node,
            history=HistoryConfig(groups=("feed.*",), size=1000, age=300.0),
            resume=ResumeSettings(window=60.0, secret=SECRET),
        )
        gateway = Gateway(PyroBus(self.config), config=config, entry_points=False)
        await gateway.start()
        self.gateways.append(gateway)
        return gateway

    async def client(self, gateway: Gateway) -> tuple[MemoryClient, dict[str, Any]]:
        """Connect a client; return it and its welcome's content."""
        conn, client = memory_pair(Codec.JSON)
        self.tasks.append(asyncio.create_task(gateway.serve(conn)))
        welcome = await client.receive(WAIT)
        assert welcome["type"] == "wsbus.welcome", welcome
        client.conn_id = welcome["content"]["conn_id"]
        return client, welcome["content"]

    async def close(self) -> None:
        for gateway in self.gateways:
            await gateway.close()
        self.gateways.clear()
        await asyncio.gather(*self.tasks)
        self.tasks.clear()


@pytest_asyncio.fixture
async def kit(wsbus_pyro_config: PyroConfig, wsbus_spawn_service: Spawn) -> AsyncIterator[Kit]:
    await asyncio.to_thread(wsbus_spawn_service, "tests.wsbus_pyro.test_history:Streamer")
    kit = Kit(wsbus_pyro_config)
    try:
        yield kit
    finally:
        await kit.close()


def _bus_info(config: PyroConfig) -> dict[str, Any]:
    with lookup(config.bus_name, config) as bus:
        info: dict[str, Any] = bus.info()
    return info


async def _join(client: MemoryClient, group: str) -> None:
    client.send("stream.join", {"group": group}, id=f"join-{group}")
    reply = await client.receive_until("stream.join.reply", WAIT)
    assert reply["content"] == {"joined": True}


async def _saved(gateway: Gateway) -> None:
    """Wait until the gateway has kept a closed session (in the message bus)."""
    async with asyncio.timeout(WAIT):
        while gateway.stats().sessions_saved < 1:
            await asyncio.sleep(0.02)


async def _resume(
    client: MemoryClient, token: str, positions: dict[str, str]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Send ``wsbus.resume``; return the ``wsbus.resumed`` content and the frames before it."""
    client.send("wsbus.resume", {"token": token, "positions": positions}, id="r1")
    before: list[dict[str, Any]] = []
    async with asyncio.timeout(WAIT):
        while True:
            frame = await client.receive(WAIT)
            if frame["type"] == "wsbus.resumed":
                assert frame["reply_to"] == "r1"
                return frame["content"], before
            assert frame["type"] != "wsbus.error", frame
            before.append(frame)


async def test_a_client_resumes_on_another_gateway_and_misses_nothing(kit: Kit) -> None:
    g1 = await kit.gateway("g1")
    g2 = await kit.gateway("g2")
    ann, welcome = await kit.client(g1)
    token = welcome["resume"]["token"]
    await _join(ann, "feed.1")
    ann.send("stream.start", {"group": "feed.1", "n": 150}, id="go")
    seen: list[int] = []
    positions: list[Position] = []

    def take(frame: dict[str, Any]) -> None:
        if frame["type"] == "stream.item":
            position = Position.parse(frame["pos"])
            assert position is not None and frame["group"] == "feed.1"
            seen.append(frame["content"])
            positions.append(position)
        else:
            assert frame["type"] in ("stream.start.reply", "wsbus.ack"), frame

    # Mid-stream: ann reads a third of it, and her connection is gone.
    async with asyncio.timeout(WAIT):
        while len(seen) < 50:
            take(await ann.receive(WAIT))
    ann.close(1006)
    await _saved(g1)
    # The rest of that stream is in the message bus's history before she is back.
    bus = g2.bus
    assert isinstance(bus, PyroBus)
    end = Position(positions[0].epoch, positions[0].offset + 149)
    async with asyncio.timeout(WAIT):
        while await bus.history("feed.1", end, 1) != []:
            await asyncio.sleep(0.02)

    again, _ = await kit.client(g2)
    resumed, before = await _resume(again, token, {"feed.1": positions[-1].encode()})
    assert before == []
    assert resumed["recovered"] == ["feed.1"] and resumed["resync"] == []
    assert resumed["groups"] == ["feed.1"]
    assert resumed["conn_id"] == again.conn_id and resumed["token"] != token
    # Replayed, then live: every item after the last one seen, once each, in order.
    async with asyncio.timeout(WAIT):
        while seen[-1] != 149:
            take(await again.receive(WAIT))
        again.send("stream.start", {"group": "feed.1", "n": 150, "start": 150}, id="more")
        while seen[-1] != 299:
            take(await again.receive(WAIT))
    assert seen == list(range(300))
    first = positions[0].offset
    assert [p.offset for p in positions] == list(range(first, first + 300))
    assert {p.epoch for p in positions} == {positions[0].epoch}
    stats = g2.stats()
    assert (stats.resumes, stats.replayed) == (1, 100)
    for gateway in (g1, g2):
        assert_balanced(gateway.stats())


async def test_a_restarted_bus_starts_history_again_and_clients_resync(
    kit: Kit, wsbus_message_bus: Child, wsbus_pyro_config: PyroConfig
) -> None:
    config = wsbus_pyro_config
    g1 = await kit.gateway("g1")
    ann, welcome = await kit.client(g1)
    await _join(ann, "feed.1")
    ann.send("stream.start", {"group": "feed.1", "n": 3}, id="go")
    frames = [await ann.receive_until("stream.item", WAIT) for _ in range(3)]
    old = Position.parse(frames[-1]["pos"])
    assert old is not None
    epoch = (await asyncio.to_thread(_bus_info, config))["history"]
    assert epoch == old.epoch

    await asyncio.to_thread(wsbus_message_bus.stop)
    bus = await asyncio.to_thread(
        Child, ["bus", "--ns-port", str(config.ns_port)], env={"WSBUS_SECRET": None}
    )
    try:
        # The gateway registers again, with its history settings: a new epoch.
        async with asyncio.timeout(WAIT):
            while (info := await asyncio.to_thread(_bus_info, config))["history"] is None:
                await asyncio.sleep(0.1)
        assert info["history"] != epoch
        async with asyncio.timeout(WAIT):
            while "streamer" not in (await asyncio.to_thread(_bus_info, config))["services"]:
                await asyncio.sleep(0.1)
        ann.close(1006)
        await _saved(g1)
        again, _ = await kit.client(g1)
        resumed, _ = await _resume(again, welcome["resume"]["token"], {"feed.1": frames[-1]["pos"]})
        assert resumed["groups"] == ["feed.1"]
        assert resumed["recovered"] == [] and resumed["resync"] == ["feed.1"]
        # Back in the group, it gets what is sent now, in the new epoch, from offset 1.
        again.send("stream.start", {"group": "feed.1", "n": 1}, id="go-again")
        frame = await again.receive_until("stream.item", WAIT)
        assert frame["pos"] == f"{info['history']}:1"
    finally:
        await kit.close()
        await asyncio.to_thread(bus.stop)


# -- the message bus's history and sessions, called directly (no processes) ------------------


def _fake_uri() -> str:
    # Nothing listens there: forwarders to it fail at once, which routing does not mind.
    return f"PYRO:wsbus.gateway.g1@127.0.0.1:{free_port()}"


def _feed(n: int, id: str | None = None, **fields: Any) -> Envelope:
    return Envelope(
        id=EnvelopeId(id or f"streamer-{n}"),
        type="stream.item",
        sender=ServiceAddress("streamer"),
        content=n,
        recipients=Recipients(groups=("feed.1",)),
        **fields,
    )


def _history(bus: MessageBus, group: str, after: int, limit: int = 100) -> list[Envelope] | None:
    answer = bus.history(group, [bus.info()["history"], after], limit)
    return None if answer is None else decode_batch(answer[0])


def test_the_message_bus_stamps_each_history_message_once(
    wsbus_pyro_config: PyroConfig,
) -> None:
    bus = MessageBus(wsbus_pyro_config)
    config = HistoryConfig(groups=("feed.*",), size=10, age=300.0)
    try:
        bus.register_gateway("g1", _fake_uri(), [], False, True, encode(config))
        forged = _feed(3, headers={POSITION_HEADER: "e:999", GROUP_HEADER: "feed.1"})
        not_kept = msgspec.structs.replace(_feed(4), recipients=Recipients(groups=("other",)))
        bus.route(encode_batch([_feed(1), _feed(2), _feed(1), forged, not_kept]))
        kept = _history(bus, "feed.1", 0)
        assert kept is not None
        # The copy sent again kept its place; the service's own position was not believed.
        assert [(e.content, position_of(e)) for e in kept] == [
            (n, ("feed.1", Position(bus.info()["history"], n))) for n in (1, 2, 3)
        ]
        assert _history(bus, "feed.1", 3) == []
        assert _history(bus, "other", 0) is None
        # Only the bus and gateways speak for gateways: a service's attempt goes nowhere.
        lost = gateway_lost_notice("g1", "x")
        presence = Envelope(
            id=EnvelopeId("p"),
            type="wsbus.presence",
            sender=GatewayAddress(NodeId("g1")),
            content={"event": "leave", "node": "g1"},
        )
        assert bus.route(encode_batch([lost, presence])) == [NO_ROUTE, NO_ROUTE]
    finally:
        bus._shutdown()


def test_the_last_gateway_to_register_says_what_history_is_kept(
    wsbus_pyro_config: PyroConfig, caplog: pytest.LogCaptureFixture
) -> None:
    bus = MessageBus(wsbus_pyro_config)
    first = HistoryConfig(groups=("feed.*",))
    other = HistoryConfig(groups=("feed.*",), size=5)
    try:
        assert bus.info()["history"] is None
        bus.register_gateway("g1", _fake_uri(), [], False, True, encode(first))
        epoch = bus.info()["history"]
        bus.register_gateway("g2", _fake_uri(), [], False, True, encode(first))
        bus.register_gateway("g3", _fake_uri(), [], False, True)  # says nothing
        assert bus.info()["history"] == epoch
        with caplog.at_level(logging.WARNING, "wsbus.pyro.bus"):
            bus.register_gateway("g4", _fake_uri(), [], False, True, encode(other))
            bus.register_gateway("g5", _fake_uri(), [], False, True, encode(first))
            bus.register_gateway("g6", _fake_uri(), [], False, True, b"\x01not settings")
        # A change starts history again under a new epoch; it is logged once.
        assert bus.info()["history"] not in (None, epoch)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 2
        assert "gateway g4 keeps history as" in warnings[0]
        assert "gateway g6 sent history settings the bus cannot read" in warnings[1]
    finally:
        bus._shutdown()


def test_a_history_read_fits_in_pyro_messages(wsbus_pyro_config: PyroConfig) -> None:
    config = msgspec.structs.replace(wsbus_pyro_config, max_message_size=64 * 1024)
    bus = MessageBus(config)
    try:
        bus.register_gateway(
            "g1", _fake_uri(), [], False, True, encode(HistoryConfig(groups=("feed.*",)))
        )
        pad = "x" * 10_000
        bus.route(encode_batch([_feed(n, headers={"pad": pad}) for n in range(1, 11)]))
        answer = bus.history("feed.1", [bus.info()["history"], 0], 100)
        assert answer is not None
        blob, more = answer
        first = decode_batch(blob)
        assert more is True and 1 <= len(first) < 10
        assert len(blob) <= config.max_message_size // 2
        # Asked again after the last one, as PyroBus.history does, until nothing is left out.
        got = first
        while more:
            answer = bus.history("feed.1", [bus.info()["history"], len(got)], 100)
            assert answer is not None
            blob, more = answer
            got += decode_batch(blob)
        assert [e.content for e in got] == list(range(1, 11))
        # What a peer sends that is not a question gets no answer but None.
        assert bus.history("feed.1", "nonsense", 10) is None
        assert bus.history("feed.1", [bus.info()["history"], -1], 10) is None
        assert bus.history("g" * 5000, [bus.info()["history"], 0], 10) is None
    finally:
        bus._shutdown()


def test_closed_sessions_are_kept_within_bounds(
    wsbus_pyro_config: PyroConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(messagebus, "_SESSION_BYTES", 10_000)
    bus = MessageBus(wsbus_pyro_config)

    def record(n: int) -> SessionRecord:
        return SessionRecord(
            sid=f"session-{n:04}-abcdefghijklmnop",
            user=None,
            alias=None,
            groups=("feed.1",),
            conn_ids=(ConnId(f"g1.{n}"),),
            closed=1.0,
            code=1006,
            unacked=(_feed(n, headers={"pad": "x" * 3000}),),
        )

    try:
        for n in range(5):
            assert bus.save_session(encode(record(n)), 60.0) == OK
        # About 3 KB each: the oldest went to keep within 10,000 bytes.
        assert bus.info()["sessions"] == 3 and bus.sessions_dropped == 2
        assert bus.take_session(record(0).sid) is None
        taken = bus.take_session(record(4).sid)
        assert taken is not None and msgspec.msgpack.decode(taken, type=SessionRecord) == record(4)
        assert bus.take_session(record(4).sid) is None
        assert bus.save_session(b"\x01not a record", 60.0) == "refused"
        assert bus.save_session(encode(record(9)), 0.0) == OK  # nothing to keep
        assert bus.take_session(record(9).sid) is None
        assert bus.take_session("s" * 5000) is None
    finally:
        bus._shutdown()


async def test_a_session_record_too_large_for_pyro_is_refused(kit: Kit) -> None:
    gateway = await kit.gateway("g1")
    bus = gateway.bus
    assert isinstance(bus, PyroBus)
    huge = SessionRecord(
        sid="too-large-session-abcdefgh",
        user=None,
        alias=None,
        groups=(),
        conn_ids=(ConnId("g1.1"),),
        closed=1.0,
        code=1006,
        unacked=(_feed(1, headers={"pad": "x" * kit.config.max_message_size}),),
    )
    with pytest.raises(BusUnavailable, match="more than a Pyro message may carry"):
        await bus.save_session(huge, 60.0)


async def test_a_long_history_read_takes_several_calls(kit: Kit) -> None:
    """What does not fit in one Pyro message comes in the next call, whole and in order."""
    gateway = await kit.gateway("g1")
    ann, _ = await kit.client(gateway)
    size = kit.config.max_message_size // 8
    ann.send("stream.start", {"group": "feed.big", "n": 10, "pad": size}, id="go")
    await ann.receive_until("stream.start.reply", WAIT)
    bus = gateway.bus
    assert isinstance(bus, PyroBus)
    epoch = (await asyncio.to_thread(_bus_info, kit.config))["history"]
    got = await bus.history("feed.big", Position(epoch, 0), 100)
    assert got is not None
    assert [e.content["i"] for e in got] == list(range(10))
    assert all(len(e.content["pad"]) == size for e in got)
    some = await bus.history("feed.big", Position(epoch, 2), 5)
    assert [e.content["i"] for e in some or ()] == [2, 3, 4, 5, 6]
