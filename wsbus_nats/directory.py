"""Who is on the NATS bus: live gateways, live service instances and their types, aliases.

Kept in three JetStream key-value buckets (see :mod:`wsbus_nats.subjects`) and followed with
watches, so that every process holds the whole directory in memory and routing never waits
on it:

- each gateway puts its node id in ``P_gateways`` and each service instance
  ``<service>.<instance>`` (with its types) in ``P_services`` once per ``heartbeat``; an entry
  not refreshed within three heartbeats is dead, one deleted (a clean stop) at once. A
  gateway's node id is its own: one started with the node id of a live gateway is refused
  (``ConfigError``); a crashed one's is taken once its entry is dead;
- ``P_aliases`` maps each alias to the connection holding it. A claim is a key-value
  *create* (atomic across the cluster); an alias whose holder's gateway is dead is taken over
  with an *update* on the revision read, so two gateways racing for it cannot both win;
  a release deletes it on that revision, only when the releasing connection holds it.

Liveness is judged from the time each update is received here (no clocks compared across
machines), and ages stop while this process may be missing news (see ``_Table``). A
gateway cut off from NATS for longer than that may find its aliases taken over when it
comes back: it checks its claims then (``on_lapse``) and gives up those it lost.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any, Final

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from nats.js.kv import KeyValue

from wsbus.envelope import ConnId, NodeId, node_of
from wsbus.errors import BusUnavailable, ConfigError

from .buckets import bucket_specs, open_bucket
from .link import Link, RateLimitedLog, quietly
from .subjects import Subjects, is_token

__all__ = [
    "INSTANCES_LIMIT",
    "LIVE_HEARTBEATS",
    "REACH_HEARTBEATS",
    "TYPES_LIMIT",
    "Directory",
    "ServiceEntry",
    "alias_key",
]

log = logging.getLogger("wsbus.nats.directory")

LIVE_HEARTBEATS: Final = 3
"""An entry not refreshed within this many heartbeats is dead."""
QUIET_HEARTBEATS: Final = 1.5
"""Ages stop this many heartbeats after a table's last news (or check that its watch
works): a watch that died with a server is not found out at once."""
REACH_HEARTBEATS: Final = 30
"""Envelopes still go to a gateway or instance heard from within this many heartbeats
(one cut off for a moment misses nothing); as long as the buckets keep a dead entry."""
_KV_OPERATION: Final = "KV-Operation"
_MARKER_REASON: Final = "Nats-Marker-Reason"
_CLAIM_ATTEMPTS: Final = 8
INSTANCES_LIMIT: Final = 1000
"""Instances of one service a process takes from the directory, at most (more: ignored)."""
TYPES_LIMIT: Final = 1000
"""Types of one instance a process takes from the directory, at most (more: ignored)."""


class ServiceEntry(msgspec.Struct, frozen=True):
    """The value of a service instance's key in ``P_services``.

    Readers take the service and instance from the key (``<service>.<instance>``, the only
    keys that service's NATS user may write), never from here: a value naming another is
    ignored (a sender mismatch).
    """

    service: str
    instance: str
    types: list[str]


_ENCODE = msgspec.msgpack.Encoder().encode
_DECODE_SERVICE = msgspec.msgpack.Decoder(ServiceEntry).decode


class _Table:
    """One bucket as last seen: key -> (value, when its last update was received here).

    Entries age only while the table is known to be current. It is frozen (ages stop)
    while it may miss news: the link is down, this process's own heartbeat cannot be
    written (JetStream is electing a leader, say: nobody else can write either), or the
    watch's consumer died with a server. It thaws when news arrives or the watch is made
    anew, every entry then getting a full window to be heard from; so nothing is declared
    dead for want of news, and a gateway cut off alone is dead for the others after three
    heartbeats.
    """

    def __init__(self, heartbeat: float) -> None:
        self.window = heartbeat * LIVE_HEARTBEATS
        self.reach = heartbeat * REACH_HEARTBEATS
        self.slack = heartbeat * QUIET_HEARTBEATS
        self.entries: dict[str, tuple[bytes, float]] = {}
        self.last_activity = time.monotonic()
        self.stale_since: float | None = None

    def update(self, key: str, value: bytes | None) -> bool:
        """Record an update (None: deleted); return True when the key set changed."""
        self.thaw()  # news arrives: the watch works and someone could write
        now = self.last_activity = time.monotonic()
        if value is None:
            return self.entries.pop(key, None) is not None
        is_new = key not in self.entries or self.entries[key][0] != value
        self.entries[key] = (value, now)
        return is_new

    def freeze(self, since: float | None = None) -> None:
        """Stop the ages as they were at ``since`` (default now): news may be missing.

        A watch found dead has missed news since its last: its ages stop back then.
        """
        if self.stale_since is None:
            now = time.monotonic()
            self.stale_since = now if since is None else min(since, now)

    def thaw(self) -> None:
        """Let the ages go on, everyone's from naught: each gets a full window to be heard.

        Those cut off with this process (a node's death, a bucket electing a leader)
        reconnect and write again a moment after it does, not at once; one that really
        died meanwhile is dead one window later.
        """
        if self.stale_since is None:
            return
        self.stale_since = None
        now = time.monotonic()
        self.entries = {key: (value, now) for key, (value, _) in self.entries.items()}

    def live(self, key: str) -> bool:
        """Heard from within the window (three heartbeats)."""
        return self._age(key) <= self.window

    def reachable(self, key: str) -> bool:
        """Heard from within the reach (``REACH_HEARTBEATS``)."""
        return self._age(key) <= self.reach

    def verified(self) -> None:
        """The watch was found working though quiet: the table is current as it is."""
        self.last_activity = time.monotonic()

    def _age(self, key: str) -> float:
        entry = self.entries.get(key)
        if entry is None:
            return math.inf
        now = self.stale_since if self.stale_since is not None else time.monotonic()
        # Time runs only as far as the table is known current: news, or a check that its
        # watch works, comes every heartbeat or so; past that, a quiet table may be a
        # dead watch not found out yet, and nobody dies of it.
        return min(now, self.last_activity + self.slack) - entry[1]


class Directory:
    """This process's view of the bus, and its own heartbeat entry in it.

    Args:
        link: the process's NATS link (connected).
        subjects: the deployment's subjects and bucket names.
        node: for a gateway, its node id (put in ``P_gateways``).
        service: for a service instance, its entry (put in ``P_services``).
        on_change: called when the set of gateways or service instances changes.
        on_lapse: called when this process's heartbeat is written after a gap long
            enough for the others to have taken it for dead (a gateway then checks that
            its aliases are still its own).
    """

    def __init__(
        self,
        link: Link,
        subjects: Subjects,
        *,
        node: NodeId | None = None,
        service: ServiceEntry | None = None,
        on_change: Callable[[], None] | None = None,
        on_lapse: Callable[[], None] | None = None,
    ) -> None:
        self.link = link
        self.subjects = subjects
        self.config = link.config
        self.node = node
        self.service = service
        self._on_change = on_change
        self._on_lapse = on_lapse
        self._writes_ok = True
        self._last_write = time.monotonic()
        heartbeat = self.config.heartbeat
        self._gateways = _Table(heartbeat)
        self._services = _Table(heartbeat)
        # type -> {service: how many of its instances declared it}
        self._by_type: dict[str, dict[str, int]] = {}
        self._instances: dict[str, set[str]] = {}  # service -> its instance keys
        self._indexed: dict[str, tuple[str, frozenset[str]]] = {}  # key -> service, types
        self._warn = RateLimitedLog(log)
        self._seen_nodes: dict[str, float] = {}  # gateways seen in traffic, not yet listed
        self._js: JetStreamContext | None = None
        self._buckets: dict[str, KeyValue] = {}
        self._watches: dict[str, Any] = {}  # bucket -> its watch subscription
        self._tasks: set[asyncio.Task[None]] = set()
        self._heartbeat: asyncio.Task[None] | None = None
        self._keeper: asyncio.Task[None] | None = None
        # A gateway's entry holds a token of its own: another gateway with the same node
        # id writing over it is seen (and logged) by both.
        self._token = os.urandom(8).hex().encode()
        self._node_last: int | None = None  # the revision to take the node id on (0: none)
        self._owns_node = False
        self._namesake_said = -math.inf
        self._closed = False

    # -- life ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Open (or create) the buckets, put this process's entry, load and follow the rest.

        A gateway takes its node id first (see :meth:`check_node`, called here unless
        the caller did so before).

        Raises:
            BusUnavailable: JetStream is not reachable (the server must run with ``-js``).
            ConfigError: a live gateway has this gateway's node id.
        """
        await self._open()
        if self.node is not None and self._node_last is None:
            await self.check_node()
        try:
            if self.node is not None:
                await self._take_node()
            await self._put_own()
            self._last_write = time.monotonic()
            await self._watch_all()
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusUnavailable(
                f"the wsbus directory in NATS JetStream is not reachable ({exc!r}); the NATS "
                "server must run with JetStream (nats-server -js)"
            ) from None
        # Two tasks: the heartbeat must go on while a watch is being made anew (that may
        # take the whole request timeout), or this process would look dead meanwhile.
        self._heartbeat = asyncio.create_task(self._beat(), name="wsbus-nats-heartbeat")
        self._keeper = asyncio.create_task(self._keep_watching(), name="wsbus-nats-watches")

    async def _open(self) -> None:
        """Open (or create) the three buckets, once."""
        if self._buckets:
            return
        config = self.config
        self._js = self.link.nc.jetstream(timeout=config.request_timeout)
        try:
            # Gateways make the buckets; a service instance that logs in waits for them
            # (its user may not create them: see wsbus_nats.buckets), one on a server
            # open to all (where nothing is protected anyway) makes them too. Each is
            # checked.
            create = self.node is not None or not config.authenticates
            for spec in bucket_specs(self.subjects, config.heartbeat):
                self._buckets[spec.name] = await open_bucket(
                    self._js,
                    spec,
                    replicas=config.kv_replicas,
                    create=create,
                    wait=config.heartbeat,
                )
        except (nats.errors.Error, TimeoutError) as exc:
            self._buckets.clear()
            raise BusUnavailable(
                f"the wsbus directory in NATS JetStream is not reachable ({exc!r}); the NATS "
                "server must run with JetStream (nats-server -js)"
            ) from None

    async def check_node(self) -> None:
        """For a gateway: make sure no live gateway has its node id; wait if need be.

        Two gateways with one node id would number their connections alike and each get
        the other's traffic, so the second is refused. Free at once: no entry, or one
        deleted (its gateway stopped cleanly). An entry written again within three
        heartbeats is a live gateway's: refused. One not written for three heartbeats is
        a dead gateway's (crashed): taken over, so a gateway restarted after a crash
        starts within three heartbeats. Call it before subscribing to the gateway's
        subjects (so that a refused gateway never hears the live one's traffic);
        :meth:`start` then takes the entry atomically (a gateway that started meanwhile
        with the same id makes one of the two refused).

        Raises:
            ConfigError: a live gateway has this node id.
            BusUnavailable: JetStream is not reachable.
        """
        node = self.node
        assert node is not None
        await self._open()
        kv = self._buckets[self.subjects.gateways_bucket]
        heartbeat = self.config.heartbeat
        try:
            try:
                entry = await kv.get(node)
            except nats.js.errors.KeyNotFoundError:
                self._node_last = 0
                return
            first = entry.revision
            log.info(
                "gateway %s: its node id is in the directory; waiting up to %g s to see "
                "whether that gateway is alive",
                node,
                heartbeat * LIVE_HEARTBEATS,
            )
            loop = asyncio.get_running_loop()
            deadline = loop.time() + heartbeat * LIVE_HEARTBEATS
            while loop.time() < deadline:
                await asyncio.sleep(heartbeat / 4)
                try:
                    entry = await kv.get(node)
                except nats.js.errors.KeyNotFoundError:
                    self._node_last = 0  # it stopped cleanly meanwhile
                    return
                if entry.revision != first:
                    raise _node_in_use(node)
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusUnavailable(
                f"the wsbus directory in NATS JetStream is not reachable ({exc!r})"
            ) from None
        log.info("gateway %s: the gateway that had its node id is gone; taking its place", node)
        self._node_last = first

    async def _take_node(self) -> None:
        """Write this gateway's entry first on the revision :meth:`check_node` saw."""
        node = self.node
        assert node is not None
        kv = self._buckets[self.subjects.gateways_bucket]
        try:
            if not self._node_last:
                await kv.create(node, self._token)
            else:
                await kv.update(node, self._token, last=self._node_last)
        except nats.js.errors.KeyWrongLastSequenceError:
            raise _node_in_use(node) from None
        self._owns_node = True

    async def close(self) -> None:
        """Stop the heartbeat and the watches; delete this process's entry. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for task in (self._heartbeat, self._keeper):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.link.connected and self._buckets:
            # Deleted, not left to age: others free this gateway's aliases (or stop
            # routing to this instance) at once.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.config.request_timeout):
                    await self._delete_own()
        await self._unwatch()

    def disconnected(self) -> None:
        """Freeze the directory while the link is down (nothing dies for want of news)."""
        self._gateways.freeze()
        self._services.freeze()

    def reconnected(self) -> None:
        """Put this process's entry again and reload the rest (after a reconnection).

        The watches' consumers may have died with a server: they are made anew (and
        again on each heartbeat until that works).
        """
        if self._closed:
            return
        self.disconnected()
        task = asyncio.create_task(self._rewatch(), name="wsbus-nats-rewatch")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _rewatch(self) -> None:
        try:
            async with asyncio.timeout(self.config.heartbeat):
                await self._put_own()
        except Exception as exc:
            log.info("the directory heartbeat after a reconnection failed: %r", exc)
        else:
            self._wrote()
        for bucket, table in self._tables():
            await self._rewatch_one(bucket, table)

    async def _rewatch_one(self, bucket: str, table: _Table) -> bool:
        """Make a bucket's watch anew; return False (the table left stale) if that failed."""
        table.freeze(table.last_activity)
        old = self._watches.pop(bucket, None)
        if old is not None:
            await quietly(old.unsubscribe(), self.config.request_timeout)
        try:
            await self._watch(bucket, table)
        except Exception as exc:
            log.info("following %s failed: %r (retrying each heartbeat)", bucket, exc)
            return False
        table.thaw()
        log.info("following %s again", bucket)
        return True

    async def _check_watches(self) -> None:
        """Thaw tables that may, and make anew any watch whose consumer is gone.

        Each process heartbeats its own entry, so a table hears news every heartbeat
        while anyone is alive; a quiet or frozen one has its consumer asked about.
        """
        heartbeat = self.config.heartbeat
        for bucket, table in self._tables():
            sub = self._watches.get(bucket)
            quiet = time.monotonic() - table.last_activity > heartbeat
            if sub is not None and not quiet and table.stale_since is None:
                continue
            if sub is not None:
                try:
                    async with asyncio.timeout(heartbeat):
                        await sub.consumer_info()
                except Exception as exc:
                    log.info("the watch of %s is gone: %r", bucket, exc)
                else:
                    # The watch works: the table is quiet because everyone is. Its ages
                    # go on once this process can write too (then others can as well).
                    if self._writes_ok:
                        table.thaw()
                        table.verified()
                    continue
            await self._rewatch_one(bucket, table)

    def _tables(self) -> list[tuple[str, _Table]]:
        subjects = self.subjects
        return [
            (subjects.gateways_bucket, self._gateways),
            (subjects.services_bucket, self._services),
        ]

    async def _put_own(self) -> None:
        if self.node is not None:
            await self._buckets[self.subjects.gateways_bucket].put(self.node, self._token)
        if self.service is not None:
            key = f"{self.service.service}.{self.service.instance}"
            await self._buckets[self.subjects.services_bucket].put(key, _ENCODE(self.service))

    async def _delete_own(self) -> None:
        if self.node is not None and self._owns_node:
            kv = self._buckets[self.subjects.gateways_bucket]
            # Only this gateway's own entry: never a live namesake's.
            entry = await kv.get(self.node)
            if entry.value == self._token:
                await kv.delete(self.node, last=entry.revision)
        if self.service is not None:
            key = f"{self.service.service}.{self.service.instance}"
            await self._buckets[self.subjects.services_bucket].delete(key)

    async def _beat(self) -> None:
        heartbeat = self.config.heartbeat
        while True:
            await asyncio.sleep(heartbeat)
            if not self.link.connected:
                continue
            try:
                # Bounded by a heartbeat: a put stuck on a leaderless stream must not
                # hold the next one up.
                async with asyncio.timeout(heartbeat):
                    await self._put_own()
            except Exception as exc:
                if self._writes_ok:
                    log.warning("the directory heartbeat failed: %r (retrying)", exc)
                self._writes_ok = False
                # Nobody else may be able to write either: let no one die meanwhile.
                self._gateways.freeze(self._last_write)
                self._services.freeze(self._last_write)
            else:
                self._wrote()

    async def _keep_watching(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat)
            if not self.link.connected:
                continue
            try:
                await self._check_watches()
            except Exception as exc:
                log.warning("checking the directory's watches failed: %r", exc)

    def _wrote(self) -> None:
        """This process's heartbeat was written: note a lapse the others may have seen."""
        now = time.monotonic()
        last, self._last_write = self._last_write, now
        if not self._writes_ok:
            log.info("the directory heartbeat works again")
        self._writes_ok = True
        window = self._gateways.window - self.config.heartbeat
        if now - last > window and self._on_lapse is not None:
            self._on_lapse()

    async def _watch_all(self) -> None:
        for bucket, table in self._tables():
            await self._watch(bucket, table)

    async def _watch(self, bucket: str, table: _Table) -> None:
        """Follow a bucket; return once what it held is loaded."""
        assert self._js is not None
        prefix = f"$KV.{bucket}."
        loaded = asyncio.get_running_loop().create_future()
        services = table is self._services

        async def on_update(msg: Msg) -> None:
            key = msg.subject[len(prefix) :]
            headers = msg.headers or {}
            deleted = _KV_OPERATION in headers or _MARKER_REASON in headers
            meta = msg.metadata
            if (
                not services
                and key == self.node
                and self._owns_node
                and not deleted
                and msg.data != self._token
            ):
                self._namesake()
            if table.update(key, None if deleted else msg.data):
                if services:
                    self._index(key, None if deleted else msg.data)
                if self._on_change is not None:
                    self._on_change()
            if meta.num_pending == 0 and not loaded.done():
                loaded.set_result(None)

        sub = await self._js.subscribe(
            f"{prefix}>",
            stream=f"KV_{bucket}",
            cb=on_update,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            pending_msgs_limit=self.config.pending_msgs,
            pending_bytes_limit=self.config.pending_bytes,
        )
        self._watches[bucket] = sub
        info = await sub.consumer_info()
        # Loaded at once only when the server has delivered nothing at all (an empty
        # bucket). Not "nothing pending and nothing processed here": entries the server
        # has sent may not have reached on_update yet, and the table would start empty
        # (a gateway then answered no_route for a live service, about 1 start in 250).
        # Otherwise the entry that leaves nothing pending sets it, in on_update.
        delivered = info.delivered.consumer_seq if info.delivered is not None else 0
        if info.num_pending == 0 and delivered == 0 and not loaded.done():
            loaded.set_result(None)
        async with asyncio.timeout(self.config.request_timeout):
            await loaded

    def _namesake(self) -> None:
        """Another gateway wrote this one's entry: both have one node id (said once a minute)."""
        now = time.monotonic()
        if now - self._namesake_said < 60:
            return
        self._namesake_said = now
        log.error(
            "another gateway with node id %r writes this gateway's directory entry (it "
            "took this one for dead while it was cut off?): both number their connections "
            "alike and may get each other's traffic; stop one of them and give each "
            "gateway its own --node",
            self.node,
        )

    async def _unwatch(self) -> None:
        watches, self._watches = self._watches, {}
        for sub in watches.values():
            await quietly(sub.unsubscribe(), self.config.request_timeout)

    def _index(self, key: str, value: bytes | None) -> None:
        """Index one instance's entry anew (None: gone). Only that key is decoded.

        The service and instance are the key's two tokens, the only keys the service's
        NATS user may write: a value that names another is a sender mismatch, ignored.
        """
        self._unindex(key)
        if value is None:
            return
        service, dot, instance = key.partition(".")
        if not (dot and is_token(service) and is_token(instance)):
            self._mismatch(key, "a key that is not <service>.<instance>")
            return
        try:
            entry = _DECODE_SERVICE(value)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self._mismatch(key, "a value that is not a service entry")
            return
        if entry.service != service or entry.instance != instance:
            self._mismatch(key, f"a value naming {entry.service}.{entry.instance}")
            return
        keys = self._instances.setdefault(service, set())
        if len(keys) >= INSTANCES_LIMIT:
            self._warn.warning(
                "instances",
                "service %r has more than %d instances in the directory; %s is ignored",
                service,
                INSTANCES_LIMIT,
                key,
            )
            return
        types = frozenset(entry.types)
        if len(types) > TYPES_LIMIT:
            self._warn.warning(
                "types",
                "instance %s declares %d types, more than %d; it is ignored",
                key,
                len(types),
                TYPES_LIMIT,
            )
            if not keys:
                del self._instances[service]
            return
        keys.add(key)
        self._indexed[key] = (service, types)
        for type_ in types:
            counts = self._by_type.setdefault(type_, {})
            counts[service] = counts.get(service, 0) + 1

    def _unindex(self, key: str) -> None:
        indexed = self._indexed.pop(key, None)
        if indexed is None:
            return
        service, types = indexed
        keys = self._instances.get(service)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._instances[service]
        for type_ in types:
            counts = self._by_type.get(type_)
            if counts is None:
                continue
            left = counts.get(service, 0) - 1
            if left > 0:
                counts[service] = left
            else:
                counts.pop(service, None)
                if not counts:
                    del self._by_type[type_]

    def _mismatch(self, key: str, what: str) -> None:
        self.link.counters.sender_mismatches += 1
        self._warn.warning(
            "entry",
            "the directory's service entry %s holds %s: ignored (only <service>.<instance> "
            "keys with their own service's entry count; check the NATS permissions: wsbus "
            "nats-config)",
            key,
            what,
        )

    # -- reading -------------------------------------------------------------------------

    def gateway_live(self, node: str) -> bool:
        """Return True when gateway ``node`` is live (this process's own node always is).

        Live: heard from within three heartbeats. An alias held on a gateway that is not
        live may be taken over.
        """
        if node == self.node or self._gateways.live(node):
            return True
        seen = self._seen_nodes.get(node)
        return seen is not None and time.monotonic() - seen <= self._gateways.window

    def live_gateways(self) -> list[NodeId]:
        """Return the live gateways' node ids, sorted (those ``clients()`` asks)."""
        gateways = self._gateways
        nodes = {key for key in gateways.entries if gateways.live(key)}
        now = time.monotonic()
        nodes.update(n for n, seen in self._seen_nodes.items() if now - seen <= gateways.window)
        if self.node is not None:
            nodes.add(self.node)
        return [NodeId(node) for node in sorted(nodes)]

    def gateway_reachable(self, node: str) -> bool:
        """Return True when envelopes for gateway ``node`` are worth sending.

        Reachable: heard from within ``REACH_HEARTBEATS`` heartbeats and not gone
        cleanly. Wider than live on purpose: a gateway that was cut off for a few
        heartbeats and is back must miss nothing meant for its clients; sending to one
        that is really gone costs the bus a message nobody reads (its clients went with
        it).
        """
        if node == self.node or self._gateways.reachable(node):
            return True
        seen = self._seen_nodes.get(node)
        return seen is not None and time.monotonic() - seen <= self._gateways.reach

    def reachable_gateways(self) -> list[NodeId]:
        """Return the reachable gateways' node ids, sorted (where shared sends go)."""
        gateways = self._gateways
        nodes = {key for key in gateways.entries if gateways.reachable(key)}
        now = time.monotonic()
        nodes.update(n for n, seen in self._seen_nodes.items() if now - seen <= gateways.reach)
        if self.node is not None:
            nodes.add(self.node)
        return [NodeId(node) for node in sorted(nodes)]

    def saw_gateway(self, node: str) -> None:
        """Note that gateway ``node`` just sent something: it is live, listed yet or not.

        Closes the moment between a gateway's first message and its directory entry
        reaching this process.
        """
        if node not in self._gateways.entries:
            self._seen_nodes[node] = time.monotonic()
            if len(self._seen_nodes) > 1000:
                self._seen_nodes = dict(list(self._seen_nodes.items())[-500:])

    def service_live(self, service: str) -> bool:
        """Return True when an instance of ``service`` is reachable (see gateway_reachable).

        An instance cut off for a few heartbeats is still routed to: when it is really
        gone, a sender hears that no instance answers (``unavailable``), not ``no_route``;
        a service that stopped cleanly is ``no_route`` at once.
        """
        reachable = self._services.reachable
        return any(reachable(key) for key in self._instances.get(service, ()))

    def instance_live(self, service: str, instance: str) -> bool:
        """Return True when instance ``instance`` of ``service`` is live (3 heartbeats)."""
        return self._services.live(f"{service}.{instance}")

    def services_for(self, type: str) -> list[str]:
        """Return the services with a reachable instance that declared ``type``, sorted."""
        names = self._by_type.get(type)
        if not names:
            return []
        return sorted(name for name in names if self.service_live(name))

    def services(self) -> dict[str, int]:
        """Return each service with live instances and how many it has."""
        live = self._services.live
        counts = {name: sum(map(live, keys)) for name, keys in self._instances.items()}
        return {name: count for name, count in counts.items() if count}

    # -- aliases -------------------------------------------------------------------------

    async def claim_alias(self, alias: str, conn_id: ConnId) -> bool:
        """Claim ``alias`` for ``conn_id`` (see :class:`wsbus.bus.ClaimsAliases`).

        Raises:
            BusUnavailable: the alias table cannot be reached.
        """
        kv = self._buckets[self.subjects.aliases_bucket]
        key = alias_key(alias)
        value = conn_id.encode()
        try:
            for _ in range(_CLAIM_ATTEMPTS):
                try:
                    await kv.create(key, value)
                    return True
                except nats.js.errors.KeyWrongLastSequenceError:
                    pass
                try:
                    entry = await kv.get(key)
                except nats.js.errors.KeyNotFoundError:
                    continue  # released meanwhile: create again
                holder = (entry.value or b"").decode(errors="replace")
                if holder == conn_id:
                    return True
                if self.gateway_live(node_of(holder)):
                    return False
                try:
                    await kv.update(key, value, last=entry.revision)
                except nats.js.errors.KeyWrongLastSequenceError:
                    continue  # someone else moved first: look again
                log.info(
                    "alias %r taken over for %s from %s, whose gateway is gone",
                    alias,
                    conn_id,
                    holder,
                )
                return True
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusUnavailable(f"the alias table in NATS is not reachable ({exc!r})") from None
        raise BusUnavailable(f"the alias {alias!r} kept changing hands; try again", False)

    async def release_alias(self, alias: str, conn_id: ConnId) -> None:
        """Release ``alias`` if ``conn_id`` holds it (see :class:`wsbus.bus.ClaimsAliases`).

        Raises:
            BusUnavailable: the alias table cannot be reached.
        """
        kv = self._buckets[self.subjects.aliases_bucket]
        key = alias_key(alias)
        try:
            try:
                entry = await kv.get(key)
            except nats.js.errors.KeyNotFoundError:
                return
            if entry.value != conn_id.encode():
                return
            with contextlib.suppress(nats.js.errors.APIError):
                # A wrong revision: taken over meanwhile, so not ours to delete.
                await kv.delete(key, last=entry.revision)
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusUnavailable(f"the alias table in NATS is not reachable ({exc!r})") from None

    async def alias_holder(self, alias: str) -> ConnId | None:
        """Return the connection holding ``alias`` in the table, or None.

        Raises:
            BusUnavailable: the alias table cannot be reached.
        """
        kv = self._buckets[self.subjects.aliases_bucket]
        try:
            entry = await kv.get(alias_key(alias))
        except nats.js.errors.KeyNotFoundError:
            return None
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusUnavailable(f"the alias table in NATS is not reachable ({exc!r})") from None
        return ConnId((entry.value or b"").decode(errors="replace"))


def _node_in_use(node: str) -> ConfigError:
    return ConfigError(
        f"another gateway with node id {node!r} is on this NATS deployment (its directory "
        "entry is kept alive): give each gateway its own --node, or leave it out for a "
        "random one"
    )


def alias_key(alias: str) -> str:
    """Return the key-value key of an alias: its UTF-8 in URL-safe base64 (any alias fits)."""
    return base64.urlsafe_b64encode(alias.encode()).decode()
