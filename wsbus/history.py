"""Group history: positions, what enters history, and the stores that keep it.

A history group's messages are stamped by the bus's sequencer with a dense per-group
:class:`Position` (an epoch and an offset) in two envelope headers before they reach any
gateway. Gateways hand positions to clients in frames; a client that reconnects names the
last position it saw per group, and the gateway replays what follows from the bus's store
(see ``docs/history.md``). Everything here is pure: no I/O, no clock (time is passed in).
"""

from __future__ import annotations

import fnmatch
import re
from typing import Final

import msgspec

from .envelope import Envelope, ServiceAddress
from .errors import ConfigError

__all__ = [
    "GROUP_HEADER",
    "POSITION_HEADER",
    "HistoryConfig",
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
        return any(fnmatch.fnmatchcase(group, pattern) for pattern in self.groups)


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
