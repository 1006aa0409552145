"""Group history in JetStream: the stream, the service side's appends, the gateway's reads.

One stream per deployment, ``P_history``, with the subjects ``P.hist.<group>.<service>``
(the group's UTF-8 in hex, then the service that appended the entry: a service's NATS user
may append only under its own name). Each entry is one stamped envelope (MessagePack), its
position in its headers (:mod:`wsbus.history`).

- **Who makes it.** Gateways, at start, with their ``[gateway.history]`` settings
  (:meth:`wsbus_nats.NatsBus.keep_history`); the settings and the stream's epoch are in the
  stream's metadata. A gateway whose settings differ from the stream's refuses to start
  (every gateway of a deployment must agree: one stream serves them all). Service
  instances never make it: they read it (and check it) to learn which groups keep history.
- **Appending** (:class:`HistoryWriter`, in a service instance's sender task, before the
  envelope goes to any gateway): offset = the group's last offset + 1, published with
  ``Nats-Msg-Id`` = the envelope's id and a digest of it keyed by the writer (its retries
  are de-duplicated within the stream's window; nobody else can take the id first) and
  ``Nats-Expected-Last-Subject-Sequence`` (with ``...-Subject`` = every service's entries
  of the group), so two writers racing for one offset cannot both win: the loser reads
  the group's last entry again and retries, a bounded number of times. Offsets are dense
  per group.
- **Age.** An entry older than the settings' ``age`` is never replayed (a read that needs
  it answers None: resync), but the stream keeps entries for at least :data:`HISTORY_KEEP`
  (a day), so that a group's last offset survives a quiet spell and its offsets go on.
- **Runs.** An epoch is the stream's epoch and a run id: when a group has no entry left
  (none for a day, or the stream is new), the next append starts a new run (offset 1, a new
  random run id), since the previous offsets are gone with their entries. A client holding
  a position of the old run is told to resync; a gateway's order stage sees a new epoch and
  sends that group's members a gap.
- **Reading** (:class:`HistoryReader`, gateways): the group's last entry from the stream's
  leader (a direct get may be answered by a follower a moment behind);
  then, for a few entries, a walk back by each entry's ``Wsbus-Previous`` header (the
  sequence of the group's previous entry), else an ordered consumer filtered to the group
  from its first entry kept. A gateway believes the position of a service's live message
  only once the entry the service names (its stream sequence) is found to be that
  envelope at that position (:meth:`HistoryReader.holds`). Reads and checks keep trying
  while JetStream does not answer (a leader being elected after a NATS node's loss), for
  up to :data:`LEADER_WAIT` seconds.

Error codes, never error texts: JetStream's "wrong last sequence" is ``10071`` (``10164`` the
constant form).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import math
import os
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Final, NamedTuple, TypeVar

import msgspec
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy, DiscardPolicy, RawStreamMsg, StorageType, StreamConfig

from wsbus.envelope import Envelope, ServiceAddress, decode_envelope, encode_envelope
from wsbus.errors import BusUnavailable, ConfigError
from wsbus.history import HistoryConfig, Position, position_of, stamp

from .link import Link, RateLimitedLog
from .subjects import Subjects

__all__ = [
    "APPEND_ATTEMPTS",
    "GROUP_TOKEN_LIMIT",
    "HISTORY_MAX_BYTES",
    "LEADER_WAIT",
    "WRONG_LAST_SEQUENCE",
    "HistoryCounters",
    "HistoryReader",
    "HistoryWriter",
    "answered",
    "check_stream",
    "history_settings",
    "open_history",
    "stream_config",
]

log = logging.getLogger("wsbus.nats.history")

MIB: Final = 1024 * 1024
HISTORY_MAX_BYTES: Final = 256 * MIB
"""The history stream's largest size; when full, its oldest entries go (any group's)."""
HISTORY_MAX_MSG_SIZE: Final = 8 * MIB
"""The largest entry the stream takes (an envelope is bounded by max_payload anyway)."""
HISTORY_KEEP: Final = 86400.0
"""Seconds the stream keeps an entry at least (``max_age`` is the larger of this and the
settings' ``age``): a group's offsets go on across a quiet spell of up to a day. Entries
older than ``age`` are kept but never replayed."""
APPEND_ATTEMPTS: Final = 1000
"""Appends one envelope tries, each after another writer took the offset, at most (and
for at most ``request_timeout`` seconds in all)."""
BACKOFF: Final = 0.0005
"""Seconds a writer that lost an offset twice in a row waits at most before trying again
(doubled for each further loss, up to 16 times this, with jitter): writers in step part."""
WRONG_LAST_SEQUENCE: Final = frozenset({10071, 10164})
"""JetStream's error codes for "wrong last sequence" (the expected sequence did not hold)."""
GROUP_TOKEN_LIMIT: Final = 1024
"""The longest group token (hex) a history subject may have: 512 bytes of group name."""
TAILS_LIMIT: Final = 10_000
"""Groups whose last entry a service instance remembers, at most."""
_EPOCH_KEY: Final = "wsbus.epoch"
_GROUPS_KEY: Final = "wsbus.history.groups"
_SIZE_KEY: Final = "wsbus.history.size"
_AGE_KEY: Final = "wsbus.history.age"
_MSG_ID: Final = "Nats-Msg-Id"
_EXPECTED_STREAM: Final = "Nats-Expected-Stream"
_EXPECTED_LAST: Final = "Nats-Expected-Last-Subject-Sequence"
_EXPECTED_LAST_SUBJECT: Final = "Nats-Expected-Last-Subject-Sequence-Subject"
PREVIOUS_HEADER: Final = "Wsbus-Previous"
"""A NATS header of each entry: the stream sequence of its group's previous entry (0: the
first of a run), so that a reader walks back from the last entry to what it needs."""
LEADER_WAIT: Final = 8.0
"""Seconds a gateway's history read (and its check of a position) keeps trying at least
while JetStream does not answer, or does not answer in time (``request_timeout`` when that
is longer). After a NATS node's loss the history stream, and JetStream's meta group (which
a long read's consumer needs), each elect a new leader, nats-server within about 4 to 9 s
of the last word from the lost one (measured on loopback: 4.4 to 7.7 s); until then
requests to the lost leader go unanswered. A read does nothing, so trying it again is
safe. Below the gateway's own bound on a read (``wsbus.resuming.FETCH_TIMEOUT``, 10 s: a
read that gives up says why) and the clients' default ``open_timeout`` (10 s), which a
whole resume must fit in."""
CONSUMER_PAUSE: Final = 0.2
"""Seconds between two attempts of a long history read's ordered consumer."""
FALLBACK_WALK_LIMIT: Final = 1024
"""A long read whose consumer failed (JetStream's meta leader being elected after a NATS
node's loss) walks back from the group's last entry instead, one read from the stream's
leader per entry, when it misses at most this many (about 0.5 ms each on loopback)."""
WALK_LIMIT: Final = 32
"""A read that misses at most this many entries walks back from the last by their
``Wsbus-Previous`` headers (one direct get each); a longer one reads the group with an
ordered consumer from its first entry kept."""


_UNANSWERED: Final = (
    nats.errors.NoRespondersError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
)
"""Nobody answered, so nothing was done: what a stream electing a leader (a NATS node was
lost) says for a moment."""


_T = TypeVar("_T")


async def answered(
    call: Callable[[], Awaitable[_T]],
    js: JetStreamContext,
    stream: str,
    budget: float,
    *,
    read: bool = False,
) -> _T:
    """Return ``await call()``, tried again while nobody answers, for up to ``budget`` s.

    For a JetStream request on ``stream`` (a publish, a direct get): right after a NATS node
    of a cluster is lost, the stream's replicas elect a leader and nobody answers for a
    moment; nothing was done then, so trying again is safe.

    Args:
        call: the request.
        js: the JetStream context (to ask whether ``stream`` exists).
        stream: the stream the request is on.
        budget: seconds to keep trying.
        read: the request only reads: one that timed out (sent to a leader that is gone,
            which nobody else answers for) is tried again too, and no attempt outlasts
            the budget. A write that timed out may have been done: never tried again here.

    Raises:
        The last error: the budget is spent, or the stream does not exist.
    """
    deadline = time.monotonic() + budget
    wait = 0.05
    retried = (*_UNANSWERED, TimeoutError) if read else _UNANSWERED
    while True:
        try:
            if not read:
                return await call()
            async with asyncio.timeout(max(deadline - time.monotonic(), wait)):
                return await call()
        except retried:
            if time.monotonic() + wait > deadline or not await _exists(js, stream):
                raise
        await asyncio.sleep(wait)
        wait = min(2 * wait, 0.5)


async def _exists(js: JetStreamContext, stream: str) -> bool:
    """False only when JetStream says ``stream`` does not exist (anything else: maybe)."""
    try:
        async with asyncio.timeout(0.5):
            await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        return False
    except (nats.errors.Error, TimeoutError):
        pass
    return True


class HistoryCounters:
    """What happened to history on one process (read them; never reset)."""

    __slots__ = (
        "append_failures",
        "appends",
        "conflicts",
        "duplicates",
        "mismatches",
        "overflows",
        "reads",
    )

    def __init__(self) -> None:
        self.appends = 0
        """Envelopes appended (stamped) by this service instance."""
        self.conflicts = 0
        """Appends retried because another writer took the offset first."""
        self.duplicates = 0
        """Appends JetStream found already made (the same envelope id, a retry)."""
        self.append_failures = 0
        """Appends that failed: their sends failed (the service was told)."""
        self.reads = 0
        """History reads (gateways)."""
        self.mismatches = 0
        """Entries ignored: not an envelope, no position, or a sender or group other than
        their subject names; and (gateways) positions of services' messages not believed,
        the stream not holding them there (the messages went on without them)."""
        self.overflows = 0
        """Messages a gateway dropped because their service had ``HOLD_LIMIT`` messages
        waiting behind position checks already (its clients were told ``wsbus.gap``)."""

    def as_dict(self) -> dict[str, int]:
        """Return the counters by name."""
        return {name: getattr(self, name) for name in self.__slots__}


def stream_config(
    subjects: Subjects, config: HistoryConfig, *, replicas: int, epoch: str
) -> StreamConfig:
    """Return the configuration gateways make the history stream with."""
    return StreamConfig(
        name=subjects.history_stream,
        subjects=[subjects.history_subjects],
        allow_direct=True,
        allow_rollup_hdrs=False,
        deny_delete=True,
        deny_purge=True,
        discard=DiscardPolicy.OLD,
        # Retries of one envelope (its id) within this window are stored once.
        duplicate_window=min(120.0, config.age),
        max_age=max(config.age, HISTORY_KEEP),
        max_bytes=HISTORY_MAX_BYTES,
        max_consumers=-1,
        max_msg_size=HISTORY_MAX_MSG_SIZE,
        max_msgs=-1,
        # Per group and service: a group's last `size` entries are always kept.
        max_msgs_per_subject=config.size,
        num_replicas=replicas,
        storage=StorageType.FILE,
        metadata={
            _EPOCH_KEY: epoch,
            _GROUPS_KEY: json.dumps(list(config.groups)),
            _SIZE_KEY: str(config.size),
            _AGE_KEY: repr(float(config.age)),
        },
    )


def history_settings(config: HistoryConfig) -> str:
    """Return ``config`` in words, for errors: groups, size, age."""
    return f"groups {list(config.groups)!r}, size {config.size}, age {config.age:g} s"


def check_stream(subjects: Subjects, stream: StreamConfig) -> tuple[HistoryConfig, str]:
    """Check the history stream; return the settings and epoch its metadata holds.

    Raises:
        ConfigError: the stream is not as wsbus makes it (what is wrong, and what to do).
    """
    name = subjects.history_stream
    wrong: list[str] = []
    expected = [subjects.history_subjects]
    if list(stream.subjects or []) != expected:
        wrong.append(f"its subjects are {stream.subjects!r}, not {expected!r}")
    if stream.allow_rollup_hdrs:
        wrong.append("it allows rollup headers (one publish could wipe a group's history)")
    if not stream.deny_purge:
        wrong.append("it allows purges")
    if not stream.deny_delete:
        wrong.append("it allows deleting messages")
    if not 0 < (stream.max_bytes or 0) <= HISTORY_MAX_BYTES:
        wrong.append(f"its largest size is {stream.max_bytes}, not at most {HISTORY_MAX_BYTES}")
    for attribute in ("mirror", "sources", "republish", "subject_transform"):
        if getattr(stream, attribute, None):
            wrong.append(f"it has a {attribute.replace('_', ' ')}")
    if stream.sealed:
        wrong.append("it is sealed")
    metadata = stream.metadata or {}
    config: HistoryConfig | None = None
    epoch = metadata.get(_EPOCH_KEY, "")
    try:
        groups = json.loads(metadata[_GROUPS_KEY])
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise ValueError(groups)
        config = HistoryConfig(
            groups=tuple(groups), size=int(metadata[_SIZE_KEY]), age=float(metadata[_AGE_KEY])
        )
    except (KeyError, ValueError, ConfigError):
        wrong.append("its metadata does not hold wsbus's history settings")
    if not (0 < len(epoch) <= 16 and epoch.isascii() and epoch.isalnum()):
        wrong.append("its metadata has no valid epoch")
    if config is not None:
        if stream.max_msgs_per_subject != config.size:
            wrong.append(
                f"it keeps {stream.max_msgs_per_subject} entries per subject, not its "
                f"size ({config.size})"
            )
        kept = max(config.age, HISTORY_KEEP)
        if not math.isclose(stream.max_age or 0.0, kept, rel_tol=1e-9):
            wrong.append(f"its entries expire after {stream.max_age} s, not {kept:g} s")
    if wrong or config is None:
        raise ConfigError(
            f"the NATS stream {name} (wsbus group history) is not as wsbus makes it: "
            f"{'; '.join(wrong)}. Someone else made it, or an older wsbus did: stop every "
            f"wsbus process of this deployment, delete it (nats stream rm {name}) and start "
            "a gateway first, which makes it anew"
        )
    return config, epoch


async def open_history(
    js: JetStreamContext, subjects: Subjects, *, wanted: HistoryConfig | None, replicas: int
) -> tuple[HistoryConfig, str] | None:
    """Open the history stream, checked; return its settings and epoch.

    Args:
        js: the JetStream context.
        subjects: the deployment's subjects.
        wanted: a gateway's settings: the stream is made with them when missing, and
            must have them when it exists. None (a service instance): read only.
        replicas: the stream's replicas, when this process makes it.

    Returns:
        The settings and epoch; None when the stream does not exist and ``wanted`` is None.

    Raises:
        ConfigError: the stream is not as wsbus makes it, or (``wanted``) was made with
            other settings.
        nats.errors.Error: JetStream cannot be reached.
    """
    name = subjects.history_stream
    try:
        info = await js.stream_info(name)
    except nats.js.errors.NotFoundError:
        if wanted is None:
            return None
        epoch = os.urandom(4).hex()
        try:
            info = await js.add_stream(
                stream_config(subjects, wanted, replicas=replicas, epoch=epoch)
            )
        except nats.js.errors.BadRequestError:
            # Made by another gateway meanwhile: check that one.
            info = await js.stream_info(name)
        else:
            log.info("made the history stream %s (%s)", name, history_settings(wanted))
    found, epoch = check_stream(subjects, info.config)
    if wanted is not None and found != wanted:
        raise ConfigError(
            f"this gateway keeps history with {history_settings(wanted)}, but the NATS "
            f"stream {name} holds history with {history_settings(found)}: every gateway of "
            "a deployment must have the same [gateway.history] settings. Give this gateway "
            "those, or, to change them, stop every wsbus process of this deployment, delete "
            f"the stream (nats stream rm {name}: its history is lost) and start a gateway "
            "with the new settings first"
        )
    return found, epoch


class _Tail(NamedTuple):
    """A group's last entry as a service instance knows it (seq 0: none)."""

    seq: int
    epoch: str
    offset: int


class HistoryWriter:
    """A service instance's appends to the history stream (one at a time, in order).

    Args:
        link: the instance's NATS link.
        subjects: the deployment's subjects.
        service: the service's name (the last token of its history subjects).
        counters: where to count.
    """

    def __init__(
        self, link: Link, subjects: Subjects, service: str, counters: HistoryCounters
    ) -> None:
        self._link = link
        self._subjects = subjects
        self._service = service
        self.counters = counters
        self._js = link.nc.jetstream(timeout=link.config.request_timeout)
        self._tails: OrderedDict[str, _Tail] = OrderedDict()
        self._warn = RateLimitedLog(log)
        self._key = os.urandom(16)  # of this writer's Nats-Msg-Id nonces
        self.config: HistoryConfig | None = None
        """The stream's settings; None while no stream was found (no gateway keeps any)."""
        self.epoch = ""
        self._read_at = -math.inf

    def stale(self, every: float) -> bool:
        """True when the settings were last read more than ``every`` seconds ago."""
        return time.monotonic() - self._read_at > every

    async def refresh(self) -> HistoryConfig | None:
        """Read the stream's settings again; return them (None: no stream seen yet).

        A stream that was seen and is gone keeps its settings here: sends to its groups
        fail (never go without a position) until a gateway makes it anew.

        Raises:
            ConfigError: the stream is not as wsbus makes it.
            BusUnavailable: JetStream cannot be reached.
        """
        try:
            found = await open_history(self._js, self._subjects, wanted=None, replicas=1)
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusUnavailable(f"the history stream cannot be read ({exc!r})") from None
        self._read_at = time.monotonic()
        if found is None:
            if self.config is not None:
                # Deleted under a running deployment: its groups still keep history
                # (their sends fail) until a gateway makes the stream anew.
                self._warn.warning(
                    "stream gone",
                    "the history stream %s is gone: sends to groups keeping history fail "
                    "until a gateway makes it anew (restart one)",
                    self._subjects.history_stream,
                )
            return self.config
        config, epoch = found
        if epoch != self.epoch:
            if self.epoch:
                log.warning(
                    "the history stream %s was made anew (epoch %s, was %s): groups start new runs",
                    self._subjects.history_stream,
                    epoch,
                    self.epoch,
                )
            self._tails.clear()
        self.config, self.epoch = config, epoch
        return config

    async def append(self, group: str, envelope: Envelope) -> Envelope:
        """Append ``envelope`` to ``group``'s history; return it stamped with its position.

        Raises:
            BusUnavailable: it could not be appended (JetStream down or refusing, the
                group's tail kept moving, the group's name too long for a subject): the
                envelope must not be sent.
        """
        return (await self.append_at(group, envelope))[0]

    async def append_at(self, group: str, envelope: Envelope) -> tuple[Envelope, int]:
        """As :meth:`append`; also return the entry's stream sequence.

        Gateways check a positioned envelope against the entry at that sequence before
        they believe its position (:meth:`HistoryReader.holds`).

        Raises:
            BusUnavailable: as :meth:`append`.
        """
        try:
            return await self._append(group, envelope)
        except BusUnavailable:
            self.counters.append_failures += 1
            raise
        except (nats.errors.Error, TimeoutError) as exc:
            self.counters.append_failures += 1
            self._tails.pop(group, None)
            raise BusUnavailable(
                f"the history of group {group!r} could not be appended to ({exc!r})",
                whole_bus=False,
            ) from None

    async def _append(self, group: str, envelope: Envelope) -> tuple[Envelope, int]:
        subjects = self._subjects
        subject = subjects.history(group, self._service)
        every = subjects.history_group(group)
        if len(subject) - len(subjects.prefix) - len(self._service) > GROUP_TOKEN_LIMIT + 8:
            raise BusUnavailable(
                f"group {group[:40]!r}... is too long a name to keep history on NATS "
                f"(at most {GROUP_TOKEN_LIMIT // 2} bytes)",
                whole_bus=False,
            )
        stream = subjects.history_stream
        deadline = time.monotonic() + self._link.config.request_timeout
        # The de-duplication id: the envelope's id (not secret: clients see it) and a keyed
        # digest of it only this writer can make (the same for each retry of the envelope),
        # so that nobody can store an entry under a future envelope's id first and make its
        # append a "duplicate".
        nonce = hashlib.blake2b(envelope.id.encode(), key=self._key, digest_size=8)
        msg_id = f"{envelope.id}.{nonce.hexdigest()}"
        for attempt in range(APPEND_ATTEMPTS):
            if attempt > 1:
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(random.uniform(0, BACKOFF * 2 ** min(attempt - 2, 4)))
            tail = self._tails.get(group)
            if tail is None:
                tail = await self._tail(every)
            if tail.offset == 0:
                # No entry left: a new run (the previous offsets went with their entries).
                position = Position(f"{self.epoch}-{os.urandom(4).hex()}", 1)
            else:
                position = Position(tail.epoch, tail.offset + 1)
            stamped = stamp(envelope, group, position)
            headers = {
                _MSG_ID: msg_id,
                _EXPECTED_STREAM: stream,
                _EXPECTED_LAST: str(tail.seq),
                _EXPECTED_LAST_SUBJECT: every,
                PREVIOUS_HEADER: str(tail.seq),
            }
            try:
                payload = encode_envelope(stamped)
                ack = await answered(
                    functools.partial(self._js.publish, subject, payload, headers=headers),
                    self._js,
                    stream,
                    max(0.0, deadline - time.monotonic()),
                )
            except nats.js.errors.NoStreamResponseError:
                self._read_at = -math.inf  # gone: read its settings again before the next
                raise BusUnavailable(
                    f"the history stream {stream} is gone (no gateway made it anew yet)",
                    whole_bus=False,
                ) from None
            except nats.js.errors.APIError as exc:
                if exc.err_code not in WRONG_LAST_SEQUENCE:
                    raise BusUnavailable(
                        f"JetStream refused an entry of group {group!r}'s history (error "
                        f"code {exc.err_code}: {exc.description})",
                        whole_bus=False,
                    ) from None
                self.counters.conflicts += 1
                self._tails.pop(group, None)
                # Our own earlier attempt may be what is stored (it timed out after the
                # server stored it): the sequence is checked before de-duplication.
                last = await self._entry(every)
                if last is not None and last[0] is not None and last[0].id == envelope.id:
                    self.counters.duplicates += 1
                    return last[0], last[1]
                continue
            if ack.duplicate:
                self.counters.duplicates += 1
                self._tails.pop(group, None)
                last = await self._entry(subject)
                if last is not None and last[0] is not None and last[0].id == envelope.id:
                    return last[0], last[1]
                raise BusUnavailable(
                    f"{envelope.id} was appended to group {group!r}'s history before, at a "
                    "position not known here",
                    whole_bus=False,
                )
            self._remember(group, _Tail(ack.seq, position.epoch, position.offset))
            self.counters.appends += 1
            return stamped, ack.seq
        raise BusUnavailable(
            f"group {group!r}'s history kept moving under this instance's attempts to "
            f"append to it for {self._link.config.request_timeout:g} s (many writers at once)",
            whole_bus=False,
        )

    def _remember(self, group: str, tail: _Tail) -> None:
        tails = self._tails
        tails[group] = tail
        tails.move_to_end(group)
        if len(tails) > TAILS_LIMIT:
            tails.popitem(last=False)

    async def _tail(self, subject: str) -> _Tail:
        """The group's last entry (``subject``: every service's entries of it)."""
        last = await self._entry(subject)
        if last is None:
            return _Tail(0, "", 0)
        envelope, seq = last
        found = position_of(envelope) if envelope is not None else None
        if found is None or not found[1].epoch.startswith(f"{self.epoch}-"):
            # Not an entry wsbus made, or one of a stream made anew: a new run after it.
            return _Tail(seq, "", 0)
        return _Tail(seq, found[1].epoch, found[1].offset)

    async def _entry(self, subject: str) -> tuple[Envelope | None, int] | None:
        """The last entry on ``subject`` (wildcards allowed) and its stream sequence.

        None when there is none; the envelope None when the entry is not one.
        """
        try:
            stream = self._subjects.history_stream
            raw = await answered(
                lambda: self._js.get_msg(stream, subject=subject, direct=True),
                self._js,
                stream,
                self._link.config.request_timeout,
            )
        except nats.js.errors.NotFoundError:
            return None
        seq = raw.seq or 0
        try:
            return decode_envelope(raw.data or b""), seq
        except (msgspec.DecodeError, msgspec.ValidationError):
            self.counters.mismatches += 1
            return None, seq


class HistoryReader:
    """A gateway's reads of the history stream.

    Args:
        link: the gateway's NATS link.
        subjects: the deployment's subjects.
        age: the settings' age: an entry older than this is not replayed.
        counters: where to count.
    """

    def __init__(
        self, link: Link, subjects: Subjects, age: float, counters: HistoryCounters
    ) -> None:
        self._link = link
        self._subjects = subjects
        self._age = age
        self.counters = counters
        self._timeout = link.config.request_timeout
        # How long a read keeps trying while JetStream does not answer (an election).
        self._wait = max(self._timeout, LEADER_WAIT)
        self._js = link.nc.jetstream(timeout=self._timeout)
        self._warn = RateLimitedLog(log)

    async def read(self, group: str, after: Position, limit: int) -> list[Envelope] | None:
        """Return ``group``'s entries after ``after``, oldest first, at most ``limit``.

        None when they cannot all be given: ``after`` is of another epoch (run), an entry
        after it is gone (trimmed by count) or older than the age, or an entry is not one
        wsbus made. While JetStream does not answer (a leader being elected after a NATS
        node's loss) the read keeps trying, for up to :data:`LEADER_WAIT` seconds in all
        (``request_timeout`` when longer).

        Raises:
            BusUnavailable: the stream cannot be read now (it did not answer in that time).
        """
        self.counters.reads += 1
        try:
            return await self._read(group, after, limit)
        except (nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError):
            return None  # no stream: nothing is kept
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusUnavailable(f"the history stream cannot be read ({exc!r})") from None

    async def _read(self, group: str, after: Position, limit: int) -> list[Envelope] | None:
        subjects = self._subjects
        every = subjects.history_group(group)
        stream = subjects.history_stream
        # One deadline for every request of the read.
        deadline = time.monotonic() + self._wait
        try:
            # From the stream's leader (not a direct get, which any replica may answer, a
            # follower a moment behind): a gateway asks for what it knows exists.
            raw = await answered(
                lambda: self._js.get_msg(stream, subject=every, direct=False),
                self._js,
                stream,
                _left(deadline),
                read=True,
            )
        except nats.js.errors.NotFoundError:
            return None
        last = self._check(raw.subject or "", raw.data or b"", group)
        if last is None or last[1].epoch != after.epoch or last[1].offset < after.offset:
            return None
        missing = last[1].offset - after.offset
        if missing <= 0:
            return []
        if missing <= WALK_LIMIT:
            walked = await self._walk(raw, last, group, after, deadline)
            if walked is not None:
                return walked[:limit] if walked else None
        wanted = min(limit, missing)
        # A consumer needs JetStream's meta leader (which may be electing a new one after
        # a NATS node's loss, even once the stream has its leader) and may be placed on a
        # node just lost, until the cluster sees it gone: tried again, within the read's
        # time, each attempt given up to request_timeout. After its first failure, a read
        # missing at most FALLBACK_WALK_LIMIT entries walks back instead (reads from the
        # stream's leader alone: no meta leader needed).
        walk = missing <= FALLBACK_WALK_LIMIT
        while True:
            try:
                return await self._consume(
                    group, after, wanted, min(self._timeout, max(_left(deadline), 0.1))
                )
            except (nats.errors.Error, TimeoutError) as exc:
                log.info("a history read of group %r failed (%r); trying again", group, exc)
                if walk:
                    walk = False
                    try:
                        walked = await self._walk(raw, last, group, after, deadline)
                    except (nats.errors.Error, TimeoutError) as again:
                        log.info("walking group %r's history failed too (%r)", group, again)
                    else:
                        if walked is not None:
                            return walked[:limit] if walked else None
                if _left(deadline) < CONSUMER_PAUSE:
                    raise
            await asyncio.sleep(CONSUMER_PAUSE)

    async def _consume(
        self, group: str, after: Position, wanted: int, budget: float
    ) -> list[Envelope] | None:
        """Read ``wanted`` entries after ``after`` with an ordered consumer, in ``budget`` s."""
        subjects = self._subjects
        entries: list[Envelope] = []
        expected = after.offset + 1
        link = self._link
        js = link.nc.jetstream(timeout=budget)
        async with asyncio.timeout(budget):
            sub = await js.subscribe(
                subjects.history_group(group),
                stream=subjects.history_stream,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.ALL,
                pending_msgs_limit=link.config.pending_msgs,
                pending_bytes_limit=link.config.pending_bytes,
            )
            try:
                while len(entries) < wanted:
                    msg = await sub.next_msg(timeout=budget)
                    entry = self._check(msg.subject, msg.data, group)
                    if entry is not None and entry[1].epoch == after.epoch:
                        offset = entry[1].offset
                        if offset > after.offset:
                            if offset != expected:
                                return None  # a hole: trimmed (or not dense)
                            if not entries and self._aged(msg.metadata.timestamp.timestamp()):
                                return None  # what follows `after` is older than age
                            entries.append(entry[0])
                            expected += 1
                    if msg.metadata.num_pending == 0:
                        break
            finally:
                try:
                    await sub.unsubscribe()
                except nats.errors.Error as exc:
                    log.debug("ending a history read: %r", exc)
        return entries

    async def _walk(
        self,
        raw: RawStreamMsg,
        last: tuple[Envelope, Position],
        group: str,
        after: Position,
        deadline: float,
    ) -> list[Envelope] | None:
        """Walk back from the group's last entry to the one after ``after``.

        Returns the entries, oldest first; ``[]`` when one is gone or past its age (the
        read answers None); None when the walk cannot be trusted (an entry without a
        previous entry's sequence, or not the one expected): the caller reads the group
        from its first entry instead.
        """
        stream = self._subjects.history_stream
        entries = [last[0]]
        offset = last[1].offset
        while offset > after.offset + 1:
            previous = (raw.headers or {}).get(PREVIOUS_HEADER, "")
            if not previous.isdigit() or int(previous) <= 0:
                return None
            try:
                seq = int(previous)
                raw = await answered(
                    functools.partial(self._js.get_msg, stream, seq=seq, direct=False),
                    self._js,
                    stream,
                    _left(deadline),
                    read=True,
                )
            except nats.js.errors.NotFoundError:
                return []  # trimmed
            entry = self._check(raw.subject or "", raw.data or b"", group)
            if entry is None or entry[1] != Position(after.epoch, offset - 1):
                return None
            entries.append(entry[0])
            offset -= 1
        if raw.time is not None and self._aged(raw.time.timestamp()):
            return []
        entries.reverse()
        return entries

    async def holds(
        self, group: str, position: Position, envelope: Envelope, seq: int
    ) -> bool | None:
        """Return True when the stream's entry ``seq`` is ``envelope`` at ``position``.

        A gateway's check of a position a service's message claims, before it believes
        it: the entry must be on ``group``'s subject for the envelope's sender, be that
        envelope (its id) with that group and position, and not be past its age (an old
        entry sent again). False when it is not; None when the stream cannot be read now
        (logged).

        While JetStream does not answer (the stream electing a leader after a NATS node's
        loss) the check keeps trying, as a read does (up to :data:`LEADER_WAIT` seconds):
        a genuine position is not given up for a moment's election (the message would
        reach clients without it, and again with it once the group's next message shows
        the hole). Meanwhile what its service sends after it waits, in order.
        """
        sender = envelope.sender
        if type(sender) is not ServiceAddress:
            return False
        stream = self._subjects.history_stream
        subject = self._subjects.history(group, sender.name)
        deadline = time.monotonic() + self._wait
        # A direct get first (lighter; any replica answers), then, unless it found the
        # entry, from the leader: a follower a moment behind may not hold it yet.
        for direct in (True, False):
            try:
                raw = await answered(
                    functools.partial(self._js.get_msg, stream, seq=seq, direct=direct),
                    self._js,
                    stream,
                    _left(deadline),
                    read=True,
                )
            except nats.js.errors.NotFoundError:
                continue
            except (nats.errors.Error, TimeoutError) as exc:
                self._warn.warning(
                    "history check",
                    "the position of %s (%s) to group %r could not be checked against the "
                    "history stream (%r): it is delivered without it",
                    envelope.type,
                    envelope.id,
                    group,
                    exc,
                )
                return None
            if raw.subject != subject:
                continue
            try:
                stored = decode_envelope(raw.data or b"")
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            if stored.id != envelope.id or position_of(stored) != (group, position):
                continue
            return raw.time is None or not self._aged(raw.time.timestamp())
        return False

    def _aged(self, stored: float) -> bool:
        """True when an entry stored at ``stored`` (the server's clock) is past its age."""
        return time.time() - stored > self._age

    def _check(self, subject: str, data: bytes, group: str) -> tuple[Envelope, Position] | None:
        """Return an entry and its position if wsbus made it for ``group``; None otherwise."""
        service = subject.rpartition(".")[2]
        try:
            envelope = decode_envelope(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            envelope = None
        found = position_of(envelope) if envelope is not None else None
        if (
            envelope is None
            or found is None
            or found[0] != group
            or type(envelope.sender) is not ServiceAddress
            or envelope.sender.name != service
        ):
            self.counters.mismatches += 1
            self._warn.warning(
                "history mismatch",
                "an entry of group %r's history on %s is not one wsbus made for it (its "
                "sender or group is not the one its subject names); ignored (check the NATS "
                "permissions: wsbus nats-config)",
                group,
                subject,
            )
            return None
        return envelope, found[1]


def _left(deadline: float) -> float:
    """Seconds left until ``deadline`` (``time.monotonic()``), at least 0."""
    return max(0.0, deadline - time.monotonic())
