"""The gateway's history and resume driver: positions in order, session records, resumes.

:class:`Resumer` is a part of the :class:`~wsbus.Gateway` (as :class:`~wsbus.aliases.
AliasClaims` is): the gateway hands it each history message from the bus, each welcome,
each close and each ``wsbus.resume`` frame; it decides with the pure parts
(:class:`~wsbus.history.GroupOrder`, :class:`~wsbus.resume.Holds`,
:class:`~wsbus.resume.ResumeTokens`) and does the awaiting: reading history and session
records from the bus. See ``docs/history.md`` for what a client gets.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

import msgspec

from .bus import Bus, KeepsHistory, KeepsSessions
from .envelope import ConnId, Envelope
from .errors import AliasTaken, BusUnavailable, InvalidName, UnknownConnection
from .history import GroupGap, GroupOrder, Position, position_of
from .hooks import _FailureLog
from .outbound import Outbound
from .registry import ClientInfo, ClientRegistry
from .resume import Holds, MemorySessions, ResumeTokens, SessionRecord, new_sid
from .session import CloseCode, Session
from .stats import Counters
from .wire import (
    ClientFrame,
    Codec,
    ErrorCode,
    ServerFrame,
    decode_client_frame,
    encode_server_frame,
)

if TYPE_CHECKING:
    from .gateway import GatewayConfig

__all__ = ["HISTORY_GAP_MESSAGE", "MAX_CONN_IDS", "NOT_RESUMABLE", "RESUME", "RESUMED", "Resumer"]

log = logging.getLogger("wsbus.gateway")

RESUME: Final = "wsbus.resume"
"""The client's frame that resumes a closed session (the first after the welcome)."""

RESUMED: Final = "wsbus.resumed"
"""The gateway's answer to a resume that succeeded."""

MAX_CONN_IDS: Final = 32
"""Connection ids a session record remembers (the newest): what ``exclude`` is held
against when messages are replayed to it."""

HISTORY_GAP_MESSAGE: Final = (
    "messages of these groups could not be delivered in order and are missing: resync them"
)
"""What a ``wsbus.gap`` with ``groups`` tells the client."""

FETCH_TIMEOUT: Final = 10.0
"""Seconds a read of missing messages from the bus's history may take."""

SAVE_TIMEOUT: Final = 10.0
"""Seconds saving a closed session's record on the bus may take."""

SETTLE_TIMEOUT: Final = 5.0
"""Seconds a resume waits for its session's earlier connection on this gateway to close
and its record to be saved (the client's close, or a half-open one, not processed yet)."""

TAKE_RETRY: Final = 1.0
"""Seconds a resume tries again to take a record not found in a shared store: the
session's earlier connection may be closing, its record being saved, on another gateway."""

TAKE_RETRY_EVERY: Final = 0.1
"""Seconds between two of those tries."""

LOG_INTERVAL: Final = 60.0
"""Seconds between two warnings of one kind (a store out of reach)."""

NOT_RESUMABLE: Final = frozenset(
    {
        CloseCode.POLICY,
        CloseCode.ERROR_BUDGET,
        CloseCode.AUTH_FAILED,
        CloseCode.FORBIDDEN,
        CloseCode.AUTH_TIMEOUT,
        CloseCode.RATE_LIMITED,
    }
)
"""Close codes that end a session for good: the gateway closed the connection for what
its client did (a policy close), so no record is kept. A session a service closed
(``wsbus.disconnect``, whatever its code) is not resumable either."""

RESUME_BURST: Final = 10
"""Resumes one session may have within :data:`RESUME_PERIOD`; the next is refused."""

RESUME_PERIOD: Final = 60.0
"""Seconds over which :data:`RESUME_BURST` is counted. Each resume is a leave and a join
every member of the session's groups hears of: a client dropping and resuming in a loop
would make them all hear two frames per turn."""

FROM_FIRST: Final = "*"
"""A session record's position for a history group its gateway had seen nothing of from
the join to the close: the client missed the group from its first message."""

