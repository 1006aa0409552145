"""Who is on the NATS bus: live gateways, live service instances and their types, aliases.

Kept in three JetStream key-value buckets (see :mod:`wsbus_nats.subjects`) and followed with
watches, so that every process holds the whole directory in memory and routing never waits
on it:

- each gateway puts its node id in ``P_gateways`` and each service instance
  ``<service>.<instance>`` (with its types) in ``P_services`` once per ``heartbeat``; an entry
  not refreshed within three heartbeats is dead, one deleted (a clean stop) at once;
- ``P_aliases`` maps each alias to the connection holding it. A claim is a key-value
  *create* (atomic across the cluster); an alias whose holder's gateway is dead is taken over
  with an *update* on the revision read, so two gateways racing for it cannot both win;
  a release deletes it on that revision, only when the releasing connection holds it.

Liveness is judged from the time each update is received here and the server's timestamp
of the entry: after this process reconnects, an entry last written long ago is not taken
for live (the servers of a cluster must agree on the time to within a heartbeat).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
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
from wsbus.errors import BusUnavailable

from .link import Link
from .subjects import Subjects

__all__ = ["Directory", "ServiceEntry", "alias_key"]

log = logging.getLogger("wsbus.nats.directory")

LIVE_HEARTBEATS: Final = 3
"""An entry not refreshed within this many heartbeats is dead."""
_KV_OPERATION: Final = "KV-Operation"
_MARKER_REASON: Final = "Nats-Marker-Reason"
_CLAIM_ATTEMPTS: Final = 8


class ServiceEntry(msgspec.Struct, frozen=True):
    """The value of a service instance's key in ``P_services``."""

    service: str
    instance: str
    types: list[str]


_ENCODE = msgspec.msgpack.Encoder().encode
_DECODE_SERVICE = msgspec.msgpack.Decoder(ServiceEntry).decode


class _Table:
    """One bucket as last seen: key -> (value, when received here, server timestamp)."""

    def __init__(self, heartbeat: float) -> None:
        self.window = heartbeat * LIVE_HEARTBEATS
        self.entries: dict[str, tuple[bytes, float, float]] = {}
        self.newest = 0.0  # the newest server timestamp seen: the server's "now", nearly

    def update(self, key: str, value: bytes | None, created: float) -> bool:
        """Record an update (None: deleted); return True when the key set changed."""
        if value is None:
            return self.entries.pop(key, None) is not None
        if created > self.newest:
            self.newest = created
        is_new = key not in self.entries or self.entries[key][0] != value
        self.entries[key] = (value, time.monotonic(), created)
        return is_new

    def live(self, key: str) -> bool:
        entry = self.entries.get(key)
        if entry is None:
            return False
        _, seen, created = entry
        window = self.window
        return time.monotonic() - seen <= window and self.newest - created <= window


