"""Group history: positions, what enters history, and the stores that keep it.

A history group's messages are stamped by the bus's sequencer with a dense per-group
:class:`Position` (an epoch and an offset) in two envelope headers before they reach any
gateway. Gateways hand positions to clients in frames; a client that reconnects names the
last position it saw per group, and the gateway replays what follows from the bus's store
(see ``docs/history.md``). Everything here is pure: no I/O, no clock (time is passed in).
"""

from __future__ import annotations

import base64
import fnmatch
import functools
import itertools
import math
import os
import re
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Final, NamedTuple

import msgspec

from .envelope import Envelope, ServiceAddress
from .errors import ConfigError

__all__ = [
    "GROUP_HEADER",
    "POSITION_HEADER",
    "REORDER_WAIT",
    "Fetch",
    "GroupGap",
    "GroupOrder",
    "HistoryConfig",
    "MemoryHistory",
    "Position",
    "history_group",
    "position_of",
    "stamp",
]

POSITION_HEADER: Final = "wsbus-pos"
"""The envelope header holding a history position, ``"<epoch>:<offset>"``."""

GROUP_HEADER: Final = "wsbus-group"
"""The envelope header naming the history group the position belongs to."""

_POSITION_RE: Final = re.compile(r"([A-Za-z0-9_-]{1,40}):([1-9][0-9]{0,17})")
_EPOCH_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,40}")


class Position(msgspec.Struct, frozen=True, gc=False):
    """A place in one group's history.

    Attributes:
        epoch: names one life of the store (``[A-Za-z0-9_-]{1,40}``): a restarted or
            recreated store has a new epoch, and positions of another epoch mean nothing.
        offset: 1, 2, 3, ... dense per group within an epoch.
    """

    epoch: str
    offset: int

    def encode(self) -> str:
        """Return the wire form, ``"<epoch>:<offset>"``."""
        return f"{self.epoch}:{self.offset}"

    @classmethod
    def parse(cls, text: object) -> Position | None:
        """Read a wire form; None for anything malformed (this is client input)."""
        if not isinstance(text, str) or len(text) > 60:
            return None
        match = _POSITION_RE.fullmatch(text)
        if match is None:
            return None
        return cls(match[1], int(match[2]))


def valid_epoch(epoch: str) -> bool:
    """Return True when ``epoch`` may name a store's life."""
    return _EPOCH_RE.fullmatch(epoch) is not None


class HistoryConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Which groups keep history, and how much.

    Attributes:
        groups: ``fnmatch`` patterns (case-sensitive) of the groups that keep history;
            empty: no group does.
        size: entries kept per group (at least 1).
        age: seconds an entry is kept (more than 0).
    """

    groups: tuple[str, ...] = ()
    size: int = 100
    age: float = 300.0

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ConfigError("history.size must be >= 1 (entries kept per group)")
        if not self.age > 0:
            raise ConfigError("history.age must be > 0 (seconds an entry is kept)")

    def keeps(self, group: str) -> bool:
        """Return True when ``group`` keeps history."""
        return _matcher(self.groups)(group) is not None


@functools.lru_cache(maxsize=64)
def _matcher(patterns: tuple[str, ...]) -> Callable[[str], object]:
    """One compiled regular expression for all the patterns (each message asks)."""
    if not patterns:
        return lambda group: None
    either = "|".join(f"(?:{fnmatch.translate(pattern)})" for pattern in patterns)
    return re.compile(either).match


def history_group(envelope: Envelope, config: HistoryConfig) -> str | None:
    """Return the group whose history ``envelope`` enters, or None.

    An envelope enters history when a service sent it, its recipients are exactly one
    group (an ``exclude`` is allowed, nothing else), the group keeps history, and it has
    no position yet.
    """
    recipients = envelope.recipients
    if (
        recipients is None
        or not config.groups
        or len(recipients.groups) != 1
        or recipients.conn_ids
        or recipients.aliases
        or recipients.users
        or recipients.everyone
        or envelope.to is not None
        or not isinstance(envelope.sender, ServiceAddress)
        or POSITION_HEADER in envelope.headers
    ):
        return None
    group = recipients.groups[0]
    return group if config.keeps(group) else None


def stamp(envelope: Envelope, group: str, position: Position) -> Envelope:
    """Return a copy of ``envelope`` carrying ``group`` and ``position`` in its headers."""
    headers = dict(envelope.headers)
    headers[GROUP_HEADER] = group
    headers[POSITION_HEADER] = position.encode()
    return msgspec.structs.replace(envelope, headers=headers)


def position_of(envelope: Envelope) -> tuple[str, Position] | None:
    """Return the history group and position an envelope carries, or None."""
    headers = envelope.headers
    if not headers:
        return None
    text = headers.get(POSITION_HEADER)
    group = headers.get(GROUP_HEADER)
    if text is None or group is None:
        return None
    position = Position.parse(text)
    if position is None:
        return None
    return group, position


class _GroupLog:
    """One group's kept entries: ``(offset, wall, envelope)``, oldest first, dense."""

    __slots__ = ("entries", "epoch", "last")

    def __init__(self, epoch: str) -> None:
        self.epoch = epoch
        self.last = 0
        self.entries: deque[tuple[int, float, Envelope]] = deque()