_RESUME_ONLY: Final = frozenset({RESUME})


class Resumer:
    """Keeps history groups in order, sessions resumable, and resumes them.

    Args:
        config: the gateway's settings (``history`` and ``resume``).
        registry: the connections' names and groups.
        sessions: the open sessions by connection id (the gateway's own dict).
        outbound: what queues deliveries to sessions (and the presence of joins).
        counters: the gateway's counters.
        route: routes one envelope to its connections (the gateway's usual path).
        post: sends what Outbound left for the bus.
        next_id: makes ids for the gateway's own frames.
    """

    def __init__(
        self,
        config: GatewayConfig,
        registry: ClientRegistry,
        sessions: dict[ConnId, Session],
        outbound: Outbound,
        counters: Counters,
        route: Callable[[Envelope], None],
        post: Callable[[], None],
        next_id: Callable[[], str],
        clock: Callable[[], float],
    ) -> None:
        self._config = config
        self._clock = clock
        self._next_id = next_id
        self._registry = registry
        self._sessions = sessions
        self._outbound = outbound
        self._counters = counters
        self._route = route
        self._post = post
        settings = config.resume
        self._tokens: ResumeTokens | None = None
        if settings.enabled:
            # No secret configured: one of this process's own, so tokens are good here only.
            secret = bytes.fromhex(settings.secret) if settings.secret else os.urandom(32)
            self._tokens = ResumeTokens(secret)
        self._history: KeepsHistory | None = None
        self._store: KeepsSessions | None = None
        self._own_store = MemorySessions()
        self._order = GroupOrder()
        self._timer: asyncio.TimerHandle | None = None
        self._holds = Holds(config.outbound_queue)
        # Each welcomed connection's session id, and every connection id its session had.
        self._sids: dict[ConnId, tuple[str, tuple[ConnId, ...]]] = {}
        # The other way: each open session's connection here, and the sessions whose
        # record is being saved; a resume of one of them waits for it to settle.
        self._open: dict[str, ConnId] = {}
        self._saving: set[str] = set()
        self._settled: dict[str, asyncio.Event] = {}
        # Per connection and history group: where the group's history stood when the
        # connection joined it (None: this gateway had seen nothing of it yet).
        self._joins: dict[ConnId, dict[str, Position | None]] = {}
        # Each resumed connection's session's latest resumes (wall times).
        self._resumed: dict[ConnId, tuple[float, ...]] = {}
        outbound.joined = self._joined
        self._tasks: set[asyncio.Task[None]] = set()
        self._log = _FailureLog(LOG_INTERVAL)
        self.successors: dict[ConnId, ConnId] = {}
        """For each earlier connection of a resumed session that is open now, its current
        connection: an ``exclude`` naming the earlier one leaves the current one out."""

    @property
    def enabled(self) -> bool:
        """True when clients can resume here."""
        return self._tokens is not None

    def attach(self, bus: Bus) -> None:
        """Look at what the bus keeps, once, before it starts; ask it to keep history."""
        if isinstance(bus, KeepsSessions):
            self._store = bus
        history = self._config.history
        if not history.groups:
            return
        if isinstance(bus, KeepsHistory):
            bus.keep_history(history)
            self._history = bus
        else:
            log.warning(
                "history is configured for groups %s, but the bus (%s) keeps no history: "
                "messages carry no positions and resumes replay nothing (every group "
                "is resync)",
                ", ".join(history.groups),
                type(bus).__name__,
            )

    async def close(self) -> None:
        """Stop fetching; give the records being saved a moment to be saved."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        tasks = list(self._tasks)
        if tasks:
            await asyncio.wait(tasks, timeout=SAVE_TIMEOUT)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- welcome and close ---------------------------------------------------------------

    def offer(self, conn_id: ConnId, user: str | None) -> dict[str, Any] | None:
        """Return the welcome's ``resume`` (a token and the window); None when resume is off."""
        tokens = self._tokens
        if tokens is None:
            return None
        sid = new_sid()
        self._sids[conn_id] = (sid, (conn_id,))
        self._open[sid] = conn_id
        return {"token": tokens.issue(sid, user), "window": self._config.resume.window}

    def _joined(self, conn_id: ConnId, group: str) -> None:
        """A connection joined ``group``: note where its history stands here."""
        if self._tokens is None or self._history is None or not self._config.history.keeps(group):
            return
        expected = self._order.next_offset(group)
        at = None if expected is None else Position(expected.epoch, expected.offset - 1)
        self._joins.setdefault(conn_id, {})[group] = at

    def _join_positions(self, conn_id: ConnId, groups: tuple[str, ...]) -> dict[str, str]:
        """Where each history group of a closing connection stood when it joined."""
        joins = self._joins.pop(conn_id, None)
        if not joins:
            return {}
        positions: dict[str, str] = {}
        for group in groups:
            if group not in joins:
                continue
            at = joins[group]
            if at is None:
                # Nothing seen here at the join: the connection had all from the first.
                first = self._order.first_offset(group)
                if first is None:
                    positions[group] = FROM_FIRST  # nor since: all of it came after
                    continue
                at = Position(first.epoch, first.offset - 1)
            positions[group] = at.encode()
        return positions

    def closed(self, session: Session, info: ClientInfo, code: int) -> None:
        """A welcomed connection ended (out of the registry now): keep its session record."""
        conn_id = info.conn_id
        self._holds.forget(conn_id)
        joined = self._join_positions(conn_id, info.groups)
        resumed = self._resumed.pop(conn_id, ())
        kept = self._sids.pop(conn_id, None)
        if kept is None or self._tokens is None:
            return
        sid, conn_ids = kept
        if self._open.get(sid) == conn_id:
            del self._open[sid]
        for earlier in conn_ids[:-1]:
            self.successors.pop(earlier, None)
        try:
            self._keep(session, info, code, sid, conn_ids, joined, resumed)
        finally:
            self._settle(sid)

    def _keep(
        self,
        session: Session,
        info: ClientInfo,
        code: int,
        sid: str,
        conn_ids: tuple[ConnId, ...],
        joined: dict[str, str],
        resumed: tuple[float, ...],
    ) -> None:
        counters = self._counters
        counters.sessions_closed += 1
        unacked = session.unacked()
        if (
            session.kicked
            or code in NOT_RESUMABLE
            # Nothing to restore: a record would only take a place in the store (a flood
            # of empty connections would push out every session worth resuming).
            or not (info.groups or info.alias is not None or unacked)
        ):
            counters.sessions_ended += 1
            return
        wall = self._clock()
        record = SessionRecord(
            sid=sid,
            user=info.user,
            alias=info.alias,
            groups=info.groups,
            conn_ids=conn_ids,
            closed=wall,
            code=code,
            unacked=unacked,
            positions=joined,
            resumed=resumed,
        )
        window = self._config.resume.window
        store = self._store
        if store is None:
            self._own_store.save(record, window, wall)
            counters.sessions_saved += 1
            return
        counters.sessions_saving += 1
        self._saving.add(sid)
        self._spawn(self._save(store, record, window), f"wsbus-save-{info.conn_id}")

    def _settle(self, sid: str) -> None:
        """Wake a resume waiting for ``sid`` once it is neither open here nor being saved."""
        if sid in self._open or sid in self._saving:
            return
        event = self._settled.pop(sid, None)
        if event is not None:
            event.set()

    async def _save(self, store: KeepsSessions, record: SessionRecord, window: float) -> None:
        counters = self._counters
        try:
            async with asyncio.timeout(SAVE_TIMEOUT):
                await store.save_session(record, window)
        except Exception as exc:
            counters.sessions_lost += 1
            count = self._log.admit("save", time.monotonic())
            if count is not None:
                log.warning(
                    "could not keep a closed session for resuming (%s); its client will "
                    "start afresh (%d lost since the last warning; Stats.sessions_lost "
                    "counts them all)",
                    exc or type(exc).__name__,
                    max(count, 1),
                )
        else:
            counters.sessions_saved += 1
        finally:
            counters.sessions_saving -= 1
            self._saving.discard(record.sid)
            self._settle(record.sid)

    def _spawn(self, coroutine: Awaitable[None], name: str) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coroutine)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the resume ----------------------------------------------------------------------

    @staticmethod
    def resume_frame(data: str | bytes, codec: Codec, config: GatewayConfig) -> ClientFrame | None:
        """Return the frame if ``data`` is a valid ``wsbus.resume`` frame; else None.

        Only a connection's first frame is looked at; anything else (a frame of the
        wrong kind included) goes the usual way, and is answered there.
        """
        if isinstance(data, str) is not codec.is_text:
            return None
        marker: str | bytes = RESUME if isinstance(data, str) else RESUME.encode()
        if marker not in data:  # type: ignore[operator]
            return None
        frame = decode_client_frame(data, codec, config.wire, allowed_control=_RESUME_ONLY)
        if isinstance(frame, ClientFrame) and frame.type == RESUME:
            return frame
        return None

    async def resume(
        self,
        session: Session,
        frame: ClientFrame,
        set_alias: Callable[[ConnId, str], Awaitable[None]],
    ) -> None:
        """Carry out a ``wsbus.resume`` frame (the connection's first after the welcome).

        Either the session is restored (``wsbus.resumed``, then the redelivered, then the
        replayed messages, then live ones) or it is refused with ``resume_failed`` and
        nothing is restored: the connection goes on as the new session it is.
        """
        counters = self._counters
        counters.frames_received += 1
        loop = asyncio.get_running_loop()
        if session.close_code is not None:
            counters.frames_lost += 1
            return
        if session.shutting_down:
            message = "the server is shutting down"
            session.reject(ErrorCode.SHUTTING_DOWN, message, frame.id, loop.time())
            return
        content = frame.content
        positions = content.get("positions", {}) if isinstance(content, dict) else None
        if (
            not isinstance(content, dict)
            or not isinstance(content.get("token"), str)
            or not isinstance(positions, dict)
        ):
            message = (
                'wsbus.resume needs content {"token": "<resume token>", '
                '"positions": {"<group>": "<pos>", ...}}'
            )
            session.reject(ErrorCode.INVALID_MESSAGE, message, frame.id, loop.time())
            return
        conn_id = session.conn_id
        try:
            record, why = await self._take(conn_id, content["token"])
        except BaseException:
            # Cancelled (or failed) while the store answered: the frame goes down with
            # the connection, counted.
            counters.frames_lost += 1
            raise
        if record is not None:
            wall = self._clock()
            recent = tuple(t for t in record.resumed if wall - RESUME_PERIOD < t <= wall)
            if len(recent) >= RESUME_BURST:
                record = None
                why = (
                    f"this session was resumed {len(recent)} times within "
                    f"{RESUME_PERIOD:g} seconds: start afresh"
                )
            else:
                self._resumed[conn_id] = (*recent, wall)
        if record is None or conn_id not in self._registry:
            self._resumed.pop(conn_id, None)
            counters.resumes_refused += 1
            session.reject(ErrorCode.RESUME_FAILED, why, frame.id, loop.time())
            return
        counters.frames_control += 1
        counters.resumes += 1
        await self._restore(session, record, positions, frame.id, set_alias)

    async def _take(self, conn_id: ConnId, token: str) -> tuple[SessionRecord | None, str]:
        """Return the session record a token names, taken from the store, or why not."""
        tokens = self._tokens
        if tokens is None:
            return None, "resume is off on this server: start afresh"
        user = self._registry.address(conn_id).user
        sid = tokens.verify(token, user)
        if sid is None:
            return None, "the resume token is not valid for this client: start afresh"
        await self._await_settled(sid, conn_id)
        try:
            if self._store is not None:
                async with asyncio.timeout(SAVE_TIMEOUT + TAKE_RETRY):
                    record = await self._store.take_session(sid)
                    loop = asyncio.get_running_loop()
                    until = loop.time() + TAKE_RETRY
                    while record is None and loop.time() < until:
                        # Maybe being saved by another gateway that has not done so yet.
                        await asyncio.sleep(TAKE_RETRY_EVERY)
                        record = await self._store.take_session(sid)
            else:
                record = self._own_store.take(sid, self._clock())
        except Exception as exc:
            count = self._log.admit("take", time.monotonic())
            if count is not None:
                log.warning("could not read a session to resume (%s)", exc or type(exc).__name__)
            return None, "the sessions cannot be read now: start afresh"
        if record is None:
            return None, "the session expired or was resumed already: start afresh"
        if record.sid != sid or record.user != user:
            return None, "the resume token is not valid for this client: start afresh"
        return record, ""

    async def _await_settled(self, sid: str, conn_id: ConnId) -> None:
        """Wait (bounded) until session ``sid`` is neither open here nor being saved here.

        The client's close of its earlier connection may not have been processed yet
        (or the connection is half-open: the client lost it, the gateway has not noticed).
        The earlier connection is closed with 4409: the session goes on on the new one.
        """
        earlier = self._open.get(sid)
        if earlier is not None and earlier != conn_id:
            session = self._sessions.get(earlier)
            if session is not None:
                session.close(CloseCode.RESUMED, "the session was resumed on another connection")
        if sid not in self._open and sid not in self._saving:
            return
        event = self._settled.setdefault(sid, asyncio.Event())
        try:
            async with asyncio.timeout(SETTLE_TIMEOUT):
                await event.wait()
        except TimeoutError:
            pass  # the take below says what there is
        finally:
            if not event.is_set() and self._settled.get(sid) is event:
                del self._settled[sid]

    async def _restore(
        self,
        session: Session,
        record: SessionRecord,
        positions: dict[Any, Any],
        ref: str | None,
        set_alias: Callable[[ConnId, str], Awaitable[None]],
    ) -> None:
        conn_id = session.conn_id
        registry = self._registry
        outbound = self._outbound
        alias_lost: str | None = None
        if record.alias is not None and registry.address(conn_id).alias is None:
            try:
                await set_alias(conn_id, record.alias)
            except (AliasTaken, InvalidName, BusUnavailable, UnknownConnection):
                alias_lost = record.alias
        conn_ids = (*record.conn_ids, conn_id)[-MAX_CONN_IDS:]
        everyone = frozenset(conn_ids)
        keeps = self._config.history.keeps
        kept = [g for g in record.groups if self._history is not None and keeps(g)]
        # Held before the joins: whatever the group gets from now on waits for the replay.
        for group in kept:
            self._holds.hold(group, conn_id, everyone)
        wall = self._clock()
        groups: list[str] = []
        for group in record.groups:
            try:
                outbound.join(conn_id, group, wall)
            except (InvalidName, UnknownConnection):
                continue
            groups.append(group)
        self._post()
        # The client's own position wins; for a group it names none of (it received
        # nothing there), where the group stood when its connection joined.
        given = {
            group: Position.parse(positions[group])
            if group in positions
            else self._recorded(group, record.positions.get(group))
            for group in kept
        }
        replays: dict[str, tuple[list[Envelope], Position]] = {}
        for group in kept:
            read = await self._read(group, given[group])
            if read is not None:
                replays[group] = read
        # Anything may have happened meanwhile: the connection may be closing, or gone.
        tokens = self._tokens
        assert tokens is not None
        sid = new_sid()
        address = registry.address(conn_id) if conn_id in registry else None
        user = address.user if address is not None else record.user
        fresh = self._sids.get(conn_id)
        if fresh is not None and self._open.get(fresh[0]) == conn_id:
            del self._open[fresh[0]]  # the session the welcome offered is not the one now
        self._sids[conn_id] = (sid, conn_ids)
        self._open[sid] = conn_id
        for earlier in conn_ids[:-1]:
            self.successors[earlier] = conn_id
        answer: dict[str, Any] = {
            "conn_id": conn_id,
            "alias": address.alias if address is not None else None,
            "user": user,
            "groups": groups,
            "recovered": [g for g in groups if g in replays],
            "resync": [g for g in groups if g not in replays],
            "redelivered": len(record.unacked),
            "token": tokens.issue(sid, user),
        }
        if alias_lost is not None:
            answer["alias_lost"] = alias_lost
        frame = ServerFrame(RESUMED, answer, self._next_id(), ref)
        session.queue(encode_server_frame(frame, session.codec), False)
        outbound.replay(session, record.unacked, "redelivered", wall)
        for group in kept:
            # What the client has: the replay's last, else the position it gave (a group
            # it must resync still gets nothing twice), if this gateway has been that far.
            floor = self._believed(group, given[group])
            if group in replays:
                entries, floor = replays[group]
                replayed = [e for e in entries if not _excluded(e, everyone)]
                outbound.replay(session, replayed, "replayed", wall)
                joins = self._joins.get(conn_id)
                if joins is not None and group in joins:
                    joins[group] = floor  # what it has now; the held ones come after
            held = self._holds.release(group, conn_id, floor, group in replays)
            for item in held:
                if isinstance(item, GroupGap):
                    self._gap_frame(session, item.group)
                else:
                    outbound.replay(session, (item,), "held", wall)
        self._post()

    def _believed(self, group: str, position: Position | None) -> Position | None:
        """Return ``position`` if this gateway has delivered ``group`` that far; else None.

        A position beyond what was delivered here (a client's bogus or stale one, or one
        from a store that restarted in the same epoch) says nothing about what the client
        has: the messages held for it during the resume must all be given, not dropped as
        seen already.
        """
        if position is None:
            return None
        expected = self._order.next_offset(group)
        if (
            expected is None
            or expected.epoch != position.epoch
            or position.offset >= expected.offset
        ):
            return None
        return position

    def _recorded(self, group: str, text: str | None) -> Position | None:
        """Read a position a session record kept (offset 0: before the first message)."""
        if text == FROM_FIRST:
            # Nothing of the group had reached the closing connection's gateway: all it
            # has seen came after (on another gateway, it may have seen earlier ones).
            first = self._order.first_offset(group)
            return None if first is None else Position(first.epoch, first.offset - 1)
        return _recorded(text)

    async def _read(
        self, group: str, position: Position | None
    ) -> tuple[list[Envelope], Position] | None:
        """Read what a client missed of ``group`` since ``position``; None: it must resync."""
        history = self._history
        if history is None or position is None:
            return None
        limit = self._config.resume.max_replay
        try:
            async with asyncio.timeout(FETCH_TIMEOUT):
                entries = await history.history(group, position, limit + 1)
        except Exception as exc:
            count = self._log.admit("replay", time.monotonic())
            if count is not None:
                log.warning("could not read group history to resume (%s)", exc)
            return None
        if entries is None or len(entries) > limit:
            return None
        floor = position
        if entries:
            found = position_of(entries[-1])
            if found is None:
                return None
            floor = found[1]
        return entries, floor

    # -- history messages from the bus ---------------------------------------------------

    def widen(self, envelope: Envelope) -> Envelope:
        """Return ``envelope`` with its ``exclude`` applied to whole sessions.

        A message that excludes a connection of a resumed session (say, the connection a
        client's own message came in on, before it reconnected) excludes the connection
        that session has now, as a replay would.
        """
        recipients = envelope.recipients
        if recipients is None or not recipients.exclude:
            return envelope
        successors = self.successors
        more = tuple(successors[c] for c in recipients.exclude if c in successors)
        if not more:
            return envelope
        exclude = (*recipients.exclude, *more)
        return msgspec.structs.replace(
            envelope, recipients=msgspec.structs.replace(recipients, exclude=exclude)
        )

    def deliver(self, envelope: Envelope) -> bool:
        """Take a message from the bus if it has a history position; False if it has none.

        Each group's messages go on in offset order (see GroupOrder); a hole history
        cannot fill is a ``wsbus.gap`` with ``groups`` to the group's members here.
        """
        if self._history is None:
            return False  # positions come from a bus asked to keep history, or from nobody
        found = position_of(envelope)
        if found is None:
            return False
        group, position = found
        order = self._order
        duplicates = order.duplicates
        items = order.offer(group, position, envelope, asyncio.get_running_loop().time())
        self._counters.history_duplicates += order.duplicates - duplicates
        self._emit(group, items)
        self._schedule()
        return True

    def _emit(self, group: str, items: list[Envelope | GroupGap]) -> None:
        holds = self._holds
        for item in items:
            if isinstance(item, GroupGap):
                self._group_gap(group)
                continue
            if group in holds:
                found = position_of(item)
                assert found is not None
                members = self._registry.members(group)
                leave_out = holds.apply(group, found[1], item, members.__contains__)
                if leave_out:
                    recipients = item.recipients
                    assert recipients is not None
                    exclude = (*recipients.exclude, *leave_out)
                    item = msgspec.structs.replace(
                        item, recipients=msgspec.structs.replace(recipients, exclude=exclude)
                    )
            self._route(item)

    def _group_gap(self, group: str) -> None:
        """Tell ``group``'s members here that some of its messages are lost."""
        held = self._holds.gap(group)
        sent = 0
        for conn_id in list(self._registry.members(group)):
            if conn_id in held:
                continue
            session = self._sessions.get(conn_id)
            if session is not None and session.close_code is None:
                self._gap_frame(session, group)
                sent += 1
        if sent or held:
            self._counters.history_gaps += 1

    @staticmethod
    def _gap_frame(session: Session, group: str) -> None:
        content = {"reason": "history", "message": HISTORY_GAP_MESSAGE, "groups": [group]}
        session.send_control("wsbus.gap", content)

    def _schedule(self) -> None:
        """Arrange for the holes to be fetched when their wait is over."""
        deadline = self._order.deadline()
        if deadline is None:
            return
        timer = self._timer
        if timer is not None:
            if timer.when() <= deadline:
                return
            timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_at(max(deadline, loop.time()), self._fetch_due)

    def _fetch_due(self) -> None:
        self._timer = None
        now = asyncio.get_running_loop().time()
        for fetch in self._order.due(now):
            if self._history is None or not self._registry.members(fetch.group):
                # Nobody here to give them to: nothing to fetch.
                self._emit(fetch.group, self._order.fill(fetch.group, fetch.after.epoch, None, now))
                continue
            self._spawn(
                self._fetch(self._history, fetch.group, fetch.after, fetch.limit),
                f"wsbus-fetch-{fetch.group}",
            )
        self._schedule()

    async def _fetch(self, history: KeepsHistory, group: str, after: Position, limit: int) -> None:
        entries: list[Envelope] | None = None
        try:
            async with asyncio.timeout(FETCH_TIMEOUT):
                entries = await history.history(group, after, limit)
        except Exception as exc:
            count = self._log.admit("fetch", time.monotonic())
            if count is not None:
                log.warning(
                    "could not read missing messages of group %r from the bus (%s); its "
                    "members here are told to resync",
                    group,
                    exc or type(exc).__name__,
                )
        now = asyncio.get_running_loop().time()
        self._emit(group, self._order.fill(group, after.epoch, entries, now))
        self._post()
        self._schedule()


def _recorded(text: str | None) -> Position | None:
    """Read a position a session record kept (offset 0: before the first message)."""
    if text is None:
        return None
    epoch, _, offset = text.rpartition(":")
    if not offset.isdigit():
        return None
    if offset == "0":
        return Position(epoch, 0)
    return Position.parse(text)


def _excluded(envelope: Envelope, conn_ids: frozenset[ConnId]) -> bool:
    recipients = envelope.recipients
    return (
        recipients is not None
        and bool(recipients.exclude)
        and not conn_ids.isdisjoint(recipients.exclude)
    )