class Directory:
    """This process's view of the bus, and its own heartbeat entry in it.

    Args:
        link: the process's NATS link (connected).
        subjects: the deployment's subjects and bucket names.
        node: for a gateway, its node id (put in ``P_gateways``).
        service: for a service instance, its entry (put in ``P_services``).
        on_change: called when the set of gateways or service instances changes.
    """

    def __init__(
        self,
        link: Link,
        subjects: Subjects,
        *,
        node: NodeId | None = None,
        service: ServiceEntry | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.link = link
        self.subjects = subjects
        self.config = link.config
        self.node = node
        self.service = service
        self._on_change = on_change
        heartbeat = self.config.heartbeat
        self._gateways = _Table(heartbeat)
        self._services = _Table(heartbeat)
        self._by_type: dict[str, set[str]] = {}
        self._instances: dict[str, list[str]] = {}  # service -> its instance keys
        self._seen_nodes: dict[str, float] = {}  # gateways seen in traffic, not yet listed
        self._js: JetStreamContext | None = None
        self._buckets: dict[str, KeyValue] = {}
        self._watches: list[Any] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._heartbeat: asyncio.Task[None] | None = None
        self._closed = False

    # -- life ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Open (or create) the buckets, put this process's entry, load and follow the rest.

        Raises:
            BusUnavailable: JetStream is not reachable (the server must run with ``-js``).
        """
        config = self.config
        self._js = self.link.nc.jetstream(timeout=config.request_timeout)
        subjects = self.subjects
        # Entries of dead processes age out of the buckets (their keys are random ids);
        # aliases never do: an alias held by a live connection must not expire.
        ttl = max(60.0, 30 * config.heartbeat)
        try:
            for bucket, bucket_ttl in (
                (subjects.gateways_bucket, ttl),
                (subjects.services_bucket, ttl),
                (subjects.aliases_bucket, None),
            ):
                self._buckets[bucket] = await self._bucket(bucket, bucket_ttl)
            await self._put_own()
            await self._watch_all()
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusUnavailable(
                f"the wsbus directory in NATS JetStream is not reachable ({exc!r}); the NATS "
                "server must run with JetStream (nats-server -js)"
            ) from None
        self._heartbeat = asyncio.create_task(self._beat(), name="wsbus-nats-heartbeat")

    async def close(self) -> None:
        """Stop the heartbeat and the watches; delete this process's entry. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.link.connected:
            # Deleted, not left to age: others free this gateway's aliases (or stop
            # routing to this instance) at once.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.config.request_timeout):
                    await self._delete_own()
        await self._unwatch()

    def reconnected(self) -> None:
        """Put this process's entry again and reload the rest (after a reconnection).

        The watches' consumers may have died with a server: they are made anew.
        """
        if self._closed:
            return
        task = asyncio.create_task(self._rewatch(), name="wsbus-nats-rewatch")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _rewatch(self) -> None:
        try:
            await self._put_own()
            await self._unwatch()
            await self._watch_all()
        except Exception as exc:
            log.warning("reloading the wsbus directory after a reconnection failed: %r", exc)

    async def _bucket(self, name: str, ttl: float | None) -> KeyValue:
        assert self._js is not None
        try:
            return await self._js.key_value(name)
        except nats.js.errors.BucketNotFoundError:
            pass
        try:
            return await self._js.create_key_value(
                bucket=name, history=1, ttl=ttl, replicas=self.config.kv_replicas
            )
        except nats.js.errors.BadRequestError:
            # Created by another process meanwhile.
            return await self._js.key_value(name)

    async def _put_own(self) -> None:
        if self.node is not None:
            await self._buckets[self.subjects.gateways_bucket].put(self.node, b"1")
        if self.service is not None:
            key = f"{self.service.service}.{self.service.instance}"
            await self._buckets[self.subjects.services_bucket].put(key, _ENCODE(self.service))

    async def _delete_own(self) -> None:
        if self.node is not None:
            await self._buckets[self.subjects.gateways_bucket].delete(self.node)
        if self.service is not None:
            key = f"{self.service.service}.{self.service.instance}"
            await self._buckets[self.subjects.services_bucket].delete(key)

    async def _beat(self) -> None:
        warned = False
        while True:
            await asyncio.sleep(self.config.heartbeat)
            if not self.link.connected:
                continue
            try:
                await self._put_own()
                warned = False
            except Exception as exc:
                if not warned:
                    log.warning("the directory heartbeat failed: %r (retrying)", exc)
                    warned = True

    async def _watch_all(self) -> None:
        subjects = self.subjects
        for bucket, table in (
            (subjects.gateways_bucket, self._gateways),
            (subjects.services_bucket, self._services),
        ):
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
            created = meta.timestamp.timestamp()
            if table.update(key, None if deleted else msg.data, created):
                if services:
                    self._reindex()
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
        self._watches.append(sub)
        info = await sub.consumer_info()
        if info.num_pending == 0 and sub.delivered == 0 and not loaded.done():
            loaded.set_result(None)
        async with asyncio.timeout(self.config.request_timeout):
            await loaded

    async def _unwatch(self) -> None:
        watches, self._watches = self._watches, []
        for sub in watches:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def _reindex(self) -> None:
        by_type: dict[str, set[str]] = {}
        instances: dict[str, list[str]] = {}
        for key, (value, _, _) in self._services.entries.items():
            try:
                entry = _DECODE_SERVICE(value)
            except msgspec.DecodeError:
                continue
            instances.setdefault(entry.service, []).append(key)
            for type_ in entry.types:
                by_type.setdefault(type_, set()).add(entry.service)
        self._by_type = by_type
        self._instances = instances

    # -- reading -------------------------------------------------------------------------

    def gateway_live(self, node: str) -> bool:
        """Return True when gateway ``node`` is live (this process's own node always is)."""
        if node == self.node or self._gateways.live(node):
            return True
        seen = self._seen_nodes.get(node)
        return seen is not None and time.monotonic() - seen <= self._gateways.window

    def live_gateways(self) -> list[NodeId]:
        """Return the live gateways' node ids, sorted."""
        nodes = {key for key in self._gateways.entries if self._gateways.live(key)}
        now = time.monotonic()
        window = self._gateways.window
        nodes.update(n for n, seen in self._seen_nodes.items() if now - seen <= window)
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
        """Return True when at least one instance of ``service`` is live."""
        live = self._services.live
        return any(live(key) for key in self._instances.get(service, ()))

    def services_for(self, type: str) -> list[str]:
        """Return the services with a live instance that declared ``type``, sorted."""
        names = self._by_type.get(type)
        if not names:
            return []
        return sorted(name for name in names if self.service_live(name))

    def services(self) -> dict[str, int]:
        """Return each service with live instances and how many it has."""
        live = self._services.live
        counts = {
            name: sum(1 for key in keys if live(key)) for name, keys in self._instances.items()
        }
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
        """Return the connection holding ``alias`` in the table, or None (for tests, tools)."""
        kv = self._buckets[self.subjects.aliases_bucket]
        try:
            entry = await kv.get(alias_key(alias))
        except nats.js.errors.KeyNotFoundError:
            return None
        return ConnId((entry.value or b"").decode(errors="replace"))


def alias_key(alias: str) -> str:
    """Return the key-value key of an alias: its UTF-8 in URL-safe base64 (any alias fits)."""
    return base64.urlsafe_b64encode(alias.encode()).decode()
