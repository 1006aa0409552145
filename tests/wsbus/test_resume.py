"""wsbus.resume: tokens and the session store (pure); the gateway's resume flow.

The flow runs a real Gateway on a MemoryBus with in-memory connections (wsbus.edge).
"""

from __future__ import annotations

import asyncio
import contextlib
import string
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import Control, assert_balanced
from wsbus import (
    Codec,
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
    ServiceAddress,
    TokenAuth,
    handles,
)
from wsbus.edge import MemoryClient, memory_pair
from wsbus.envelope import EnvelopeId
from wsbus.errors import ConfigError
from wsbus.history import Position
from wsbus.hooks import HandshakeRequest
from wsbus.resume import MemorySessions, ResumeTokens, SessionRecord, new_sid
from wsbus.resuming import RESUME_BURST, RESUME_PERIOD

SECRET = bytes(range(32))
users = st.one_of(st.none(), st.text(string.ascii_letters + "._@-", min_size=0, max_size=20))
sids = st.from_regex(r"[A-Za-z0-9_-]{22,64}", fullmatch=True)


# -- tokens ------------------------------------------------------------------------------


def test_a_token_names_its_session() -> None:
    tokens = ResumeTokens(SECRET)
    sid = new_sid()
    assert len(sid) >= 22
    token = tokens.issue(sid, "bob")
    assert token.startswith("v1.")
    assert tokens.verify(token, "bob") == sid
    assert tokens.verify(token, "eve") is None
    assert tokens.verify(token, None) is None
    assert ResumeTokens(bytes(32)).verify(token, "bob") is None  # another secret


@settings(max_examples=300)
@given(sids, sids, users, users)
def test_a_token_is_never_good_for_another_session_or_user(
    sid: str, other_sid: str, user: str | None, other_user: str | None
) -> None:
    tokens = ResumeTokens(SECRET)
    token = tokens.issue(sid, user)
    assert tokens.verify(token, user) == sid
    if other_user != user:
        assert tokens.verify(token, other_user) is None
    if other_sid != sid:
        # The MAC of one session pasted onto another's id.
        mac = token.rsplit(".", 1)[1]
        assert tokens.verify(f"v1.{other_sid}.{mac}", user) is None


@settings(max_examples=300)
@given(sids, users, st.data())
def test_any_change_to_a_token_breaks_it(sid: str, user: str | None, data: st.DataObject) -> None:
    tokens = ResumeTokens(SECRET)
    token = tokens.issue(sid, user)
    i = data.draw(st.integers(0, len(token) - 1))
    replacement = data.draw(st.characters(codec="utf-8").filter(lambda c: c != token[i]))
    forged = token[:i] + replacement + token[i + 1 :]
    assert tokens.verify(forged, user) is None
    assert tokens.verify(token[:i], user) is None
    assert tokens.verify(token + "A", user) is None


@given(st.one_of(st.text(max_size=300), st.binary(max_size=50), st.integers(), st.none()), users)
def test_verifying_client_input_never_raises(token: object, user: str | None) -> None:
    assert ResumeTokens(SECRET).verify(token, user) is None


def test_a_short_secret_is_refused() -> None:
    with pytest.raises(ConfigError):
        ResumeTokens(b"short")
    assert "secret=***" in repr(ResumeTokens(SECRET))


# -- the session store ---------------------------------------------------------------------


def record(sid: str, user: str | None = None) -> SessionRecord:
    return SessionRecord(
        sid=sid,
        user=user,
        alias=None,
        groups=("room.1",),
        conn_ids=(ConnId("n.1"),),
        closed=0.0,
        code=1006,
    )


def test_a_record_is_taken_once_and_only_in_time() -> None:
    sessions = MemorySessions()
    sessions.save(record("a"), 10.0, now=0.0)
    sessions.save(record("b"), 10.0, now=0.0)
    assert sessions.take("a", now=9.0) == record("a")
    assert sessions.take("a", now=9.0) is None
    assert sessions.take("b", now=10.0) is None  # expired
    assert sessions.take("never", now=0.0) is None


@settings(max_examples=300)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["save", "take"]),
            st.sampled_from("abcdef"),
            st.floats(0.0, 3.0),
            st.sampled_from([1.0, 5.0]),
        ),
        max_size=50,
    ),
    st.integers(1, 4),
)
def test_the_store_keeps_records_for_their_ttl_once_and_bounded(
    steps: list[tuple[str, str, float, float]], bound: int
) -> None:
    """Never a record taken twice, expired or unsaved; never more than the bound kept; and
    while the bound has not made it drop one early, every record saved is there in time."""
    sessions = MemorySessions(max_records=bound)
    model: dict[str, float] = {}  # sid -> expiry
    now = 0.0
    for op, sid, passing, ttl in steps:
        now += passing
        if op == "save":
            sessions.save(record(sid), ttl, now)
            model[sid] = now + ttl
        else:
            got = sessions.take(sid, now)
            expected = sid in model and model.pop(sid) > now
            assert got is None or (expected and got.sid == sid)
            if sessions.dropped == 0:
                assert (got is not None) == expected
        assert len(sessions) <= bound