MAX_IDLE_GROUPS: Final = 100_000
"""Groups whose entries have all aged out that a :class:`MemoryHistory` still remembers
the last offset of. Past it the longest idle is forgotten; if it is written to again it
starts a new epoch (its members are told to resync, which is then the truth)."""


class MemoryHistory:
    """Keeps each history group's last entries in memory and stamps their positions.

    Pure: the wall time is passed in. The in-memory bus and the Pyro message bus own one;
    being the one place a group's messages pass through, it is the group's sequencer.

    Args:
        config: which groups keep history, how many entries and for how long.
        epoch: the epoch of this store; random when omitted (a new store, a new epoch).
    """

    def __init__(self, config: HistoryConfig, epoch: str | None = None) -> None:
        if epoch is None:
            epoch = base64.urlsafe_b64encode(os.urandom(9)).decode()
        if not valid_epoch(epoch) or len(epoch) > 30:
            raise ConfigError(f"a history epoch must match [A-Za-z0-9_-]{{1,30}}: {epoch!r}")
        self.config = config
        self.epoch = epoch
        # Least recently written first: the idle end is where trimming by age looks.
        self._groups: OrderedDict[str, _GroupLog] = OrderedDict()
        self._revived = 0

    def append(self, group: str, envelope: Envelope, wall: float) -> Envelope:
        """Keep ``envelope`` as ``group``'s next entry at ``wall``; return it stamped."""
        groups = self._groups
        log = groups.get(group)
        if log is None:
            # A group forgotten while idle may come back: a new epoch, so that nobody
            # reads its fresh offsets as the old ones.
            epoch = self.epoch if self._revived == 0 else f"{self.epoch}-{self._revived:x}"
            log = groups[group] = _GroupLog(epoch)
        else:
            groups.move_to_end(group)
        log.last += 1
        stamped = stamp(envelope, group, Position(log.epoch, log.last))
        entries = log.entries
        entries.append((log.last, wall, stamped))
        if len(entries) > self.config.size:
            entries.popleft()
        self._expire(wall)
        return stamped

    def read(self, group: str, after: Position, wall: float, limit: int) -> list[Envelope] | None:
        """Return ``group``'s entries after ``after``, oldest first, at most ``limit``.

        Returns:
            ``[]`` when nothing follows ``after``; None when what follows cannot all be
            given: ``after`` is of another epoch or beyond the last entry, or an entry
            after it was trimmed (by count or age).
        """
        log = self._groups.get(group)
        if log is None or after.epoch != log.epoch or after.offset > log.last:
            return None
        entries = log.entries
        _trim(entries, wall - self.config.age)
        if after.offset == log.last:
            return []
        first = entries[0][0] if entries else log.last + 1
        if after.offset + 1 < first:
            return None
        start = after.offset + 1 - first
        return [entry[2] for entry in itertools.islice(entries, start, start + max(limit, 0))]

    def last(self, group: str) -> Position | None:
        """Return the position of ``group``'s newest entry; None if it has none."""
        log = self._groups.get(group)
        return None if log is None else Position(log.epoch, log.last)

    def _expire(self, wall: float) -> None:
        """Trim aged entries at the idle end; forget idle groups past MAX_IDLE_GROUPS."""
        groups = self._groups
        oldest = wall - self.config.age
        # Each append looks at a few of the least recently written groups: the work per
        # message is bounded, and every group is trimmed again when read.
        for _ in range(2):
            if not groups:
                return
            group, log = next(iter(groups.items()))
            _trim(log.entries, oldest)
            if log.entries or len(groups) <= MAX_IDLE_GROUPS:
                return
            del groups[group]
            self._revived += 1


