"""The directory's key-value buckets: the stream configuration each must have, and its check.

Each bucket is a JetStream stream (``KV_<bucket>``). Whoever creates the stream chooses
what it stores and what it allows, so wsbus never takes a bucket on trust: a stream made
with extra subjects (``P.svc.chat.>``, say) would store other services' traffic where
anyone who reads the directory can read it, and one that allows rollup headers lets a
single publish wipe the whole table. So:

- only gateways create the buckets (``wsbus nats-config`` gives service users no
  ``STREAM.CREATE``), with exactly :func:`stream_config`; a service instance that starts
  first waits, saying so, until a gateway has made them;
- every process checks, when it opens a bucket, that its stream is as wsbus makes it
  (:func:`check_stream`), and refuses to start otherwise (a ``ConfigError`` saying what is
  wrong and what to do).

What a bucket must be: subjects exactly ``$KV.<bucket>.>``, one message per key (history 1),
no rollup headers (a rollup would purge every key), purge and message delete denied, a
largest message and a largest total size, no mirror, sources, republish or subject
transform, not sealed; the alias table never expires entries.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Final

import nats
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, StorageType, StreamConfig
from nats.js.kv import KeyValue

from wsbus.errors import BusUnavailable, ConfigError
from wsbus.history import HistoryConfig

from .config import NatsConfig, redact_url
from .history import open_history
from .subjects import Subjects

__all__ = [
    "SESSIONS_MAX_AGE",
    "BucketSpec",
    "bucket_specs",
    "check_stream",
    "make_buckets",
    "open_bucket",
    "sessions_spec",
    "stream_config",
]

log = logging.getLogger("wsbus.nats.buckets")

KIB: Final = 1024
MIB: Final = 1024 * KIB


@dataclass(frozen=True)
class BucketSpec:
    """What one of the directory's buckets is for and how big it may grow.

    Attributes:
        name: the bucket's name (``P_gateways``, ``P_services``, ``P_aliases``).
        max_msg_size: the largest entry, in bytes (key and headers included).
        max_bytes: the largest total size, in bytes.
        ttl: seconds an entry not written again is kept (None: for ever).
        discard_old: when full, the oldest entries go (heartbeated tables, whose live
            entries come back within a heartbeat); otherwise new writes are refused (the
            alias table: a live claim must never be dropped).
        entry_ttl: each entry may carry its own expiry (``Nats-TTL``, within ``ttl``):
            the sessions bucket, whose entries live for the resume window.
    """

    name: str
    max_msg_size: int
    max_bytes: int
    ttl: float | None
    discard_old: bool
    entry_ttl: bool = False

    @property
    def stream(self) -> str:
        """The name of the bucket's stream."""
        return f"KV_{self.name}"


def bucket_specs(subjects: Subjects, heartbeat: float) -> list[BucketSpec]:
    """Return the three buckets of a deployment: gateways, services, aliases.

    Entries of dead processes age out of the heartbeated buckets (their keys are random
    ids) after ``max(60, 30 * heartbeat)`` seconds; aliases never do (an alias held by a
    live connection must not expire).
    """
    ttl = max(60.0, 30 * heartbeat)
    return [
        BucketSpec(subjects.gateways_bucket, 4 * KIB, 8 * MIB, ttl, discard_old=True),
        # An instance's entry lists its types: 64 KiB is thousands of them.
        BucketSpec(subjects.services_bucket, 64 * KIB, 64 * MIB, ttl, discard_old=True),
        # Some 500,000 aliases of usual length.
        BucketSpec(subjects.aliases_bucket, 4 * KIB, 64 * MIB, None, discard_old=False),
    ]


SESSIONS_MAX_AGE: Final = 86400.0
"""The longest a closed session is kept (a day), whatever the resume window."""


def sessions_spec(subjects: Subjects) -> BucketSpec:
    """Return the sessions bucket (gateways only): closed sessions, one entry each.

    Each entry expires after its own time to live (the resume window); when the bucket is
    full, the oldest sessions go (a client then cannot resume: it starts anew).
    """
    return BucketSpec(
        subjects.sessions_bucket,
        1024 * KIB,
        256 * MIB,
        SESSIONS_MAX_AGE,
        discard_old=True,
        entry_ttl=True,
    )


def stream_config(spec: BucketSpec, replicas: int) -> StreamConfig:
    """Return the stream configuration wsbus creates bucket ``spec`` with."""
    return StreamConfig(
        name=spec.stream,
        subjects=[f"$KV.{spec.name}.>"],
        allow_direct=True,
        allow_rollup_hdrs=False,
        deny_delete=True,
        deny_purge=True,
        discard=DiscardPolicy.OLD if spec.discard_old else DiscardPolicy.NEW,
        duplicate_window=min(120.0, spec.ttl) if spec.ttl else 120.0,
        max_age=spec.ttl,
        max_bytes=spec.max_bytes,
        max_consumers=-1,
        max_msg_size=spec.max_msg_size,
        max_msgs=-1,
        max_msgs_per_subject=1,
        num_replicas=replicas,
        storage=StorageType.FILE,
        allow_msg_ttl=True if spec.entry_ttl else None,
    )