def test_the_store_keeps_records_within_its_byte_budget() -> None:
    """Security review, finding 5: closed sessions' unacknowledged bodies are bounded in
    bytes, not only in count; the oldest go first, and one larger than it all is not kept."""
    body = "x" * 10_000

    def heavy(sid: str) -> SessionRecord:
        unacked = tuple(
            Envelope(
                id=EnvelopeId(f"{sid}{i}"),
                type="feed.item",
                sender=ServiceAddress("feed"),
                content=body,
            )
            for i in range(10)
        )
        return msgspec.structs.replace(record(sid), unacked=unacked)

    sessions = MemorySessions(max_bytes=250_000)
    for sid in "abcde":
        sessions.save(heavy(sid), 10.0, now=0.0)
        assert sessions.size <= sessions.max_bytes
    assert len(sessions) == 2 and sessions.dropped == 3
    assert sessions.take("a", now=1.0) is None
    assert sessions.take("e", now=1.0) == heavy("e")
    sessions.max_bytes = 50_000
    sessions.save(heavy("f"), 10.0, now=1.0)
    assert sessions.take("f", now=1.0) is None
    assert sessions.size == 0 and len(sessions) == 0


# -- the gateway's resume flow ----------------------------------------------------------------


class Clock:
    """A wall clock the test moves (the bus's history ages and records expire by it)."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Room(Service):
    """Joins its sender to a group, and sends to a group (excluding whom it is told)."""

    name = "room"

    @handles("room.join")
    async def join(self, message: Envelope, ctx: Context) -> None:
        assert message.sender.__class__.__name__ == "ClientAddress"
        await ctx.join(message.sender.conn_id, message.content)  # type: ignore[union-attr]
        ctx.reply("joined")

    @handles("room.kick")
    async def kick(self, message: Envelope, ctx: Context) -> None:
        content = message.content
        await ctx.disconnect(ConnId(content["conn_id"]), content.get("code", 4003), "banned")
        ctx.reply("kicked")

    @handles("room.say")
    async def say(self, message: Envelope, ctx: Context) -> None:
        content = message.content
        exclude = tuple(ConnId(c) for c in content.get("exclude", ()))
        ctx.send(Recipients(groups=(content["group"],), exclude=exclude), "room.said", content["n"])
        ctx.reply("sent")


HISTORY = HistoryConfig(groups=("room.*",), size=5, age=60.0)


class Harness:
    """A started gateway on a MemoryBus with a test clock; connects in-memory clients."""

    def __init__(self, gateway: Gateway, bus: MemoryBus, clock: Clock) -> None:
        self.gateway = gateway
        self.bus = bus
        self.clock = clock
        self.tasks: list[asyncio.Task[None]] = []

    async def connect(self, token: str | None = None, buffer: int = 1024) -> MemoryClient:
        request = HandshakeRequest(token=token) if token is not None else None
        conn, client = memory_pair(Codec.JSON, request, buffer=buffer)
        self.tasks.append(asyncio.create_task(self.gateway.serve(conn)))
        frame = await client.receive()
        assert frame["type"] == "wsbus.welcome", frame
        client.welcome = frame["content"]
        client.conn_id = frame["content"]["conn_id"]
        return client

    async def ask(self, client: MemoryClient, type: str, content: Any, id: str) -> None:
        """Send a frame to a service and wait for its reply (the bus took it by then)."""
        client.send(type, content, id=id)
        async with asyncio.timeout(5):
            while True:
                frame = await client.receive()
                if frame.get("reply_to") == id:
                    return
                backlog(client).append(frame)

    async def say(
        self, client: MemoryClient, group: str, n: int, exclude: tuple[str, ...] = ()
    ) -> None:
        await self.ask(
            client, "room.say", {"group": group, "n": n, "exclude": list(exclude)}, f"s{n}"
        )

    async def closed(self, client: MemoryClient) -> None:
        """Close a client and wait until the gateway has kept its session."""
        before = self.gateway.stats().sessions_closed
        client.close(1006)
        async with asyncio.timeout(5):
            while self.gateway.stats().sessions_closed == before:
                await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def harness(
    *,
    resume: ResumeSettings | None = None,
    bus: MemoryBus | None = None,
    plugins: tuple[object, ...] = (),
    history: HistoryConfig = HISTORY,
    **config: Any,
) -> AsyncIterator[Harness]:
    clock = Clock()
    if bus is None:
        bus = MemoryBus([Room(), Control()], clock=clock)
    else:
        bus.clock = clock
    settings = GatewayConfig(
        node="gw",
        history=history,
        resume=resume if resume is not None else ResumeSettings(window=30.0),
        **config,
    )
    gateway = Gateway(bus, config=settings, plugins=plugins, entry_points=False, clock=clock)
    await gateway.start()
    h = Harness(gateway, bus, clock)
    try:
        yield h
    finally:
        await gateway.close()
        for task in h.tasks:
            task.cancel()
        await asyncio.gather(*h.tasks, return_exceptions=True)
    assert_balanced(gateway.stats())


def backlog(client: MemoryClient) -> list[dict[str, Any]]:
    """Frames read while waiting for a reply, for the next reads."""
    kept: list[dict[str, Any]] = client.__dict__.setdefault("backlog", [])
    return kept


async def said(client: MemoryClient, count: int) -> list[dict[str, Any]]:
    """Read the next ``count`` room.said frames (skipping others)."""
    frames: list[dict[str, Any]] = []
    earlier = backlog(client)
    async with asyncio.timeout(5):
        while len(frames) < count:
            frame = earlier.pop(0) if earlier else await client.receive()
            if frame["type"] == "room.said":
                frames.append(frame)
    return frames


def resume_frame(client: MemoryClient, positions: dict[str, Any], token: Any = None) -> None:
    assert client.welcome is not None
    content = {"token": token if token is not None else client.welcome["resume"]["token"]}
    client.send("wsbus.resume", {**content, "positions": positions}, id="r1")


async def test_the_welcome_offers_a_token_and_the_window() -> None:
    async with harness() as h:
        client = await h.connect()
        assert client.welcome is not None
        offer = client.welcome["resume"]
        assert offer["window"] == 30.0 and offer["token"].startswith("v1.")
    async with harness(resume=ResumeSettings(window=0)) as h:
        client = await h.connect()
        assert client.welcome is not None and "resume" not in client.welcome


async def test_a_resumed_client_gets_its_alias_groups_and_what_it_missed_in_order() -> None:
    async with harness() as h:
        ann = await h.connect()
        await h.ask(ann, "ctl.alias", {"alias": "ann"}, "a")
        await h.ask(ann, "room.join", "room.1", "j1")
        await h.ask(ann, "room.join", "lobby", "j2")
        bob = await h.connect()
        await h.ask(bob, "room.join", "room.1", "j")
        for n in (1, 2):
            await h.say(bob, "room.1", n)
        got = await said(ann, 2)
        assert [(f["content"], f["group"]) for f in got] == [(1, "room.1"), (2, "room.1")]
        last = got[-1]["pos"]
        epoch = Position.parse(last).epoch  # type: ignore[union-attr]
        assert [f["pos"] for f in got] == [f"{epoch}:1", f"{epoch}:2"]
        await h.closed(ann)
        for n in (3, 4):
            await h.say(bob, "room.1", n)

        again = await h.connect()
        resume_frame(ann_welcome(again, ann), {"room.1": last})
        answer = await again.receive_until("wsbus.resumed")
        content = answer["content"]
        assert answer["reply_to"] == "r1"
        assert content["conn_id"] == again.conn_id
        assert (content["alias"], content["user"]) == ("ann", None)
        assert content["groups"] == ["room.1", "lobby"]
        assert (content["recovered"], content["resync"]) == (["room.1"], ["lobby"])
        assert content["redelivered"] == 0
        assert content["token"] != ann.welcome["resume"]["token"]  # type: ignore[index]
        replayed = await said(again, 2)
        assert [(f["content"], f["pos"]) for f in replayed] == [
            (3, f"{epoch}:3"),
            (4, f"{epoch}:4"),
        ]
        await h.say(bob, "room.1", 5)
        assert [f["content"] for f in await said(again, 1)] == [5]
        info = h.gateway.registry.info(ConnId(again.conn_id or ""))
        assert (info.alias, info.groups) == ("ann", ("room.1", "lobby"))
        stats = h.gateway.stats()
        assert (stats.resumes, stats.replayed, stats.resumes_refused) == (1, 2, 0)
        assert stats.sessions_closed == stats.sessions_saved == 1


def ann_welcome(new: MemoryClient, old: MemoryClient) -> MemoryClient:
    """Send the resume on ``new`` with ``old``'s token: give ``new`` that welcome."""
    assert old.welcome is not None and new.welcome is not None
    new.welcome = {**new.welcome, "resume": old.welcome["resume"]}
    return new


