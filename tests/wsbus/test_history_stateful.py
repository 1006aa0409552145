"""A state machine of history and resume: a real Gateway on a MemoryBus, in-memory clients.

The model is written here, sharing no code with wsbus: per group, the messages sent (each
with who was a member then and whom it excluded); per client, its session (every
connection id it had, its groups) and what it has seen of each group. Rules send to
groups (some excluding a connection, old or current), join, disconnect at any point
(reading what had arrived or not), stall a client until the gateway closes it 4507, move
the clock (records expire), trim history by size, and resume with any position: the one
the client last saw, an older one, a newer one, one of another epoch, garbage, or none.

The property, per session and group: the messages a client sees come once each and in
offset order, and every message it was owed (sent while its session was in the group, not
excluded for any of its connections, after what it last saw or claimed) either reached it
or an explicit resync or gap for that group came in its place. A resume the gateway
refuses restores nothing; the client then knows to start afresh.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

from tests.conftest import assert_balanced
from wsbus import (
    Codec,
    ConnectionClosed,
    ConnId,
    Context,
    Envelope,
    Gateway,
    GatewayConfig,
    HistoryConfig,
    MemoryBus,
    Recipients,
    ResumeSettings,
    Service,
    handles,
)
from wsbus.bus import BusSink
from wsbus.edge import MemoryClient, memory_pair
from wsbus.envelope import NodeId
from wsbus.history import Position
from wsbus.resuming import RESUME_BURST, RESUME_PERIOD

T = TypeVar("T")

GROUPS = ("g.a", "g.b")
CLIENTS = 3
SIZE = 4  # history entries kept per group
WINDOW = 30.0  # seconds a closed session can be resumed
BUFFER = 4  # frames a client end holds unread
QUEUE = 4  # frames the gateway queues per connection before 4507


class Pump(Service):
    """The test's service: it sends and joins through its link."""

    name = "pump"

    @handles("pump.noop")
    async def noop(self, message: Envelope, ctx: Context) -> None:
        """Nothing: a service handles at least one type."""


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Sent:
    """One message to a group, as the model remembers it."""

    n: int
    exclude: frozenset[str]
    members: frozenset[int]  # the sessions in the group when it was sent


@dataclass
class Stream:
    """What one session has seen of one group.

    ``last``: the offset it last saw or claimed; ``expect``: the next it is owed (None
    after a resync or gap: it resyncs, and owes nothing before what comes next).
    """

    last: int
    expect: int | None
    start: int = 0  # the last offset sent before the session joined
    seen: bool = False


@dataclass
class SessionModel:
    id: int
    conn_ids: list[str]
    groups: dict[str, Stream] = field(default_factory=dict)
    token: str | None = None
    closed_at: float | None = None
    ended: bool = False
    resumed: list[float] = field(default_factory=list)  # when it was resumed (model clock)


@dataclass
class ClientModel:
    conn: MemoryClient | None = None
    conn_id: str = ""
    stalled: bool = False
    session: SessionModel | None = None


class HistoryMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        # A loop of the machine's own, never the current one (see tests/loops.py).
        self.loop = asyncio.new_event_loop()
        self.clock = Clock()
        self.pump = Pump()
        self.bus = self.make_bus()
        config = GatewayConfig(
            node="gw",
            outbound_queue=QUEUE,
            history=HistoryConfig(groups=("g.*",), size=SIZE, age=1e9),
            resume=ResumeSettings(window=WINDOW),
        )
        # One clock for the bus (records expire by it) and the gateway (resumes are
        # counted by it): the machine moves time, so no rule depends on how fast it runs.
        self.gateway = Gateway(self.bus, config=config, entry_points=False, clock=self.clock)
        self.tasks: list[asyncio.Task[None]] = []
        self.run(self.gateway.start())
        self.clients = [ClientModel() for _ in range(CLIENTS)]
        self.sent: dict[str, list[Sent]] = {g: [] for g in GROUPS}
        self.epoch: str | None = None
        self.used_tokens: list[str] = []
        self.conn_ids: list[str] = []
        self.numbers = itertools.count(1)
        self.session_ids = itertools.count(1)
        self.resumes_tried = 0

    def make_bus(self) -> MemoryBus:
        return MemoryBus([self.pump], clock=self.clock)

    def in_flight(self) -> bool:
        """True while the bus holds history messages back from the gateway."""
        return False

    async def arrive(self) -> None:
        """Let whatever the bus holds back reach the gateway."""

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        async def bounded() -> T:
            async with asyncio.timeout(10):
                return await coroutine

        return self.loop.run_until_complete(bounded())

    def teardown(self) -> None:
        async def stop() -> None:
            await self.gateway.close()
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)

        try:
            self.run(stop())
            stats = self.gateway.stats()
            assert_balanced(stats)
            assert stats.sessions_closed == stats.sessions_saved + stats.sessions_ended
        finally:
            self.loop.close()

    # -- the model's checks ---------------------------------------------------------------

    def owed(self, session: SessionModel, group: str, offset: int) -> bool:
        sent = self.sent[group][offset - 1]
        return session.id in sent.members and not (sent.exclude & set(session.conn_ids))

    def holes(self, session: SessionModel, group: str, start: int, end: int) -> list[int]:
        return [o for o in range(start, end) if self.owed(session, group, o)]

    def absorb(self, client: ClientModel, frame: dict[str, Any]) -> None:
        """Take one frame a client read, checking it against the model."""
        session = client.session
        assert session is not None
        kind = frame["type"]
        if kind == "wsbus.gap":
            for group in frame["content"].get("groups", GROUPS):
                if group in session.groups:
                    session.groups[group].expect = None
        if kind != "pump.item":
            return
        group = frame["group"]
        epoch, _, text = frame["pos"].rpartition(":")
        offset = int(text)
        if self.epoch is None:
            self.epoch = epoch
        assert epoch == self.epoch
        assert self.sent[group][offset - 1].n == frame["content"], "position and message agree"
        stream = session.groups.get(group)
        assert stream is not None, f"{group} message to a session not in it"
        assert offset > stream.last, (
            f"{group}:{offset} after {stream.last}: duplicate or out of order"
        )
        if stream.expect is not None:
            missed = self.holes(session, group, stream.expect, offset)
            assert not missed, f"{group}: {missed} skipped in silence before {offset}"
        assert self.owed(session, group, offset), f"{group}:{offset} was not for this session"
        stream.last = offset
        stream.expect = offset + 1
        stream.seen = True

    def complete(self, client: ClientModel) -> None:
        """A connected client that read everything was owed nothing more."""
        session = client.session
        assert session is not None
        for group, stream in session.groups.items():
            if stream.expect is not None:
                missed = self.holes(session, group, stream.expect, len(self.sent[group]) + 1)
                assert not missed, f"{group}: {missed} never came and no gap said so"

    async def drain(self, client: ClientModel) -> None:
        """Read what the gateway sent a client until nothing more comes."""
        conn = client.conn
        assert conn is not None
        for _ in range(200):
            while conn.pending():
                self.absorb(client, await conn.receive())
            session = self.gateway._sessions.get(ConnId(client.conn_id))
            if conn.close_code is not None or session is None:
                break
            if not session.outbox and not conn.pending():
                await asyncio.sleep(0)
                if not conn.pending() and not session.outbox:
                    break
            await asyncio.sleep(0)
        if conn.close_code is not None:
            await self.gone(client, read=True)

    async def gone(self, client: ClientModel, *, read: bool) -> None:
        """The client's connection is closed (by it, or by the gateway): wait for the record."""
        conn = client.conn
        assert conn is not None and client.session is not None
        if read:
            try:
                while True:
                    self.absorb(client, await conn.receive(timeout=1.0))
            except ConnectionClosed:
                pass
        async with asyncio.timeout(5):
            while ConnId(client.conn_id) in self.gateway._sessions:
                await asyncio.sleep(0.001)
        client.conn = None
        client.stalled = False
        client.session.closed_at = self.clock.now

    async def quiesce(self) -> None:
        """Wait until the gateway's order stage holds nothing and fetches nothing."""
        resumer = self.gateway._resumer
        for _ in range(1000):
            if not resumer._order.parked and not resumer._tasks and resumer._timer is None:
                return
            await asyncio.sleep(0.001)
        raise AssertionError("the order stage did not settle")

    async def settle(self) -> None:
        """Drain every connected client that reads; check each was owed nothing more."""
        await self.quiesce()
        for client in self.clients:
            if client.conn is not None and not client.stalled:
                await self.drain(client)
            if client.conn is not None and not client.stalled and not self.in_flight():
                self.complete(client)
            elif client.conn is not None and client.conn.close_code is not None:
                await self.gone(client, read=False)

    async def open(self) -> tuple[MemoryClient, dict[str, Any]]:
        conn, client = memory_pair(Codec.JSON, buffer=BUFFER)
        self.tasks.append(asyncio.create_task(self.gateway.serve(conn)))
        welcome = await client.receive()
        assert welcome["type"] == "wsbus.welcome"
        self.conn_ids.append(welcome["content"]["conn_id"])
        return client, welcome["content"]

    # -- rules -------------------------------------------------------------------------------

    def _can_connect(self, k: int) -> bool:
        return self.clients[k].conn is None

    @precondition(lambda self: any(c.conn is None for c in self.clients))
    @rule(k=st.integers(0, CLIENTS - 1), groups=st.sets(st.sampled_from(GROUPS)))
    def connect(self, k: int, groups: set[str]) -> None:
        """A client starts afresh (abandoning a session it could resume), joins groups."""
        client = self.clients[k]
        if client.conn is not None:
            return
        if client.session is not None:
            client.session.ended = True
        conn, welcome = self.run(self.open())
        client.conn, client.conn_id = conn, welcome["conn_id"]
        client.session = SessionModel(
            next(self.session_ids), [welcome["conn_id"]], token=welcome["resume"]["token"]
        )
        for group in sorted(groups):
            self.join(k, group)

    @rule(k=st.integers(0, CLIENTS - 1), group=st.sampled_from(GROUPS))
    def join(self, k: int, group: str) -> None:
        client = self.clients[k]
        session = client.session
        if client.conn is None or session is None or group in session.groups:
            return

        async def join() -> None:
            await self.pump.link.join(ConnId(client.conn_id), group)
            await self.settle()

        # Membership is the gateway's at delivery: with nothing on its way, the join is a
        # clean line between what the session is owed and what it is not.
        self.run(self.arrive())
        if client.conn is None or client.conn.close_code is not None:
            return  # closed by the gateway meanwhile (a stalled client, 4507)
        count = len(self.sent[group])
        session.groups[group] = Stream(last=count, expect=count + 1, start=count)
        self.run(join())

    @rule(
        group=st.sampled_from(GROUPS),
        exclude=st.one_of(st.none(), st.integers(0, 50)),
        times=st.sampled_from([1, 1, 1, 3, 9]),
    )
    def send(self, group: str, exclude: int | None, times: int) -> None:
        """A service sends to a group, maybe excluding a connection (current or old)."""
        excluded: tuple[str, ...] = ()
        if exclude is not None and self.conn_ids:
            excluded = (self.conn_ids[exclude % len(self.conn_ids)],)
        members = frozenset(
            c.session.id
            for c in self.clients
            if c.session is not None and not c.session.ended and group in c.session.groups
        )

        async def send() -> None:
            for _ in range(times):
                n = next(self.numbers)
                self.sent[group].append(Sent(n, frozenset(excluded), members))
                recipients = Recipients(groups=(group,), exclude=tuple(ConnId(c) for c in excluded))
                self.pump.link.send(recipients, "pump.item", n)
            await self.settle()

        self.run(send())

    @precondition(lambda self: any(c.conn is not None for c in self.clients))
    @rule(k=st.integers(0, CLIENTS - 1))
    def stall(self, k: int) -> None:
        """The client stops reading: sends to its groups fill its queue, then 4507."""
        client = self.clients[k]
        if client.conn is not None:
            client.stalled = True

    @precondition(lambda self: any(c.conn is not None for c in self.clients))
    @rule(k=st.integers(0, CLIENTS - 1), read=st.booleans())
    def disconnect(self, k: int, read: bool) -> None:
        """The client's connection ends, having read what had arrived, or not."""
        client = self.clients[k]
        conn = client.conn
        if conn is None:
            return

        async def close() -> None:
            if read:
                while conn.pending():
                    self.absorb(client, await conn.receive())
            conn.close(1006)
            await self.gone(client, read=False)

        self.run(close())

    @precondition(lambda self: any(c.conn is not None for c in self.clients))
    @rule(
        k=st.integers(0, CLIENTS - 1),
        read=st.booleans(),
        missed=st.lists(st.sampled_from([1, 2, 5]), max_size=3),
        how=st.sampled_from(["right", "right", "right", "older", "newer", "none"]),
    )
    def away_and_back(self, k: int, read: bool, missed: list[int], how: str) -> None:
        """A client drops, messages to its groups go on without it, and it resumes."""
        client = self.clients[k]
        if client.conn is None or client.session is None:
            return
        groups = sorted(client.session.groups) or list(GROUPS)
        self.disconnect(k, read)
        for i, times in enumerate(missed):
            self.send(groups[i % len(groups)], None, times)
        self.resume(k, how)

    @rule(seconds=st.sampled_from([1.0, 1.0, 10.0, 31.0]))
    def time_passes(self, seconds: float) -> None:
        self.clock.now += seconds

    def _resumable(self) -> bool:
        return any(
            c.conn is None and c.session is not None and not c.session.ended for c in self.clients
        )

    @precondition(_resumable)
    @rule(
        k=st.integers(0, CLIENTS - 1),
        how=st.sampled_from(["right", "right", "older", "newer", "other_epoch", "garbage", "none"]),
    )
    def resume(self, k: int, how: str) -> None:
        client = self.clients[k]
        session = client.session
        if client.conn is not None or session is None or session.ended:
            return
        assert session.token is not None and session.closed_at is not None
        positions: dict[str, Any] = {}
        claims: dict[str, int] = {}
        for group, stream in session.groups.items():
            if not stream.seen or self.epoch is None:
                continue  # a client gives positions only for groups it saw something of
            # An older position, but one it was given: from after it joined.
            older = max(stream.start + 1, stream.last - 2)
            offset = {"right": stream.last, "older": older}.get(how, stream.last + 3)
            if how in ("right", "older", "newer"):
                positions[group] = f"{self.epoch}:{offset}"
                claims[group] = offset
            elif how == "other_epoch":
                positions[group] = f"{self.epoch}x:{offset}"
            elif how == "garbage":
                positions[group] = "not a position"
        # A session with no group had nothing to restore: no record was kept of it. One
        # resumed RESUME_BURST times within RESUME_PERIOD is refused (and ends).
        now = self.clock.now
        recent = [t for t in session.resumed if now - RESUME_PERIOD < t <= now]
        expired = (
            now >= session.closed_at + WINDOW or not session.groups or len(recent) >= RESUME_BURST
        )

        fresh: list[str] = []

        async def resume() -> dict[str, Any] | None:
            conn, welcome = await self.open()
            client.conn, client.conn_id = conn, welcome["conn_id"]
            fresh.append(welcome["resume"]["token"])
            content = {"token": session.token, "positions": positions}
            conn.send("wsbus.resume", content, id="r")
            while True:
                frame = await conn.receive()
                if frame["type"] == "wsbus.resumed":
                    answer: dict[str, Any] = frame["content"]
                    return answer
                if frame["type"] == "wsbus.error":
                    assert frame["content"]["code"] == "resume_failed"
                    assert frame["content"]["ref"] == "r"
                    return None
                self.absorb(client, frame)

        self.used_tokens.append(session.token)
        self.resumes_tried += 1
        answer = self.run(resume())
        if answer is None:
            assert expired, "a live session's resume was refused"
            # Nothing restored; the client knows to start afresh: a new session.
            info = self.gateway.registry.info(ConnId(client.conn_id))
            assert info.groups == ()
            session.ended = True
            client.session = SessionModel(next(self.session_ids), [client.conn_id], token=fresh[0])
            self.run(self.settle())
            return
        assert not expired, "an expired session was resumed"
        assert answer["groups"] == list(session.groups)
        assert answer["conn_id"] == client.conn_id
        session.conn_ids.append(client.conn_id)
        session.token = answer["token"]
        session.closed_at = None
        session.resumed = [*recent, now]
        for group, stream in session.groups.items():
            count = len(self.sent[group])
            claim = claims.get(group)
            recoverable = claim is not None and count - SIZE <= claim <= count
            assert (group in answer["recovered"]) != (group in answer["resync"])
            if group not in positions:
                # No position given: replayed from where the group stood at its join, if
                # the history still has that (the gateway's record); either way what
                # comes next is checked as a fresh stream: in order, once each.
                recoverable = False
            else:
                assert (group in answer["recovered"]) is recoverable, (group, claim, count)
            if claim is not None and recoverable:
                # What the client says it has: it is owed what follows.
                stream.last, stream.expect = claim, claim + 1
            else:
                # Told to resync, the client rebuilds the group from a service: what it had
                # is gone, and what comes next starts afresh (in order, once each).
                stream.expect = None
                stream.last = 0
                stream.seen = False
        self.run(self.settle())

    @precondition(lambda self: self._resumable() and self.resumes_tried > 3)
    @rule(k=st.integers(0, CLIENTS - 1), forge=st.sampled_from(["mac", "sid", "used"]))
    def resume_with_a_bad_token(self, k: int, forge: str) -> None:
        """A forged or used token is refused and restores nothing (and takes nothing)."""
        session = self.clients[k].session
        if session is None or session.ended or session.token is None:
            return
        version, sid, mac = session.token.split(".")
        if forge == "mac":
            token = f"{version}.{sid}.{mac[:-2]}{'A' if mac[-2] != 'A' else 'B'}{mac[-1]}"
        elif forge == "sid":
            token = f"{version}.{sid[:-1]}{'A' if sid[-1] != 'A' else 'B'}.{mac}"
        elif self.used_tokens:
            token = self.used_tokens[0]
        else:
            return

        async def attempt() -> None:
            conn, welcome = await self.open()
            conn.send("wsbus.resume", {"token": token, "positions": {}}, id="bad")
            frame = await conn.receive_until("wsbus.error")
            assert frame["content"]["code"] == "resume_failed"
            info = self.gateway.registry.info(ConnId(welcome["conn_id"]))
            assert (info.alias, info.groups) == (None, ())
            conn.close(1000)
            async with asyncio.timeout(5):
                while ConnId(welcome["conn_id"]) in self.gateway._sessions:
                    await asyncio.sleep(0.001)

        self.run(attempt())


