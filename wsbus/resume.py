"""Resuming a session: the record a closed connection leaves, its token, and their store.

When a connection closes with resume on, the gateway keeps a :class:`SessionRecord` (on
the bus when it keeps sessions, else in its own store) for the resume window. A client
that reconnects presents the signed token it was given in ``wsbus.welcome``; the gateway
takes the record (once: a token cannot be used twice) and restores the session. See
``docs/history.md``. Everything here is pure: no I/O, no clock (time is passed in).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections import OrderedDict
from collections.abc import Callable
from typing import Final

import msgspec

from .envelope import ConnId, Envelope
from .errors import ConfigError
from .history import GroupGap, Position, position_of

__all__ = [
    "MAX_SESSIONS",
    "MAX_SESSION_BYTES",
    "Holds",
    "MemorySessions",
    "ResumeTokens",
    "SessionRecord",
    "new_sid",
]

TOKEN_VERSION: Final = "v1"
_SID_RE: Final = re.compile(r"[A-Za-z0-9_-]{22,64}")
_MAC_RE: Final = re.compile(r"[A-Za-z0-9_-]{43}")
_MAX_TOKEN: Final = 3 + 64 + 1 + 43

MAX_SESSIONS: Final = 100_000
"""Closed sessions a :class:`MemorySessions` keeps at most; past it the oldest goes."""

MAX_SESSION_BYTES: Final = 64 * 1024 * 1024
"""Bytes of closed sessions (their unacknowledged messages, mostly: as MessagePack) a
:class:`MemorySessions` keeps at most; past it the oldest goes."""


_ENCODER: Final = msgspec.msgpack.Encoder()


def new_sid() -> str:
    """Return a new session id: 128 random bits, URL-safe (22 characters)."""
    return secrets.token_urlsafe(16)


class SessionRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What a closed connection leaves for its client to resume.

    Attributes:
        sid: the session id (22+ characters of URL-safe random: 128 bits).
        user: the authenticated user; a resume must come from the same one.
        alias: the alias the connection had.
        groups: the groups it was in, in join order.
        conn_ids: every connection this session has had, newest last.
        closed: wall time of the close (seconds since the epoch).
        code: the close code.
        unacked: deliveries it was asked to acknowledge and did not: redelivered on resume.
        positions: for each history group, the position its history stood at when the
            connection joined it (``"<epoch>:<offset>"``, offset 0 for "from the first
            message this gateway saw"): where a replay starts when the client names no
            position for the group (it received nothing there).
        resumed: wall times of the session's latest resumes (what bounds how often one
            session can be resumed: each resume is a leave and a join for every member).
    """

    sid: str
    user: str | None
    alias: str | None
    groups: tuple[str, ...]
    conn_ids: tuple[ConnId, ...]
    closed: float
    code: int
    unacked: tuple[Envelope, ...] = ()
    positions: dict[str, str] = msgspec.field(default_factory=dict)
    resumed: tuple[float, ...] = ()