async def test_the_new_token_resumes_again_and_the_old_one_never() -> None:
    async with harness() as h:
        ann = await h.connect()
        await h.ask(ann, "room.join", "room.1", "j")
        await h.closed(ann)
        second = await h.connect()
        resume_frame(ann_welcome(second, ann), {})
        token = (await second.receive_until("wsbus.resumed"))["content"]["token"]
        await h.closed(second)
        third = await h.connect()
        resume_frame(third, {}, token=ann.welcome["resume"]["token"])  # type: ignore[index]
        error = await third.receive_until("wsbus.error")
        assert error["content"]["code"] == "resume_failed"
        fourth = await h.connect()
        resume_frame(fourth, {}, token=token)
        content = (await fourth.receive_until("wsbus.resumed"))["content"]
        assert content["groups"] == ["room.1"] and content["resync"] == ["room.1"]


async def _refused(h: Harness, client: MemoryClient) -> None:
    """The resume was refused, and nothing was restored."""
    error = await client.receive_until("wsbus.error")
    assert error["content"] == {
        "code": "resume_failed",
        "message": error["content"]["message"],
        "ref": "r1",
        "retry": False,
    }
    assert "start afresh" in error["content"]["message"]
    info = h.gateway.registry.info(ConnId(client.conn_id or ""))
    assert (info.alias, info.groups) == (None, ())
    # It goes on as the new session it is.
    await h.ask(client, "room.join", "room.9", "still")