class ShufflingBus(MemoryBus):
    """A MemoryBus that holds history messages back and hands them over shuffled, or never.

    As a bus between processes may: another publisher's message overtakes, a link drops
    one (it is in the history all the same). Some are handed over while a resume reads
    the history, so that they arrive during the resume, and after it, behind it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pending: list[Envelope] = []
        self.seeds = itertools.count()
        self.gateway: BusSink | None = None

    async def start(self, sink: BusSink) -> None:
        self.gateway = sink
        await super().start(_Tap(self, sink.node))

    def take(self, envelope: Envelope) -> None:
        assert self.gateway is not None
        if envelope.headers.get("wsbus-pos") is None:
            self.gateway.deliver(envelope)
        else:
            self.pending.append(envelope)

    def release(self, seed: int, drop: int, share: float = 1.0) -> None:
        """Hand over a share of what is held, shuffled; every ``drop``-th is lost.

        Never the newest of a group: a loss is found when a later message arrives (a lost
        newest one a real bus reports as a broken link, which is HearsLoss's business).
        """
        assert self.gateway is not None
        rng = random.Random(seed)
        count = round(len(self.pending) * share)
        chosen, self.pending = self.pending[:count], self.pending[count:]
        newest = {}
        for envelope in chosen:
            newest[envelope.headers["wsbus-group"]] = envelope.id
        rng.shuffle(chosen)
        for i, envelope in enumerate(chosen, 1):
            if drop and i % drop == 0 and envelope.id not in newest.values():
                continue
            self.gateway.deliver(envelope)

    async def history(self, group: str, after: Position, limit: int) -> list[Envelope] | None:
        self.release(next(self.seeds), 0, 0.5)
        await asyncio.sleep(0)
        return await super().history(group, after, limit)


class _Tap:
    """The gateway as the ShufflingBus's MemoryBus part sees it."""

    def __init__(self, bus: ShufflingBus, node: NodeId) -> None:
        self._bus = bus
        self.node = node

    def deliver(self, envelope: Envelope) -> None:
        self._bus.take(envelope)


class ShufflingHistoryMachine(HistoryMachine):
    """The same model on a bus that reorders and loses history messages."""

    def __init__(self) -> None:
        super().__init__()
        # Fetch what is missing at once: the model moves no loop time.
        self.gateway._resumer._order.wait = 0.0
        # A gateway that has run a while: it has seen each group, so it knows where each
        # starts. (The first message a gateway sees of a group sets the start: one
        # overtaken before that is a gap, and one lost before that is not seen at all.)
        for group in GROUPS:
            self.send(group, None, 1)
        self.bus_delivers(0, 0)

    def make_bus(self) -> MemoryBus:
        return ShufflingBus([self.pump], clock=self.clock)

    def in_flight(self) -> bool:
        assert isinstance(self.bus, ShufflingBus)
        return bool(self.bus.pending)

    async def arrive(self) -> None:
        assert isinstance(self.bus, ShufflingBus)
        self.bus.release(0, 0)
        await self.settle()

    @rule(seed=st.integers(0, 2**16), drop=st.sampled_from([0, 0, 3, 7]))
    def bus_delivers(self, seed: int, drop: int) -> None:
        """The bus hands over what it held, in any order, losing some."""
        assert isinstance(self.bus, ShufflingBus)
        bus = self.bus

        async def deliver() -> None:
            bus.release(seed, drop)
            await self.settle()

        self.run(deliver())


# Sized for the suite, run twice by CI on a 2-core machine (tens of seconds each); runs of
# 600 and 1,000 examples passed when the models were written.
HistoryMachine.TestCase.settings = settings(
    max_examples=30,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_history_and_resume = HistoryMachine.TestCase

ShufflingHistoryMachine.TestCase.settings = HistoryMachine.TestCase.settings
test_history_and_resume_on_a_bus_that_reorders_and_loses = ShufflingHistoryMachine.TestCase