def _trim(entries: deque[tuple[int, float, Envelope]], oldest: float) -> None:
    while entries and entries[0][1] < oldest:
        entries.popleft()


REORDER_WAIT: Final = 0.2
"""Seconds a gateway waits for a history group's missing message before it fetches it."""

PARK_PER_GROUP: Final = 256
"""Out-of-order messages a gateway parks per group while it waits for a missing one."""

PARK_TOTAL: Final = 4096
"""Out-of-order messages a gateway parks in all."""

MAX_TRACKED_GROUPS: Final = 65_536
"""Groups whose next offset a gateway remembers; the least recently seen is forgotten."""


class GroupGap(NamedTuple):
    """A hole in ``group``'s order that history could not fill: its members must resync."""

    group: str


class Fetch(NamedTuple):
    """What a gateway must read from the bus's history to fill a hole.

    Attributes:
        group: the history group.
        after: read the entries after this position...
        limit: ...this many of them (the hole's size).
    """

    group: str
    after: Position
    limit: int


class _Track:
    __slots__ = ("epoch", "fetching", "next", "parked", "since", "start", "target")

    def __init__(self, epoch: str, offset: int) -> None:
        self.epoch = epoch
        self.next = offset
        # The first offset seen here: anything older arriving later was never delivered.
        self.start = offset
        self.parked: dict[int, Envelope] = {}
        # When the wait for the current hole began; -inf: fetch at once (bounds reached).
        self.since: float | None = None
        self.fetching = False
        # The first parked offset when the fetch was asked for: the hole ends before it.
        self.target = 0