async def _closed_ann(h: Harness, token: str | None = None) -> MemoryClient:
    ann = await h.connect(token)
    await h.ask(ann, "ctl.alias", {"alias": "ann"}, "a")
    await h.ask(ann, "room.join", "room.1", "j")
    await h.closed(ann)
    return ann


async def test_a_forged_token_is_refused_and_restores_nothing() -> None:
    async with harness() as h:
        ann = await _closed_ann(h)
        token: str = ann.welcome["resume"]["token"]  # type: ignore[index]
        _, sid, mac = token.split(".")
        other = ResumeTokens(bytes(32)).issue(sid, None)  # signed with another secret
        flipped = mac[:-2] + ("A" if mac[-2] != "A" else "B") + mac[-1]
        for forged in (other, f"v1.{sid}.{flipped}", f"v1.{new_sid()}.{mac}", "v1..", "", 7):
            client = await h.connect()
            resume_frame(client, {"room.1": "e:1"}, token=forged)
            if isinstance(forged, str) and forged:
                await _refused(h, client)
            else:
                error = await client.receive_until("wsbus.error")
                assert error["content"]["code"] in ("resume_failed", "invalid_message")
        # The genuine token still works: forgeries took nothing.
        client = await h.connect()
        resume_frame(ann_welcome(client, ann), {})
        assert (await client.receive_until("wsbus.resumed"))["content"]["alias"] == "ann"
        assert h.gateway.stats().resumes_refused == 5  # the last one was not a string


async def test_a_used_token_is_refused() -> None:
    async with harness() as h:
        ann = await _closed_ann(h)
        first = await h.connect()
        resume_frame(ann_welcome(first, ann), {})
        await first.receive_until("wsbus.resumed")
        second = await h.connect()
        resume_frame(ann_welcome(second, ann), {})
        await _refused(h, second)


async def test_an_expired_token_is_refused() -> None:
    async with harness() as h:
        ann = await _closed_ann(h)
        h.clock.now += 31.0  # the window is 30 s
        client = await h.connect()
        resume_frame(ann_welcome(client, ann), {})
        await _refused(h, client)


async def test_another_users_token_is_refused() -> None:
    auth = TokenAuth({"t-ann": "ann", "t-eve": "eve"})
    async with harness(plugins=(auth,)) as h:
        ann = await _closed_ann(h, token="t-ann")
        eve = await h.connect(token="t-eve")
        resume_frame(ann_welcome(eve, ann), {})
        await _refused(h, eve)
        anonymous = await h.connect()
        resume_frame(ann_welcome(anonymous, ann), {})
        await _refused(h, anonymous)
        # Ann herself still can: the refusals took nothing.
        again = await h.connect(token="t-ann")
        resume_frame(ann_welcome(again, ann), {})
        content = (await again.receive_until("wsbus.resumed"))["content"]
        assert (content["user"], content["alias"]) == ("ann", "ann")


async def test_resume_off_refuses() -> None:
    async with harness(resume=ResumeSettings(window=0)) as h:
        client = await h.connect()
        resume_frame(client, {}, token="v1.x.y")
        await _refused(h, client)


async def test_resume_is_only_the_first_frame() -> None:
    async with harness() as h:
        ann = await _closed_ann(h)
        client = await h.connect()
        await h.ask(client, "room.join", "room.2", "first")
        resume_frame(ann_welcome(client, ann), {})
        error = await client.receive_until("wsbus.error")
        assert error["content"]["code"] in ("reserved_type", "invalid_message")
        assert h.gateway.registry.info(ConnId(client.conn_id or "")).alias is None


@pytest.mark.parametrize(
    "position",
    ["older", "newer", "other-epoch", "garbage", "missing", "number"],
)
async def test_a_position_history_cannot_serve_is_resync(position: str) -> None:
    async with harness() as h:
        ann = await h.connect()
        await h.ask(ann, "room.join", "room.1", "j")
        bob = await h.connect()
        for n in range(1, 3):
            await h.say(bob, "room.1", n)
        got = await said(ann, 2)
        epoch = Position.parse(got[0]["pos"]).epoch  # type: ignore[union-attr]
        await h.closed(ann)
        for n in range(3, 9):  # history keeps 5: 1..3 are trimmed
            await h.say(bob, "room.1", n)
        options: dict[str, dict[str, Any]] = {
            "older": {"room.1": f"{epoch}:1"},
            "newer": {"room.1": f"{epoch}:99"},
            "other-epoch": {"room.1": "x" + epoch[1:] + ":2"},
            "garbage": {"room.1": "no:pos:here"},
            "missing": {},
            "number": {"room.1": 2},
        }
        chosen = options[position]
        client = await h.connect()
        resume_frame(ann_welcome(client, ann), chosen)
        content = (await client.receive_until("wsbus.resumed"))["content"]
        assert (content["recovered"], content["resync"]) == ([], ["room.1"])
        # Nothing is replayed; live messages go on.
        await h.say(bob, "room.1", 9)
        assert [f["content"] for f in await said(client, 1)] == [9]