def check_stream(spec: BucketSpec, config: StreamConfig) -> None:
    """Refuse a bucket whose stream is not as wsbus makes it.

    Raises:
        ConfigError: what is wrong, and what to do (delete the stream; a gateway makes it
            anew).
    """
    wrong: list[str] = []
    expected = [f"$KV.{spec.name}.>"]
    if list(config.subjects or []) != expected:
        wrong.append(f"its subjects are {config.subjects!r}, not {expected!r}")
    if config.max_msgs_per_subject != 1:
        wrong.append(f"it keeps {config.max_msgs_per_subject} values per key, not 1")
    if config.allow_rollup_hdrs:
        wrong.append("it allows rollup headers (one publish could wipe it)")
    if not config.deny_purge:
        wrong.append("it allows purges")
    if not config.deny_delete:
        wrong.append("it allows deleting messages")
    if not 0 < (config.max_msg_size or 0) <= spec.max_msg_size:
        wrong.append(f"its largest entry is {config.max_msg_size}, not at most {spec.max_msg_size}")
    if not 0 < (config.max_bytes or 0) <= spec.max_bytes:
        wrong.append(f"its largest size is {config.max_bytes}, not at most {spec.max_bytes}")
    if spec.ttl is None and config.max_age:
        wrong.append(f"its entries expire after {config.max_age} s (aliases must not)")
    if spec.entry_ttl and not config.allow_msg_ttl:
        wrong.append("its entries cannot carry their own expiry (allow_msg_ttl)")
    if spec.entry_ttl and not 0 < (config.max_age or 0) <= (spec.ttl or 0) + 1:
        wrong.append(f"its entries are kept {config.max_age} s, not at most {spec.ttl}")
    for name in ("mirror", "sources", "republish", "subject_transform"):
        if getattr(config, name, None):
            wrong.append(f"it has a {name.replace('_', ' ')}")
    if config.sealed:
        wrong.append("it is sealed")
    if wrong:
        raise ConfigError(
            f"the NATS stream {spec.stream} (the wsbus bucket {spec.name}) is not as wsbus "
            f"makes it: {'; '.join(wrong)}. Someone else made it, or an older wsbus did: "
            f"stop every wsbus process of this deployment, delete it (nats stream rm "
            f"{spec.stream}) and start a gateway first, which makes it anew"
        )


async def open_bucket(
    js: JetStreamContext,
    spec: BucketSpec,
    *,
    replicas: int,
    create: bool,
    wait: float,
) -> KeyValue:
    """Open bucket ``spec``, checked; create it first when ``create`` and it is missing.

    Args:
        js: the JetStream context.
        spec: the bucket.
        replicas: its replicas, when this process creates it.
        create: this process may create it (gateways); otherwise it waits for it.
        wait: seconds between looks while waiting (a message is logged the first time).

    Raises:
        ConfigError: the bucket's stream is not as wsbus makes it.
        nats.errors.Error: JetStream cannot be reached.
    """
    said = False
    while True:
        try:
            info = await js.stream_info(spec.stream)
        except nats.js.errors.NotFoundError:
            if create:
                try:
                    info = await js.add_stream(stream_config(spec, replicas))
                except nats.js.errors.BadRequestError:
                    # Made by another gateway meanwhile: check that one.
                    info = await js.stream_info(spec.stream)
            else:
                if not said:
                    said = True
                    log.warning(
                        "the wsbus directory bucket %s does not exist yet: only gateways "
                        "create it; waiting for a gateway to start on this NATS deployment",
                        spec.name,
                    )
                await asyncio.sleep(wait)
                continue
        check_stream(spec, info.config)
        if said:
            log.info("the wsbus directory bucket %s exists now", spec.name)
        return await js.key_value(spec.name)


async def make_buckets(
    config: NatsConfig, history: HistoryConfig | None = None, node: str = "setup"
) -> None:
    """Connect as ``config``'s user (a gateway's) and make what gateways make, checked.

    The directory's three buckets, the sessions bucket and, given the gateways' ``history``
    settings, the history stream: what a gateway does at start, for a setup step that must
    come before any service instance starts (``wsbus demo --bus nats`` starts its services
    first). Without ``history`` the stream is left to the first gateway. ``node``: the
    gateway node whose user ``config`` has (its answers come to that node's inbox; any
    name for the ``gateways`` user).

    Raises:
        ConfigError: a bucket or the history stream exists and is not as wsbus makes it
            (or holds other history settings).
        BusUnavailable: NATS or its JetStream cannot be reached.
    """
    subjects = Subjects(config.prefix)
    options = config.connect_options()
    options.update(allow_reconnect=False, inbox_prefix=subjects.inbox("gw", node))
    try:
        nc = await nats.connect(**options)
    except Exception as exc:
        raise BusUnavailable(
            f"no NATS server could be reached at {', '.join(map(redact_url, config.servers))} "
            f"({config.scrub(repr(exc))})"
        ) from None
    try:
        js = nc.jetstream(timeout=config.request_timeout)
        for spec in [*bucket_specs(subjects, config.heartbeat), sessions_spec(subjects)]:
            await open_bucket(js, spec, replicas=config.kv_replicas, create=True, wait=0)
        if history is not None:
            await open_history(js, subjects, wanted=history, replicas=config.kv_replicas)
    except (nats.errors.Error, TimeoutError) as exc:
        raise BusUnavailable(
            f"the wsbus directory in NATS JetStream is not reachable ({exc!r}); the NATS "
            "server must run with JetStream (nats-server -js)"
        ) from None
    finally:
        await nc.close()
