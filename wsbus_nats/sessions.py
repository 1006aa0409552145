"""Closed sessions in a JetStream key-value bucket, so that a client may resume on any gateway.

``P_sessions`` (gateways only: services have no access) holds one entry per closed session,
keyed by its session id, each with its own expiry (``Nats-TTL``: the resume window the
gateway saves it with; at most :data:`~wsbus_nats.buckets.SESSIONS_MAX_AGE`). Taking a
record is single use across the cluster: read it, then delete it on the revision read; of
two gateways taking one record at once, one deletes it and the other gets nothing.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Final

import msgspec
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext

from wsbus.errors import BusUnavailable
from wsbus.resume import SessionRecord

from .history import WRONG_LAST_SEQUENCE, answered

__all__ = ["MARKER_TTL", "SessionStore", "valid_sid"]

log = logging.getLogger("wsbus.nats.sessions")

MARKER_TTL: Final = 60
"""Seconds the mark a taken session leaves is kept (then the key is simply absent)."""
_SID: Final = re.compile(r"[A-Za-z0-9_-]{16,128}")
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(SessionRecord).decode


def valid_sid(sid: str) -> bool:
    """Return True when ``sid`` can be a session id (and so a key of the bucket)."""
    return _SID.fullmatch(sid) is not None


class SessionStore:
    """The sessions bucket, as a gateway uses it.

    Args:
        js: the gateway's JetStream context (the bucket opened and checked).
        bucket: the bucket's name.
        largest: the bucket's largest entry, in bytes.
        budget: seconds an operation may keep trying while nobody answers (a NATS node
            was lost and the bucket elects a leader).
    """

    def __init__(self, js: JetStreamContext, bucket: str, largest: int, budget: float) -> None:
        self._js = js
        self._prefix = f"$KV.{bucket}."
        self._stream = f"KV_{bucket}"
        self._budget = budget
        # The key, subject and headers take some of the bucket's largest entry.
        self._largest = largest - 1024

    async def save(self, record: SessionRecord, ttl: float) -> None:
        """Keep ``record`` for ``ttl`` seconds (rounded up to whole seconds).

        Raises:
            ValueError: its session id cannot be a key.
            BusUnavailable: it cannot be kept (JetStream down, or the record is larger
                than an entry may be: not the whole bus).
        """
        if not valid_sid(record.sid):
            raise ValueError(f"session id {record.sid!r} is not 16-128 URL-safe characters")
        data = _encode(record)
        if len(data) > self._largest:
            raise BusUnavailable(
                f"the session record is {len(data)} bytes, more than the sessions bucket "
                f"keeps in one entry ({self._largest}): it has too many unacknowledged "
                "messages, or too large ones",
                whole_bus=False,
            )
        try:
            subject, seconds = self._prefix + record.sid, max(1, math.ceil(ttl))
            await answered(
                lambda: self._js.publish(subject, data, msg_ttl=seconds),
                self._js,
                self._stream,
                self._budget,
            )
        except nats.js.errors.APIError as exc:
            raise BusUnavailable(
                f"the session could not be kept (error code {exc.err_code}: {exc.description})",
                whole_bus=False,
            ) from None
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusUnavailable(f"the sessions bucket is not reachable ({exc!r})") from None

    async def take(self, sid: str) -> SessionRecord | None:
        """Return the record of ``sid`` and delete it; None when there is none (any more).

        Raises:
            BusUnavailable: the bucket cannot be reached.
        """
        if not valid_sid(sid):
            return None
        try:
            try:
                # From the bucket's leader (a direct get may be answered by a follower a
                # moment behind, which might not have a record just saved elsewhere).
                entry = await answered(
                    lambda: self._js.get_msg(self._stream, subject=self._prefix + sid),
                    self._js,
                    self._stream,
                    self._budget,
                )
            except nats.js.errors.NotFoundError:
                return None  # never kept, expired
            if (entry.headers or {}).get("KV-Operation") in ("DEL", "PURGE"):
                return None  # taken
            try:
                # On the revision read: of two takes at once, one deletes, one fails.
                headers = {
                    "KV-Operation": "DEL",
                    "Nats-Expected-Last-Subject-Sequence": str(entry.seq),
                }
                await answered(
                    lambda: self._js.publish(
                        self._prefix + sid, b"", headers=headers, msg_ttl=MARKER_TTL
                    ),
                    self._js,
                    self._stream,
                    self._budget,
                )
            except nats.js.errors.APIError as exc:
                if exc.err_code in WRONG_LAST_SEQUENCE:
                    return None
                raise BusUnavailable(
                    f"a session could not be taken (error code {exc.err_code}: {exc.description})",
                    whole_bus=False,
                ) from None
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusUnavailable(f"the sessions bucket is not reachable ({exc!r})") from None
        try:
            record = _decode(entry.data or b"")
        except (msgspec.DecodeError, msgspec.ValidationError):
            log.warning("the sessions bucket held a record for %s that is not one; ignored", sid)
            return None
        return record if record.sid == sid else None