async def test_more_missed_than_max_replay_is_resync() -> None:
    async with harness(resume=ResumeSettings(window=30.0, max_replay=2)) as h:
        ann = await h.connect()
        await h.ask(ann, "room.join", "room.1", "j")
        bob = await h.connect()
        await h.say(bob, "room.1", 1)
        last = (await said(ann, 1))[0]["pos"]
        await h.closed(ann)
        for n in (2, 3, 4):
            await h.say(bob, "room.1", n)
        client = await h.connect()
        resume_frame(ann_welcome(client, ann), {"room.1": last})
        content = (await client.receive_until("wsbus.resumed"))["content"]
        assert content["resync"] == ["room.1"]


async def test_replay_honours_exclude_against_every_connection_of_the_session() -> None:
    async with harness() as h:
        ann = await h.connect()
        await h.ask(ann, "room.join", "room.1", "j")
        await h.say(ann, "room.1", 1)
        last = (await said(ann, 1))[0]["pos"]
        await h.closed(ann)
        bob = await h.connect()
        await h.say(bob, "room.1", 2, exclude=(ann.conn_id or "",))  # "not to ann"
        await h.say(bob, "room.1", 3)
        client = await h.connect()
        resume_frame(ann_welcome(client, ann), {"room.1": last})
        content = (await client.receive_until("wsbus.resumed"))["content"]
        assert content["recovered"] == ["room.1"]
        assert [f["content"] for f in await said(client, 1)] == [3]
        # Resumed again: the first connection's exclusions still hold.
        token = content["token"]
        await h.closed(client)
        third = await h.connect()
        resume_frame(third, {"room.1": last}, token=token)
        await third.receive_until("wsbus.resumed")
        assert [f["content"] for f in await said(third, 1)] == [3]


async def test_a_client_closed_4507_resumes_with_what_it_missed() -> None:
    history = HistoryConfig(groups=("room.*",), size=100)
    async with harness(outbound_queue=4, history=history) as h:
        ann = await h.connect(buffer=2)
        await h.ask(ann, "room.join", "room.1", "j")
        bob = await h.connect()
        await h.say(bob, "room.1", 1)
        last = (await said(ann, 1))[0]["pos"]
        # Ann stops reading: her queue fills and she is closed 4507.
        for n in range(2, 21):
            await h.say(bob, "room.1", n)
        async with asyncio.timeout(5):
            while h.gateway.stats().sessions_closed == 0:
                await asyncio.sleep(0.005)
        assert h.gateway.stats().closes_by_code == {4507: 1}
        client = await h.connect()
        resume_frame(ann_welcome(client, ann), {"room.1": last})
        content = (await client.receive_until("wsbus.resumed"))["content"]
        assert content["recovered"] == ["room.1"]
        assert [f["content"] for f in await said(client, 19)] == list(range(2, 21))
        stats = h.gateway.stats()
        assert stats.replayed == 19 and stats.dropped_by_close_code[4507] >= 1


