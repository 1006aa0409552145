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
from wsbus.edge import MemoryClient, memory_pair

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
        self.bus = MemoryBus([self.pump], clock=self.clock)
        config = GatewayConfig(
            node="gw",
            outbound_queue=QUEUE,
            history=HistoryConfig(groups=("g.*",), size=SIZE, age=1e9),
            resume=ResumeSettings(window=WINDOW),
        )
        self.gateway = Gateway(self.bus, config=config, entry_points=False)
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
            assert stats.sessions_closed == stats.sessions_saved
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

    async def settle(self) -> None:
        """Drain every connected client that reads; check each was owed nothing more."""
        for client in self.clients:
            if client.conn is not None and not client.stalled:
                await self.drain(client)
            if client.conn is not None and not client.stalled:
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
        expired = self.clock.now >= session.closed_at + WINDOW

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
        for group, stream in session.groups.items():
            count = len(self.sent[group])
            claim = claims.get(group)
            recoverable = claim is not None and count - SIZE <= claim <= count
            assert (group in answer["recovered"]) is recoverable, (group, claim, count, answer)
            assert (group in answer["resync"]) is not recoverable
            if claim is not None and recoverable:
                # What the client says it has: it is owed what follows.
                stream.last, stream.expect = claim, claim + 1
            else:
                stream.expect = None
                if claim is not None:
                    stream.last = min(stream.last, claim)
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


HistoryMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_history_and_resume = HistoryMachine.TestCase
