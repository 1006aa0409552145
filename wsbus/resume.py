"""Resuming a session: the record a closed connection leaves, its token, and their store.

When a connection closes with resume on, the gateway keeps a :class:`SessionRecord` (on
the bus when it keeps sessions, else in its own store) for the resume window. A client
that reconnects presents the signed token it was given in ``wsbus.welcome``; the gateway
takes the record (once: a token cannot be used twice) and restores the session. See
``docs/history.md``. Everything here is pure: no I/O, no clock (time is passed in).
"""

from __future__ import annotations

import msgspec

from .envelope import ConnId, Envelope

__all__ = ["SessionRecord"]


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
    """

    sid: str
    user: str | None
    alias: str | None
    groups: tuple[str, ...]
    conn_ids: tuple[ConnId, ...]
    closed: float
    code: int
    unacked: tuple[Envelope, ...] = ()