class SlowHistory(MemoryBus):
    """A MemoryBus whose history reads wait for the test: live messages come meanwhile."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reading = asyncio.Event()
        self.go = asyncio.Event()

    async def history(self, group: str, after: Position, limit: int) -> list[Envelope] | None:
        self.reading.set()
        await self.go.wait()
        return await super().history(group, after, limit)


async def test_live_messages_during_a_resume_wait_for_the_replay_once_each() -> None:
    bus = SlowHistory([Room(), Control()])
    async with harness(bus=bus) as h:
        ann = await h.connect()
        await h.ask(ann, "room.join", "room.1", "j")
        bob = await h.connect()
        await h.say(bob, "room.1", 1)
        last = (await said(ann, 1))[0]["pos"]
        await h.closed(ann)
        await h.say(bob, "room.1", 2)
        client = await h.connect()
        resume_frame(ann_welcome(client, ann), {"room.1": last})
        async with asyncio.timeout(5):
            await bus.reading.wait()
        # Joined, its history being read: these are held back, then given after the replay.
        await h.say(bob, "room.1", 3)
        await h.say(bob, "room.1", 4, exclude=(ann.conn_id or "",))
        assert client.pending() == 0
        bus.go.set()
        content = (await client.receive_until("wsbus.resumed"))["content"]
        assert content["recovered"] == ["room.1"]
        await h.say(bob, "room.1", 5)
        assert [f["content"] for f in await said(client, 3)] == [2, 3, 5]
        await asyncio.sleep(0.05)
        assert client.pending() == 0


async def test_a_position_beyond_what_was_delivered_mutes_nothing_held_during_the_resume() -> None:
    """A client's position newer than anything the gateway delivered (bogus, or from a
    store that lost its entries in the same epoch) is resync, and what is said while the
    resume reads history still reaches it: it is not taken for something the client has."""
    bus = SlowHistory([Room(), Control()])
    async with harness(bus=bus) as h:
        ann = await h.connect()
        await h.ask(ann, "room.join", "room.1", "j")
        bob = await h.connect()
        await h.say(bob, "room.1", 1)
        epoch = Position.parse((await said(ann, 1))[0]["pos"]).epoch  # type: ignore[union-attr]
        await h.closed(ann)
        client = await h.connect()
        resume_frame(ann_welcome(client, ann), {"room.1": f"{epoch}:99"})
        async with asyncio.timeout(5):
            await bus.reading.wait()
        await h.say(bob, "room.1", 2)  # held back from the client, offset 2 <= 99
        bus.go.set()
        content = (await client.receive_until("wsbus.resumed"))["content"]
        assert content["resync"] == ["room.1"]
        await h.say(bob, "room.1", 3)
        assert [f["content"] for f in await said(client, 2)] == [2, 3]


@pytest.mark.parametrize("code", [1000, 4000, 4003])
async def test_a_client_a_service_disconnected_cannot_resume(code: int) -> None:
    """Security review, finding 3: a kicked client does not come back with its groups and
    read what was said after the kick, whatever code the service closed it with."""
    async with harness() as h:
        ann = await h.connect()
        await h.ask(ann, "room.join", "room.1", "j")
        mod = await h.connect()
        await h.ask(mod, "room.kick", {"conn_id": ann.conn_id, "code": code}, "k")
        async with asyncio.timeout(5):
            while h.gateway.stats().sessions_closed == 0:
                await asyncio.sleep(0.005)
        await h.say(mod, "room.1", 1)
        client = await h.connect()
        resume_frame(ann_welcome(client, ann), {})
        error = await client.receive_until("wsbus.error")
        assert error["content"]["code"] == "resume_failed"
        assert h.gateway.registry.info(ConnId(client.conn_id or "")).groups == ()
        stats = h.gateway.stats()
        assert (stats.sessions_ended, stats.sessions_saved) == (1, 0)


@pytest.mark.parametrize("code", [1008, 4400, 4401, 4403, 4408, 4429])
async def test_a_policy_close_is_not_resumable(code: int) -> None:
    async with harness() as h:
        ann = await h.connect()
        await h.ask(ann, "room.join", "room.1", "j")
        session = h.gateway._sessions[ConnId(ann.conn_id or "")]
        session.close(code, "policy")
        async with asyncio.timeout(5):
            while h.gateway.stats().sessions_closed == 0:
                await asyncio.sleep(0.005)
        client = await h.connect()
        resume_frame(ann_welcome(client, ann), {})
        error = await client.receive_until("wsbus.error")
        assert error["content"]["code"] == "resume_failed"
        assert h.gateway.stats().sessions_ended == 1


async def test_a_session_with_nothing_to_restore_keeps_no_record() -> None:
    """Security review, finding 4: connections that joined nothing take no place in the
    store, so a flood of them pushes out no session worth resuming."""
    async with harness() as h:
        h.bus.sessions.max_records = 1
        ann = await _closed_ann(h)
        for _ in range(5):
            await h.closed(await h.connect())
        stats = h.gateway.stats()
        assert (stats.sessions_saved, stats.sessions_ended) == (1, 5)
        assert len(h.bus.sessions) == 1
        client = await h.connect()
        resume_frame(ann_welcome(client, ann), {})
        assert (await client.receive_until("wsbus.resumed"))["content"]["alias"] == "ann"


class SlowSave(MemoryBus):
    """A MemoryBus whose session saves wait for the test (a store across the network)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.saving = asyncio.Event()
        self.go = asyncio.Event()

    async def save_session(self, record: SessionRecord, ttl: float) -> None:
        self.saving.set()
        await self.go.wait()
        await super().save_session(record, ttl)


async def test_a_resume_waits_for_its_record_being_saved() -> None:
    """The clients' race: the new connection's resume came while the old connection's
    record was still being saved, and was refused; now it waits for the save."""
    bus = SlowSave([Room(), Control()])
    async with harness(bus=bus) as h:
        ann = await h.connect()
        await h.ask(ann, "room.join", "room.1", "j")
        ann.close(1006)
        async with asyncio.timeout(5):
            await bus.saving.wait()
        client = await h.connect()
        resume_frame(ann_welcome(client, ann), {})
        await asyncio.sleep(0.05)
        assert client.pending() == 0  # waiting for the save, not refused
        bus.go.set()
        content = (await client.receive_until("wsbus.resumed"))["content"]
        assert content["groups"] == ["room.1"]


async def test_a_resume_takes_over_a_half_open_connection() -> None:
    """The client lost its connection, the gateway has not noticed: the resume closes the
    old one (4409) and the session goes on on the new one."""
    async with harness() as h:
        ann = await h.connect()
        await h.ask(ann, "room.join", "room.1", "j")
        client = await h.connect()
        resume_frame(ann_welcome(client, ann), {})
        content = (await client.receive_until("wsbus.resumed"))["content"]
        assert content["groups"] == ["room.1"]
        assert await ann.wait_closed() == 4409
        bob = await h.connect()
        await h.say(bob, "room.1", 1)
        assert [f["content"] for f in await said(client, 1)] == [1]