class ResumeTokens:
    """Issues and checks resume tokens: ``v1.<sid>.<mac>``, HMAC-SHA256 over sid and user.

    A token names one session and is bound to the user it was issued to: changing either
    breaks its MAC, so it can never be made into a token of another session or user
    without the secret. It carries no time: the session record it names expires with the
    resume window and is taken once, which is what makes an old or used token worthless.

    Args:
        secret: the signing key, at least 16 bytes; every gateway that should accept the
            others' tokens must have the same one.
    """

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ConfigError("a resume secret must be at least 16 bytes (32 hex digits)")
        self._secret = secret

    def __repr__(self) -> str:
        return "ResumeTokens(secret=***)"

    def issue(self, sid: str, user: str | None) -> str:
        """Return the token for session ``sid`` of ``user``."""
        if _SID_RE.fullmatch(sid) is None:
            raise ValueError("a session id is 22 to 64 URL-safe characters")
        return f"{TOKEN_VERSION}.{sid}.{self._mac(sid, user)}"

    def verify(self, token: object, user: str | None) -> str | None:
        """Return the session id ``token`` names if it is genuine and ``user``'s; else None.

        Anything malformed (this is client input) is refused before any MAC is computed.
        """
        if not isinstance(token, str) or len(token) > _MAX_TOKEN:
            return None
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != TOKEN_VERSION:
            return None
        _, sid, mac = parts
        if _SID_RE.fullmatch(sid) is None or _MAC_RE.fullmatch(mac) is None:
            return None
        if not hmac.compare_digest(self._mac(sid, user), mac):
            return None
        return sid

    def _mac(self, sid: str, user: str | None) -> str:
        # Fields separated by a NUL (in neither a sid nor a valid user name), and an
        # anonymous session told from any user name by its own marker.
        who = "\x00-" if user is None else "\x00u" + user
        message = f"{TOKEN_VERSION}\x00{sid}{who}".encode()
        digest = hmac.new(self._secret, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


class MemorySessions:
    """Closed sessions' records in memory, each for its ttl, each taken at most once.

    Pure: the time is passed in. A gateway whose bus does not keep sessions uses one (its
    clients can then resume on it only); the Pyro message bus owns one for all gateways.

    Args:
        max_records: records kept at most; past it the oldest saved is dropped (counted
            in :attr:`dropped`).
        max_bytes: bytes of records kept at most (each record's size as MessagePack: its
            unacknowledged messages, mostly); past it the oldest saved is dropped, and a
            record larger than all of it is not kept (counted in :attr:`dropped`).
    """

    def __init__(self, max_records: int = MAX_SESSIONS, max_bytes: int = MAX_SESSION_BYTES) -> None:
        self.max_records = max_records
        self.max_bytes = max_bytes
        # sid -> (expires, record, size), oldest saved first.
        self._records: OrderedDict[str, tuple[float, SessionRecord, int]] = OrderedDict()
        self.size = 0
        """Bytes of the records kept now."""
        self.dropped = 0
        """Records dropped before their time to keep within the bounds."""

    def __len__(self) -> int:
        return len(self._records)

    def save(self, record: SessionRecord, ttl: float, now: float) -> None:
        """Keep ``record`` until ``now + ttl`` (replacing one of the same sid)."""
        records = self._records
        old = records.pop(record.sid, None)
        if old is not None:
            self.size -= old[2]
        size = len(_ENCODER.encode(record))
        records[record.sid] = (now + ttl, record, size)
        self.size += size
        # Expired ones at the old end go first; then, while still too many, the oldest.
        while records:
            sid, (expires, _, kept) = next(iter(records.items()))
            if expires > now and len(records) <= self.max_records and self.size <= self.max_bytes:
                break
            del records[sid]
            self.size -= kept
            if expires > now:
                self.dropped += 1

    def take(self, sid: str, now: float) -> SessionRecord | None:
        """Return the record of ``sid`` and forget it; None when there is none or it expired."""
        kept = self._records.pop(sid, None)
        if kept is None:
            return None
        self.size -= kept[2]
        if kept[0] <= now:
            return None
        return kept[1]


class _Hold:
    __slots__ = ("buffer", "conn_ids", "floor", "overflowed")

    def __init__(self, conn_ids: frozenset[ConnId]) -> None:
        # Live deliveries held while the resume replays; None once released.
        self.buffer: list[Envelope | GroupGap] | None = []
        self.conn_ids = conn_ids
        # After the release: what the replay gave up to, for deliveries lagging behind it.
        self.floor: Position | None = None
        self.overflowed = False


class Holds:
    """Live history deliveries held back from connections being resumed. Pure.

    While a resume reads a group's history, the group's live messages for the resuming
    connection are held (:meth:`apply` tells the gateway to leave it out of them); once
    the replay is queued, :meth:`release` gives back those the replay did not contain, in
    order. After that, live messages at or before the replay's last position (a gateway
    whose order stage lags behind the store) are still left out, until one beyond it
    comes. Per connection, a message whose ``exclude`` names any connection the session
    has had is never given to it.

    Args:
        limit: messages held per group and connection; past it they are dropped and the
            release says :class:`~wsbus.history.GroupGap` (the client must resync).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._groups: dict[str, dict[ConnId, _Hold]] = {}
        self._by_conn: dict[ConnId, set[str]] = {}

    def __bool__(self) -> bool:
        return bool(self._groups)

    def __contains__(self, group: object) -> bool:
        return group in self._groups

    def hold(self, group: str, conn_id: ConnId, conn_ids: frozenset[ConnId]) -> None:
        """Start holding ``group``'s live messages back from ``conn_id``.

        ``conn_ids``: every connection its session has had (for ``exclude``).
        """
        self._groups.setdefault(group, {})[conn_id] = _Hold(conn_ids)
        self._by_conn.setdefault(conn_id, set()).add(group)

    def apply(
        self,
        group: str,
        position: Position,
        envelope: Envelope,
        is_member: Callable[[ConnId], bool],
    ) -> tuple[ConnId, ...]:
        """Take a live message of ``group``; return the connections to leave out of it.

        ``is_member`` tells whether a connection is in the group now (only members are
        held a message: it would not have reached the others).
        """
        holds = self._groups.get(group)
        if not holds:
            return ()
        recipients = envelope.recipients
        exclude = recipients.exclude if recipients is not None else ()
        leave_out: list[ConnId] = []
        for conn_id, hold in list(holds.items()):
            buffer = hold.buffer
            if buffer is not None:
                if not is_member(conn_id):
                    continue
                leave_out.append(conn_id)
                if exclude and not hold.conn_ids.isdisjoint(exclude):
                    continue
                if len(buffer) >= self.limit:
                    hold.overflowed = True
                    buffer.clear()
                elif not hold.overflowed:
                    buffer.append(envelope)
                continue
            floor = hold.floor
            if (
                floor is not None
                and position.epoch == floor.epoch
                and position.offset <= floor.offset
            ):
                leave_out.append(conn_id)
            else:
                self._drop(group, conn_id)
        return tuple(leave_out)

    def gap(self, group: str) -> set[ConnId]:
        """A gap in ``group``: hold it in place for those held; return who holds it."""
        holding: set[ConnId] = set()
        for conn_id, hold in self._groups.get(group, {}).items():
            if hold.buffer is not None:
                hold.buffer.append(GroupGap(group))
                holding.add(conn_id)
        return holding

    def release(
        self, group: str, conn_id: ConnId, floor: Position | None, recovered: bool = True
    ) -> list[Envelope | GroupGap]:
        """Stop holding; return what was held and the replay did not give, in order.

        ``floor``: the last position the client has now (the replay's last, or the one it
        gave); what is held up to it is not returned (None: all of it is). When the group
        was ``recovered``, live messages up to ``floor`` that come later (from an order
        stage lagging behind the history) are left out too; a group to resync has its
        ``floor`` from the client, which may be anything, and gets every later message.
        """
        hold = self._groups.get(group, {}).get(conn_id)
        if hold is None or hold.buffer is None:
            return []
        held, hold.buffer = hold.buffer, None
        if hold.overflowed:
            out: list[Envelope | GroupGap] = [GroupGap(group)]
        else:
            out = []
            for item in held:
                if not isinstance(item, GroupGap):
                    found = position_of(item)
                    if found is not None and _at_or_before(found[1], floor):
                        continue  # replayed already
                out.append(item)
        if floor is None or not recovered:
            self._drop(group, conn_id)
        else:
            hold.floor = floor
        return out

    def forget(self, conn_id: ConnId) -> None:
        """The connection closed: hold nothing more for it."""
        for group in list(self._by_conn.get(conn_id, ())):
            self._drop(group, conn_id)

    def _drop(self, group: str, conn_id: ConnId) -> None:
        holds = self._groups.get(group)
        if holds is not None:
            holds.pop(conn_id, None)
            if not holds:
                del self._groups[group]
        groups = self._by_conn.get(conn_id)
        if groups is not None:
            groups.discard(group)
            if not groups:
                del self._by_conn[conn_id]


def _at_or_before(position: Position, floor: Position | None) -> bool:
    return floor is not None and position.epoch == floor.epoch and position.offset <= floor.offset