class GroupOrder:
    """A gateway's per-group reorder stage for history messages. Pure: time is passed in.

    Each history group's messages leave it in offset order: a message beyond the next
    expected offset is parked; after ``wait`` seconds (at once when the parking bounds
    are reached) :meth:`due` names the missing run to fetch from the bus's history, and
    :meth:`fill` takes what was fetched. What cannot be fetched becomes a
    :class:`GroupGap` in the output, in its place, and delivery goes on after it. A
    duplicate (an offset already passed) is dropped and counted; a new epoch starts the
    group afresh behind a gap. The first message seen of a group sets where it starts.

    Args:
        wait: seconds to wait for a missing message before fetching it.
        per_group: messages parked per group before the fetch is made at once.
        total: messages parked in all before the fetch is made at once.
        max_groups: groups tracked at most (the least recently seen is forgotten).

    Parking stops at twice the bounds: the hole is then given up (a gap) without waiting
    for the fetch.
    """

    def __init__(
        self,
        wait: float = REORDER_WAIT,
        per_group: int = PARK_PER_GROUP,
        total: int = PARK_TOTAL,
        max_groups: int = MAX_TRACKED_GROUPS,
    ) -> None:
        self.wait = wait
        self.per_group = per_group
        self.total = total
        self.max_groups = max_groups
        self._tracks: OrderedDict[str, _Track] = OrderedDict()
        # Groups with parked messages and no fetch under way: what due() looks at.
        self._waiting: set[str] = set()
        self.parked = 0
        """Messages parked now, in all groups."""
        self.duplicates = 0
        """Messages dropped because their offset had been passed already."""
        self.gaps = 0
        """Gaps output: holes history could not fill, and new epochs."""

    def first_offset(self, group: str) -> Position | None:
        """Return the first position of ``group`` delivered here; None when not tracked."""
        track = self._tracks.get(group)
        return None if track is None else Position(track.epoch, track.start)

    def next_offset(self, group: str) -> Position | None:
        """Return the position ``group`` expects next; None when it is not tracked."""
        track = self._tracks.get(group)
        return None if track is None else Position(track.epoch, track.next)

    def offer(
        self, group: str, position: Position, envelope: Envelope, now: float
    ) -> list[Envelope | GroupGap]:
        """Take one message of ``group`` at ``position``; return what is ready, in order."""
        tracks = self._tracks
        track = tracks.get(group)
        out: list[Envelope | GroupGap] = []
        offset = position.offset
        if track is None:
            track = tracks[group] = _Track(position.epoch, offset)
            self._forget_some()
        else:
            tracks.move_to_end(group)
            if position.epoch != track.epoch:
                self._flush(group, track, out)
                self.gaps += 1
                out.append(GroupGap(group))
                track = tracks[group] = _Track(position.epoch, offset)
        if offset == track.next:
            out.append(envelope)
            track.next += 1
            self._drain(group, track, out, now)
        elif offset < track.next:
            if offset < track.start:
                # Never delivered here: it was overtaken by the first one seen.
                track.start = offset
                self.gaps += 1
                out.append(GroupGap(group))
            else:
                self.duplicates += 1
        elif offset in track.parked:
            self.duplicates += 1
        else:
            track.parked[offset] = envelope
            self.parked += 1
            if len(track.parked) > 2 * self.per_group or self.parked > 2 * self.total:
                self._skip(group, track, out, now)
            elif not track.fetching:
                if track.since is None:
                    track.since = now
                if self._full(track):
                    track.since = -math.inf
                self._waiting.add(group)
        return out

    def due(self, now: float) -> list[Fetch]:
        """Return the holes to fetch now; each is marked under way until :meth:`fill`."""
        fetches: list[Fetch] = []
        for group in list(self._waiting):
            track = self._tracks[group]
            assert track.since is not None and track.parked
            if track.since + self.wait <= now:
                self._waiting.discard(group)
                track.fetching = True
                track.target = min(track.parked)
                after = Position(track.epoch, track.next - 1)
                fetches.append(Fetch(group, after, track.target - track.next))
        return fetches

    def deadline(self) -> float | None:
        """Return when :meth:`due` will next have something; None when nothing waits."""
        times = [self._tracks[group].since for group in self._waiting]
        return min(t for t in times if t is not None) + self.wait if times else None

    def fill(
        self, group: str, epoch: str, envelopes: list[Envelope] | None, now: float
    ) -> list[Envelope | GroupGap]:
        """Take what a :class:`Fetch` read (None: history could not give it all).

        Returns what is ready now, in order, with a :class:`GroupGap` where the hole
        could not be filled.
        """
        track = self._tracks.get(group)
        out: list[Envelope | GroupGap] = []
        if track is None or track.epoch != epoch or not track.fetching:
            return out  # the group started afresh meanwhile: this answer is stale
        track.fetching = False
        parked = track.parked
        for envelope in envelopes or ():
            found = position_of(envelope)
            if found is None or found[0] != group or found[1].epoch != epoch:
                break
            offset = found[1].offset
            if offset < track.next:
                continue
            if offset > track.next:
                break
            out.append(envelope)
            track.next += 1
            if parked.pop(offset, None) is not None:
                self.parked -= 1
        self._drain(group, track, out, now)
        if parked and track.next < track.target:
            # History could not give what is missing: say so in its place and go on.
            self._skip(group, track, out, now)
        return out

    def _full(self, track: _Track) -> bool:
        return len(track.parked) >= self.per_group or self.parked >= self.total

    def _drain(self, group: str, track: _Track, out: list[Envelope | GroupGap], now: float) -> None:
        """Release the parked run that follows; start the wait for the hole after it."""
        parked = track.parked
        released = False
        while track.next in parked:
            out.append(parked.pop(track.next))
            self.parked -= 1
            track.next += 1
            released = True
        if not parked:
            track.since = None
            self._waiting.discard(group)
        elif not track.fetching:
            if released or track.since is None:
                track.since = now  # a new hole
            if self._full(track):
                track.since = -math.inf
            self._waiting.add(group)

    def _skip(self, group: str, track: _Track, out: list[Envelope | GroupGap], now: float) -> None:
        """Give the hole before the first parked message up: a gap, then what follows."""
        self.gaps += 1
        out.append(GroupGap(group))
        track.next = min(track.parked)
        self._drain(group, track, out, now)

    def _flush(self, group: str, track: _Track, out: list[Envelope | GroupGap]) -> None:
        """Release everything parked of an ended epoch, in order (a gap follows)."""
        for offset in sorted(track.parked):
            out.append(track.parked[offset])
        self.parked -= len(track.parked)
        track.parked.clear()
        self._waiting.discard(group)

    def _forget_some(self) -> None:
        tracks = self._tracks
        if len(tracks) <= self.max_groups:
            return
        for group, track in tracks.items():
            if not track.parked and not track.fetching:
                del tracks[group]
                return