@pytest.mark.parametrize("before", [0, 2])
async def test_a_group_the_client_has_no_position_for_is_replayed_from_its_join(
    before: int,
) -> None:
    """It joined, nothing came before it dropped: it names no position for the group, and
    gets what was said after its join (and nothing from before it), not a resync."""
    async with harness() as h:
        bob = await h.connect()
        for n in range(1, before + 1):
            await h.say(bob, "room.1", n)
        ann = await h.connect()
        await h.ask(ann, "room.join", "room.1", "j")
        await h.closed(ann)
        for n in (10, 11):
            await h.say(bob, "room.1", n)
        client = await h.connect()
        resume_frame(ann_welcome(client, ann), {})
        content = (await client.receive_until("wsbus.resumed"))["content"]
        assert (content["recovered"], content["resync"]) == (["room.1"], [])
        await h.say(bob, "room.1", 12)
        assert [f["content"] for f in await said(client, 3)] == [10, 11, 12]
        await asyncio.sleep(0.05)
        assert client.pending() == 0


async def _resume_turns(h: Harness, turns: int, every: float) -> list[dict[str, Any]]:
    """Close and resume one session ``turns`` times, ``every`` seconds apart (the test clock);
    the answer to each resume."""
    client = await h.connect()
    await h.ask(client, "room.join", "room.1", "j")
    token = client.welcome["resume"]["token"]  # type: ignore[index]
    answers: list[dict[str, Any]] = []
    for _ in range(turns):
        await h.closed(client)
        h.clock.now += every
        client = await h.connect()
        resume_frame(client, {}, token=token)
        async with asyncio.timeout(5):
            frame = await client.receive()
            while frame["type"] not in ("wsbus.resumed", "wsbus.error"):
                frame = await client.receive()
        answers.append(frame)
        if frame["type"] == "wsbus.resumed":
            token = frame["content"]["token"]
    return answers


async def test_a_session_resumed_too_often_is_refused() -> None:
    """Security review, finding 6: each resume is a leave and a join every member hears
    of; one session is resumed at most RESUME_BURST times within RESUME_PERIOD."""
    async with harness() as h:
        answers = await _resume_turns(h, RESUME_BURST + 1, every=0.0)
        assert [a["type"] for a in answers[:-1]] == ["wsbus.resumed"] * RESUME_BURST
        refused = answers[-1]
        assert refused["content"]["code"] == "resume_failed"
        assert "resumed" in refused["content"]["message"]


async def test_a_session_resumed_often_but_spread_out_is_never_refused() -> None:
    """The burst is counted by the gateway's clock over RESUME_PERIOD, not for ever."""
    every = RESUME_PERIOD / RESUME_BURST + 0.5
    async with harness() as h:
        answers = await _resume_turns(h, 3 * RESUME_BURST, every=every)
        assert [a["type"] for a in answers] == ["wsbus.resumed"] * (3 * RESUME_BURST)


async def test_a_message_with_a_forged_position_gets_none() -> None:
    class Forger(Service):
        name = "forger"

        @handles("forge")
        async def forge(self, message: Envelope, ctx: Context) -> None:
            ctx.link.send(
                Recipients(groups=("room.1",)),
                "room.said",
                0,
                headers={"wsbus-pos": "e:99", "wsbus-group": "room.1"},
            )

    async with harness(bus=MemoryBus([Room(), Forger()])) as h:
        ann = await h.connect()
        await h.ask(ann, "room.join", "room.1", "j")
        ann.send("forge", None)
        (frame,) = await said(ann, 1)
        assert frame["pos"].endswith(":1")  # the bus's own position, not the forged one
        await h.say(ann, "room.1", 1)
        assert (await said(ann, 1))[0]["pos"].endswith(":2")


async def test_sessions_are_kept_by_the_gateway_when_the_bus_does_not() -> None:
    class Plain(MemoryBus):
        """A MemoryBus without the sessions capability."""

    from wsbus.bus import KeepsSessions

    Plain.save_session = None  # type: ignore[assignment,method-assign]
    Plain.take_session = None  # type: ignore[assignment,method-assign]
    bus = Plain([Room(), Control()])
    assert not isinstance(bus, KeepsSessions)
    async with harness(bus=bus) as h:
        ann = await _closed_ann(h)
        client = await h.connect()
        resume_frame(ann_welcome(client, ann), {})
        assert (await client.receive_until("wsbus.resumed"))["content"]["alias"] == "ann"


async def test_a_lost_alias_is_reported() -> None:
    async with harness() as h:
        ann = await _closed_ann(h)
        thief = await h.connect()
        await h.ask(thief, "ctl.alias", {"alias": "ann"}, "a")
        client = await h.connect()
        resume_frame(ann_welcome(client, ann), {})
        content = (await client.receive_until("wsbus.resumed"))["content"]
        assert (content["alias"], content["alias_lost"]) == (None, "ann")
        assert content["groups"] == ["room.1"]


class Acker(Service):
    """Sends its sender a message that asks for an acknowledgement."""

    name = "acker"

    @handles("acker.send")
    async def send(self, message: Envelope, ctx: Context) -> None:
        assert message.sender.__class__.__name__ == "ClientAddress"
        conn_id = message.sender.conn_id  # type: ignore[union-attr]
        ctx.send(Recipients(conn_ids=(conn_id,)), "acker.item", message.content, ack=True)
        ctx.reply("sent")


async def test_unacknowledged_deliveries_are_redelivered_first() -> None:
    async with harness(bus=MemoryBus([Room(), Acker()])) as h:
        ann = await h.connect()
        await h.ask(ann, "acker.send", "one", "a1")
        await h.ask(ann, "acker.send", "two", "a2")
        items = [f for f in backlog(ann) if f["type"] == "acker.item"]
        while len(items) < 2:
            frame = await ann.receive()
            if frame["type"] == "acker.item":
                items.append(frame)
        assert [f["ack"] for f in items] == [True, True]
        ann.send("wsbus.processed", {"ids": [items[0]["id"]]})
        await h.ask(ann, "room.join", "room.1", "j")  # the ack was taken by then
        await h.closed(ann)
        client = await h.connect()
        resume_frame(ann_welcome(client, ann), {})
        content = (await client.receive_until("wsbus.resumed"))["content"]
        assert content["redelivered"] == 1
        again = await client.receive()
        assert (again["type"], again["id"], again["content"], again["ack"]) == (
            "acker.item",
            items[1]["id"],
            "two",
            True,
        )
        client.send("wsbus.processed", {"ids": [again["id"]]})
        await h.ask(client, "room.join", "room.2", "j2")
        stats = h.gateway.stats()
        assert stats.redelivered == 1 and stats.acks == 2


def _stamped(bus: MemoryBus, n: int, group: str = "room.1") -> Envelope:
    store = bus.history_store
    assert store is not None
    envelope = Envelope(
        id=EnvelopeId(f"m{n}"),
        type="room.said",
        sender=ServiceAddress("room"),
        content=n,
        recipients=Recipients(groups=(group,)),
    )
    return store.append(group, envelope, bus.clock())


async def test_a_bus_that_reorders_is_put_in_order_and_holes_are_fetched() -> None:
    """As a bus between processes may: later ones first, one never delivered at all."""
    async with harness() as h:
        ann = await h.connect()
        await h.ask(ann, "room.join", "room.1", "j")
        m1, _m2, m3, m4 = (_stamped(h.bus, n) for n in range(1, 5))
        for envelope in (m1, m3, m4):  # m2 never comes from the bus: it is fetched
            h.gateway.deliver(envelope)
        assert [f["content"] for f in await said(ann, 4)] == [1, 2, 3, 4]
        h.gateway.deliver(m3)  # again
        assert h.gateway.stats().history_duplicates == 1


async def test_a_hole_history_cannot_fill_is_a_gap_for_the_group() -> None:
    async with harness() as h:
        ann = await h.connect()
        await h.ask(ann, "room.join", "room.1", "j")
        bob = await h.connect()
        await h.ask(bob, "room.join", "lobby", "j")
        stamped = [_stamped(h.bus, n) for n in range(1, 9)]  # history keeps 5: 1..3 trimmed
        h.gateway.deliver(stamped[0])
        h.gateway.deliver(stamped[-1])
        frames: list[dict[str, Any]] = []
        async with asyncio.timeout(5):
            while len(frames) < 3:
                frame = await ann.receive()
                if frame["type"] in ("room.said", "wsbus.gap"):
                    frames.append(frame)
        assert frames[0]["content"] == 1
        assert frames[1]["type"] == "wsbus.gap"
        assert frames[1]["content"]["groups"] == ["room.1"]
        assert frames[1]["content"]["reason"] == "history"
        assert frames[2]["content"] == 8
        assert h.gateway.stats().history_gaps == 1
        assert bob.pending() == 0  # not in the group: told nothing


async def test_a_resume_cancelled_while_the_store_answers_counts_its_frame_lost() -> None:
    # The reader is cancelled while wsbus.resume waits for the session store (a remote
    # store slow to answer): the resume frame, counted received, is counted lost too, and
    # the frames read with it are counted by the reader.
    class SlowStore(MemoryBus):
        def __init__(self, services: list[Service]) -> None:
            super().__init__(services)
            self.block = asyncio.Event()
            self.entered = asyncio.Event()

        async def take_session(self, sid: str) -> SessionRecord | None:
            self.entered.set()
            await self.block.wait()
            return await super().take_session(sid)

    class Echoing(Service):
        name = "echoing"

        @handles("echo")
        async def echo(self, message: Envelope, ctx: Context) -> None:
            ctx.reply(message.content)

    bus = SlowStore([Echoing()])
    config = GatewayConfig(node="t", resume=ResumeSettings(window=30.0))
    gateway = Gateway(bus, config=config, entry_points=False)
    await gateway.start()
    try:
        conn, client = memory_pair()
        task = asyncio.create_task(gateway.serve(conn))
        welcome = await client.receive()
        token = welcome["content"]["resume"]["token"]
        client.send("wsbus.resume", {"token": token, "positions": {}}, id="r1")
        for i in range(5):
            client.send("echo", i, id=f"e{i}")
        async with asyncio.timeout(10):
            await bus.entered.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        stats = gateway.stats()
        assert stats.frames_received == 6
        assert stats.frames_lost == 6
        assert_balanced(stats)
    finally:
        bus.block.set()
        await gateway.close()
