"""The gateway's side of the NATS bus: :class:`NatsBus`, a :class:`wsbus.Bus` on nats-py.

A client's message goes to each service that declared its type (from the directory) as a
NATS request on ``P.svc.<service>.gw.<node>``; one instance of the service's queue group
answers once its runner holds the envelope, so :meth:`NatsBus.publish` returns when every
target service has it. Everything for this gateway arrives on one subscription,
``P.gw.<node>.>``, so each sender's order is kept.

Loss is never silent: while the link is down every publish is refused (BusUnavailable);
after a reconnection, when NATS dropped envelopes for this gateway (a slow consumer), or when
a service says its own link broke, the gateway is told
(:meth:`wsbus.bus.HearsLoss.deliveries_lost`) so that it can tell its clients; and a client
message held by a service instance that dies before its handler is done is failed
(``service_error`` to the client).

Aliases are claimed in a key-value bucket (:class:`~wsbus.bus.ClaimsAliases`); a gateway
back from a cut long enough to be taken for dead checks its claims and clears those another
gateway took meanwhile.

Group history is read from the JetStream stream ``P_history`` (:class:`~wsbus.bus.KeepsHistory`:
the gateway makes the stream with its settings, the service instances append to it), closed
sessions are kept in the bucket ``P_sessions`` (:class:`~wsbus.bus.KeepsSessions`), presence
events travel on ``P.ev.gw.<node>``, and a gateway whose directory entry dies is reported to
the gateway (:class:`~wsbus.bus.HearsGateways`). A service's history message keeps its
position only once the stream's entry it names is found to be it: a position published by
hand is dropped (counted and logged) and the message delivered without it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import OrderedDict, deque
from typing import Final

import msgspec
import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from wsbus import control
from wsbus.bus import BusSink, HearsGateways, HearsLoss, is_presence_event
from wsbus.envelope import (
    ClientAddress,
    ConnId,
    Envelope,
    EnvelopeId,
    GatewayAddress,
    NodeId,
    ServiceAddress,
    decode_envelope,
    encode_envelope,
)
from wsbus.errors import BusUnavailable, ConfigError, NoRoute
from wsbus.history import GROUP_HEADER, POSITION_HEADER, HistoryConfig, Position, position_of
from wsbus.resume import SessionRecord

from .buckets import open_bucket, sessions_spec
from .config import NatsConfig, redact_url
from .directory import LIVE_HEARTBEATS, Directory
from .history import HistoryCounters, HistoryReader, open_history
from .link import NO_RESPONDERS, Link, LinkCounters, RateLimitedLog
from .sessions import SessionStore
from .subjects import FROM_GATEWAY, Subjects, check_tokens

__all__ = [
    "ACK_BUSY",
    "ACK_HELD",
    "ACK_OK",
    "ACK_REFUSED",
    "DONE_HEADER",
    "HELD_LIMIT",
    "HOLD_LIMIT",
    "LOST_HEADER",
    "SEQ_HEADER",
    "NatsBus",
    "array_header",
]

log = logging.getLogger("wsbus.nats.gateway")

ACK_OK: Final = b"ok"
"""A service instance's answer: its runner holds the envelope."""
ACK_HELD: Final = b"ok:"
"""A service instance's answer for a client's message: its runner holds the envelope, and
the instance (named after the colon) will say when its handler is done with it. Should the
instance die first, the gateway tells the client ``service_error`` (never nothing)."""
ACK_BUSY: Final = b"busy"
"""A service instance's answer: its inbox is full."""
ACK_REFUSED: Final = b"refused"
"""A service instance's answer: the envelope was dropped (malformed, or a wrong sender)."""
DONE_HEADER: Final = "wsbus-nats-done"
"""A NATS header (never an envelope) by which a service instance (named in the value)
tells a gateway that its handlers are done with the client messages listed in the
payload (a MessagePack array of envelope ids)."""
HELD_LIMIT: Final = 100_000
"""Client messages a gateway keeps track of per service instance, at most."""
LOST_HEADER: Final = "wsbus-nats-lost"
"""A NATS header (never an envelope) by which a service tells gateways that what it sent
them may have been lost: its own link to NATS broke. The value names the service."""
SEQ_HEADER: Final = "wsbus-nats-seq"
"""A NATS header (never an envelope) on a history message a service sends a gateway: the
stream sequence of its entry in the history stream. The gateway believes the envelope's
position only once that entry is found to be this envelope at this position."""
HOLD_LIMIT: Final = 10_000
"""Envelopes a gateway holds back per service behind positions being checked, at most:
past it, that service's further envelopes are dropped (counted, logged, and the gateway's
clients told ``wsbus.gap`` at most once a heartbeat) until the checks catch up. A service's
runtime never gets near it (each history message costs it an append, more than a check)."""

_ARRAY_FIRST_BYTES: Final = frozenset([*range(0x90, 0xA0), 0xDC, 0xDD])
"""First bytes of a MessagePack array: a batch of envelopes (an envelope is a map)."""
_decode_batch = msgspec.msgpack.Decoder(list[Envelope]).decode
_decode_ids = msgspec.msgpack.Decoder(list[str]).decode

_REPLY_LIMIT: Final = 100_000
"""Control requests whose answer subject a gateway remembers at most (a bound on memory)."""
BATCH_LIMIT: Final = 256
"""The most envelopes a batch to a gateway may hold (a service sends at most
``wsbus_nats.service.BATCH_COUNT``): a larger one is refused before it is decoded."""
CLAIM_CHECK_HEARTBEATS: Final = 10
"""A gateway checks that the alias table still names its connections for their aliases
this often (any gateway user can rewrite the table: see docs/nats.md)..."""
CLAIM_CHECK_COUNT: Final = 1000
"""... up to this many of its aliases each time, in turn (one key-value read each)."""


def read_presence(data: bytes, node: str | None) -> Envelope | str:
    """Decode a presence event heard on the presence subject of gateway ``node``.

    Returns:
        The event; or, when it is not one the gateway ``node`` may have sent (bytes that are
        no envelope, another type, a sender other than that gateway), what it is instead,
        in words for the mismatch log.
    """
    try:
        envelope = decode_envelope(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return "bytes that are not a presence event"
    sender = envelope.sender
    if (
        node is None
        or not is_presence_event(envelope)
        or type(sender) is not GatewayAddress
        or sender.node != node
    ):
        return f"{envelope.type!r} from {sender!r}"
    return envelope


PROBE_SUBJECT: Final = "$JS.API.INFO"
"""What the readiness probe asks NATS (JetStream's account info: every gateway user may)."""


class NatsBus:
    """A :class:`wsbus.Bus` over NATS: the gateway side.

    Also :class:`~wsbus.bus.ReportsAvailability` (available while connected),
    :class:`~wsbus.bus.ClaimsAliases` (aliases unique across gateways, in a key-value
    bucket), :class:`~wsbus.bus.KeepsHistory` (group history in a JetStream stream) and
    :class:`~wsbus.bus.KeepsSessions` (closed sessions in a key-value bucket).

    Args:
        config: NATS settings; the servers must run JetStream (``nats-server -js``).
    """

    def __init__(self, config: NatsConfig | None = None) -> None:
        self.config = config if config is not None else NatsConfig()
        self.subjects = Subjects(self.config.prefix)
        self._link: Link | None = None
        self._directory: Directory | None = None
        self._sink: BusSink | None = None
        self._node = ""
        self._from_services = ""  # P.gw.<node>.svc.: what every subject to us starts with
        self._inbox: Subscription | None = None
        # (asking service, control request id) -> the subject its answer goes to (the
        # asking instance's). Keyed by the service too: ids are chosen by services, and
        # one reusing another's id must not take its answer.
        self._replies: OrderedDict[tuple[str, str], str] = OrderedDict()
        # Lost notices: when each service's last was heard, and the services that sent
        # this gateway something since their last (only those may send another).
        self._lost_heard: dict[str, float] = {}
        self._sent_since_lost: set[str] = set()
        self._claim_checker: asyncio.Task[None] | None = None
        self._warn = RateLimitedLog(log)
        self._lost_pending: list[tuple[str, str]] = []
        # The aliases this gateway's connections hold in the table, and releases that
        # could not be made yet.
        self._claims: dict[str, ConnId] = {}
        self._unreleased: dict[str, ConnId] = {}
        self._rechecking: asyncio.Task[None] | None = None
        self._recheck_again = False
        # Client messages each service instance holds: (service, instance) -> (when the
        # first was held, {envelope id: connection id}), until the instance says done.
        self._held: dict[tuple[str, str], tuple[float, dict[str, ConnId]]] = {}
        self._watchdog: asyncio.Task[None] | None = None
        self._history_config = HistoryConfig()
        self._history: HistoryReader | None = None
        self._sessions: SessionStore | None = None
        self.history_counters = HistoryCounters()
        """What this gateway's history reads met (see :class:`HistoryCounters`)."""
        self._presence = ""  # P.ev.gw.<node>: where this gateway's presence events go
        self._live: set[str] = set()  # the other gateways live at the last look
        self._gateway_watch: asyncio.Task[None] | None = None
        # Per service: what it sent that waits behind a position being checked (each
        # envelope with its check, if it has one), in its order; and the tasks that
        # release them.
        self._checking: dict[str, deque[tuple[Envelope, asyncio.Task[bool | None] | None]]] = {}
        self._releasers: set[asyncio.Task[None]] = set()
        self._overflow_told: dict[str, float] = {}  # service -> when its last overflow was told
        self._closed = False

    # -- Bus -----------------------------------------------------------------------------

    async def start(self, sink: BusSink) -> None:
        """Connect, join the directory and begin delivering envelopes for the gateway.

        A gateway whose node id was a crashed gateway's waits up to three heartbeats to
        see that one dead (one that stopped cleanly left at once).

        Raises:
            ConfigError: the node id cannot be a NATS subject token, or a live gateway has
                it (each gateway on one NATS deployment needs its own); the bus is started.
            BusUnavailable: no NATS server (with JetStream) could be reached.
        """
        if self._sink is not None:
            raise ConfigError("this NatsBus is started already")
        node = str(sink.node)
        check_tokens("gateway node id", [node])
        self._sink = sink
        self._node = node
        self._from_services = self.subjects.to_gateway(node, "")
        link = Link(
            self.config,
            f"wsbus gateway {node}",
            on_reconnected=self._reconnected,
            on_disconnected=self._disconnected,
            on_slow_consumer=self._slow_consumer,
            inbox_prefix=self.subjects.inbox(FROM_GATEWAY, node),
        )
        self._link = link
        await link.connect()
        try:
            self._directory = Directory(
                link,
                self.subjects,
                node=sink.node,
                on_lapse=self._recheck_claims,
                on_change=self._check_gateways,
            )
            # Before subscribing: a gateway refused for a node id in use never hears the
            # live one's traffic.
            await self._directory.check_node()
            # Made (or checked) before this gateway is listed: a service instance that
            # sees a gateway finds the history stream.
            await self._open_stores(link)
            self._inbox = await link.subscribe(self.subjects.gateway_inbox(node), self._on_message)
            self._presence = self.subjects.presence(node)
            await link.subscribe(self.subjects.presence_all, self._on_presence)
            await self._directory.start()
        except BaseException:
            await self.close()
            raise
        self._check_gateways()
        self._gateway_watch = asyncio.create_task(
            self._watch_gateways(), name="wsbus-nats-gateways"
        )
        self._watchdog = asyncio.create_task(self._watch_held(), name="wsbus-nats-held")
        self._claim_checker = asyncio.create_task(
            self._check_claims_often(), name="wsbus-nats-claim-checks"
        )
        log.info("gateway %s on NATS at %s", node, ", ".join(map(redact_url, self.config.servers)))

    async def publish(self, envelope: Envelope) -> None:
        """Put an envelope on the bus; return once every service it goes to holds it.

        Raises:
            NoRoute: no live service handles its type (or the service it names).
            BusUnavailable: the link to NATS is down (whole bus), or a service it goes to
                is busy, has no instance answering, did not confirm in time, or the
                envelope is larger than the server takes (not the whole bus).
        """
        link, directory = self._link, self._directory
        if link is None or directory is None or self._closed:
            raise BusUnavailable("the NATS bus is not started")
        if not link.connected:
            link.counters.refused += 1
            raise BusUnavailable("the connection to NATS is down; reconnecting")
        if is_presence_event(envelope):
            # To every other gateway, and one instance of each service that declared
            # wsbus.presence: nobody listening is fine (routing rule 5).
            await link.publish(self._presence, self._payload(envelope))
            return
        to = envelope.to
        if (
            envelope.type == control.RESULT
            and envelope.reply_to is not None
            and isinstance(to, ServiceAddress)
        ):
            reply = self._replies.pop((to.name, envelope.reply_to), None)
            if reply is not None:
                await link.publish(reply, self._payload(envelope))
                return
        if isinstance(to, ServiceAddress):
            if not directory.service_live(to.name):
                raise NoRoute(envelope.type)
            targets = [to.name]
        elif to is None:
            targets = directory.services_for(envelope.type)
            if not targets:
                raise NoRoute(envelope.type)
        else:
            raise NoRoute(envelope.type)
        payload = self._payload(envelope)
        if len(targets) == 1:
            await self._request(targets[0], payload, envelope)
            return
        # Each service gets it whatever another answers; the first refusal is raised.
        results = await asyncio.gather(
            *(self._request(name, payload, envelope) for name in targets), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def close(self) -> None:
        """Leave the directory, unsubscribe and close the connection. Idempotent."""
        self._closed = True
        for task in (self._watchdog, self._claim_checker, self._rechecking, self._gateway_watch):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._watchdog = self._claim_checker = self._gateway_watch = None
        for queue in self._checking.values():
            for _, check in queue:
                if check is not None:
                    check.cancel()
        for releaser in list(self._releasers):
            releaser.cancel()
            await asyncio.gather(releaser, return_exceptions=True)
        self._checking.clear()
        if self._rechecking is not None:
            self._rechecking.cancel()
            await asyncio.gather(self._rechecking, return_exceptions=True)
        if self._directory is not None:
            directory, self._directory = self._directory, None
            await directory.close()
        if self._link is not None:
            link, self._link = self._link, None
            await link.close()

    # -- optional capabilities -----------------------------------------------------------

    @property
    def available(self) -> bool:
        """True while connected to NATS (False before start and after close)."""
        link = self._link
        return link is not None and not self._closed and link.connected

    async def probe(self, envelope: Envelope) -> None:
        """A request round the NATS server and back, then the probe to the gateway (``Probes``).

        The request (JetStream's account info, which the gateway's user may ask) is
        answered on this process's own inbox, a subscription of the connection that carries
        the gateway's messages: a gateway whose link is down, whose server no longer
        answers, or whose subscriptions no longer deliver is found deaf. (A gateway may not
        publish to its own inbox: the permissions keep that to services, docs/nats.md.)
        Not a ``PING``: nats-py's ``flush`` stops reading the connection for good when a
        ``PONG`` comes after its wait was cancelled, and a probe's deadline cancels it.

        Raises:
            BusUnavailable: the link is down or the server did not answer in time.
        """
        link, sink = self._link, self._sink
        if link is None or sink is None or self._closed or not link.connected:
            raise BusUnavailable("the connection to NATS is down; reconnecting")
        try:
            await link.nc.request(PROBE_SUBJECT, b"", timeout=self.config.request_timeout)
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusUnavailable(
                f"the NATS server did not answer a request within "
                f"{self.config.request_timeout} s ({type(exc).__name__})"
            ) from None
        asyncio.get_running_loop().call_soon(sink.deliver, envelope)

    async def live_services(self) -> dict[str, int]:
        """Each service with live instances in the directory, and how many (``ListsServices``).

        Raises:
            BusUnavailable: the bus is not started.
        """
        directory = self._directory
        if directory is None or self._closed:
            raise BusUnavailable("the NATS bus is not started")
        return directory.services()

    @property
    def reconnects(self) -> int:
        """Times the link to NATS reconnected since start."""
        link = self._link
        return 0 if link is None else link.counters.reconnects

    def keep_history(self, config: HistoryConfig) -> None:
        """Say which groups keep history and how much; before :meth:`start`.

        The gateway makes the history stream with these settings when it is missing; an
        existing stream must have the same ones, or :meth:`start` refuses (every gateway
        of a deployment must agree).

        Raises:
            ConfigError: the bus is started already.
        """
        if self._sink is not None:
            raise ConfigError("keep_history() must be called before the NatsBus starts")
        self._history_config = config

    async def history(self, group: str, after: Position, limit: int) -> list[Envelope] | None:
        """Return ``group``'s entries after ``after``, oldest first, at most ``limit``.

        None when they cannot all be given (another epoch or run, trimmed by count or
        age, or an entry wsbus did not make).

        Raises:
            BusUnavailable: the bus is not started, or the stream cannot be read now.
        """
        reader = self._history
        if reader is None or self._closed:
            raise BusUnavailable("the NATS bus is not started")
        return await reader.read(group, after, limit)

    async def save_session(self, record: SessionRecord, ttl: float) -> None:
        """Keep ``record`` in the sessions bucket for ``ttl`` seconds.

        Raises:
            BusUnavailable: the bus is not started, or the bucket cannot be reached.
        """
        sessions = self._sessions
        if sessions is None or self._closed:
            raise BusUnavailable("the NATS bus is not started")
        await sessions.save(record, ttl)

    async def take_session(self, sid: str) -> SessionRecord | None:
        """Return the record of ``sid`` and delete it; a second take gets None.

        Raises:
            BusUnavailable: the bus is not started, or the bucket cannot be reached.
        """
        sessions = self._sessions
        if sessions is None or self._closed:
            raise BusUnavailable("the NATS bus is not started")
        return await sessions.take(sid)

    async def claim_alias(self, alias: str, conn_id: ConnId) -> bool:
        """Claim ``alias`` for ``conn_id`` across every gateway (a key-value create).

        An alias held by a connection whose gateway is dead (no heartbeat for three
        heartbeats) is taken over.

        Raises:
            BusUnavailable: the alias table cannot be reached; nothing was claimed.
        """
        directory = self._table()
        if self._unreleased.get(alias) == conn_id:
            del self._unreleased[alias]
        claimed = await directory.claim_alias(alias, conn_id)
        if claimed:
            self._claims[alias] = conn_id
        return claimed

    async def release_alias(self, alias: str, conn_id: ConnId) -> None:
        """Release ``alias`` if ``conn_id`` holds it.

        Raises:
            BusUnavailable: the alias table cannot be reached. The bus releases it later
                (when it can), or it frees when this gateway is gone.
        """
        directory = self._table()
        if self._claims.get(alias) == conn_id:
            del self._claims[alias]
        try:
            await directory.release_alias(alias, conn_id)
        except BusUnavailable:
            self._unreleased[alias] = conn_id
            self._recheck_claims()
            raise

    def _recheck_claims(self) -> None:
        """Check, in the background, that every alias claimed here is still this gateway's.

        After this gateway was cut off long enough to be taken for dead, another may
        have taken some over: those are cleared here (as a service would clear them),
        so that no alias has two holders for longer than the cut lasted. Releases that
        failed are made again.
        """
        if self._closed or not (self._claims or self._unreleased):
            return
        if self._rechecking is not None:
            self._recheck_again = True
            return
        self._rechecking = asyncio.create_task(self._recheck(), name="wsbus-nats-claims")

    async def _check_claims_often(self) -> None:
        """Every ``CLAIM_CHECK_HEARTBEATS`` heartbeats: check this gateway's aliases.

        Not only after a lapse: any gateway user may rewrite the alias table, and a
        connection whose alias was taken must hear of it (its alias cleared).
        """
        cursor = 0
        while True:
            await asyncio.sleep(self.config.heartbeat * CLAIM_CHECK_HEARTBEATS)
            link = self._link
            if link is None or not link.connected or self._rechecking is not None:
                continue
            aliases = list(self._claims)
            if not aliases:
                continue
            cursor %= len(aliases)
            chosen = aliases[cursor : cursor + CLAIM_CHECK_COUNT]
            cursor += len(chosen)
            try:
                await self._check_aliases(chosen)
            except BusUnavailable as exc:
                log.info("checking this gateway's aliases failed: %s (checked again later)", exc)

    async def _recheck(self) -> None:
        # Twice, a live-window apart: a gateway that took this one for dead a moment ago
        # may make its takeover just after the first look.
        window = self.config.heartbeat * LIVE_HEARTBEATS
        try:
            for attempt in range(2):
                if attempt:
                    await asyncio.sleep(window)
                self._recheck_again = False
                while not self._closed:
                    try:
                        await self._recheck_once()
                        break
                    except BusUnavailable as exc:
                        log.info("checking this gateway's aliases failed: %s (retrying)", exc)
                    await asyncio.sleep(self.config.heartbeat)
        finally:
            self._rechecking = None
        if self._recheck_again:
            self._recheck_claims()

    async def _recheck_once(self) -> None:
        directory = self._table()
        for alias, conn_id in list(self._unreleased.items()):
            await directory.release_alias(alias, conn_id)
            if self._unreleased.get(alias) == conn_id:
                del self._unreleased[alias]
        await self._check_aliases(list(self._claims))

    async def _check_aliases(self, aliases: list[str]) -> None:
        """Clear those of ``aliases`` whose key in the table names another connection."""
        directory = self._table()
        for alias in aliases:
            conn_id = self._claims.get(alias)
            if conn_id is None:
                continue
            holder = await directory.alias_holder(alias)
            if holder == conn_id or self._claims.get(alias) != conn_id:
                continue
            if holder is None and await directory.claim_alias(alias, conn_id):
                continue
            del self._claims[alias]
            self._clear_alias(alias, conn_id, holder)

    def _clear_alias(self, alias: str, conn_id: ConnId, holder: ConnId | None) -> None:
        sink = self._sink
        if sink is None:
            return
        log.warning(
            "alias %r of connection %s was cleared: the alias table names connection %s "
            "(another gateway took it while this one was cut off from NATS, or a gateway's "
            "NATS user rewrote the table)",
            alias,
            conn_id,
            holder,
        )
        # As a service would: the gateway clears it in its registry (a request with no
        # service sender gets no answer).
        sink.deliver(control.alias_lost(sink.node, conn_id, time.time()))

    # -- what else a gateway or a test may ask -------------------------------------------

    @property
    def counters(self) -> LinkCounters:
        """The link's counters: disconnects, reconnects, slow consumers, mismatches, ..."""
        if self._link is None:
            return LinkCounters()
        return self._link.counters

    @property
    def directory(self) -> Directory:
        """The bus's directory (live gateways, services, aliases).

        Raises:
            BusUnavailable: the bus is not started.
        """
        return self._table()

    # -- internals -----------------------------------------------------------------------

    async def _open_stores(self, link: Link) -> None:
        """Open (make, check) the history stream and the sessions bucket.

        Raises:
            ConfigError: either is not as wsbus makes it, or the history stream holds
                other settings than this gateway's.
            BusUnavailable: JetStream cannot be reached.
        """
        config = self.config
        js = link.nc.jetstream(timeout=config.request_timeout)
        try:
            await open_history(
                js, self.subjects, wanted=self._history_config, replicas=config.kv_replicas
            )
            spec = sessions_spec(self.subjects)
            await open_bucket(
                js, spec, replicas=config.kv_replicas, create=True, wait=config.heartbeat
            )
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusUnavailable(
                f"the wsbus history stream or sessions bucket in NATS JetStream is not "
                f"reachable ({exc!r}); the NATS server must run with JetStream"
            ) from None
        self._history = HistoryReader(
            link, self.subjects, self._history_config.age, self.history_counters
        )
        largest = min(spec.max_msg_size, link.max_payload)
        self._sessions = SessionStore(js, spec.name, largest, config.request_timeout)

    async def _on_presence(self, msg: Msg) -> None:
        """Take another gateway's presence event: check its sender, hand it to the gateway."""
        sink = self._sink
        if sink is None:
            return
        node = self.subjects.presence_sender(msg.subject)
        if node == self._node:
            return  # its own, heard back
        envelope = read_presence(msg.data, node)
        if isinstance(envelope, str):
            self._mismatch(msg.subject, envelope)
            return
        sink.deliver(envelope)

    async def _watch_gateways(self) -> None:
        """Each half heartbeat: tell the gateway of every other gateway found dead.

        A gateway is dead when its directory entry was not refreshed within three
        heartbeats (or was deleted: it stopped). The live gateway with the lowest node id
        reports each death to services (``report``); the others only send their members
        leave frames.
        """
        while True:
            await asyncio.sleep(self.config.heartbeat / 2)
            self._check_gateways()

    def _check_gateways(self) -> None:
        """Compare the live gateways with the last look: tell the gateway of those gone.

        Each half heartbeat (an entry that aged out) and at each change of the directory's
        entries (one deleted: a clean stop, told at once; one added: known from then on).
        """
        directory, sink = self._directory, self._sink
        if directory is None or sink is None or self._closed:
            return
        live = {str(n) for n in directory.live_gateways() if n != self._node}
        lost, self._live = self._live - live, live
        for node in sorted(lost):
            report = all(self._node < other for other in live)
            log.warning(
                "gateway %s is gone (its directory entry was deleted or not refreshed "
                "within %d heartbeats): its clients' presence ends%s",
                node,
                LIVE_HEARTBEATS,
                " (this gateway reports it to services)" if report else "",
            )
            if isinstance(sink, HearsGateways):
                try:
                    sink.gateway_lost(NodeId(node), report)
                except Exception:
                    log.exception("the gateway failed to hear that gateway %s is gone", node)

    def _table(self) -> Directory:
        if self._directory is None or self._closed:
            raise BusUnavailable("the NATS bus is not started")
        return self._directory

    def _payload(self, envelope: Envelope) -> bytes:
        payload = encode_envelope(envelope)
        link = self._link
        assert link is not None
        # The subject and NATS framing take some of max_payload: keep a margin.
        if len(payload) + 512 > link.max_payload:
            link.counters.too_large += 1
            self._warn.warning(
                "too large",
                "%s (%s) is %d bytes, more than the NATS server takes in one message "
                "(max_payload %d); refused",
                envelope.type,
                envelope.id,
                len(payload),
                link.max_payload,
            )
            raise BusUnavailable(
                f"{envelope.type!r} is {len(payload)} bytes, more than NATS carries in one "
                f"message (max_payload {link.max_payload}): too_large",
                whole_bus=False,
            )
        return payload

    async def _request(self, service: str, payload: bytes, envelope: Envelope) -> None:
        """Send to one service and wait for an instance to say it holds the envelope."""
        link = self._link
        assert link is not None
        subject = self.subjects.to_service(service, FROM_GATEWAY, self._node)
        reply, future = link.new_ack()
        try:
            await link.publish(subject, payload, reply=reply)
            async with asyncio.timeout(self.config.request_timeout):
                answer = await future
        except TimeoutError:
            raise BusUnavailable(
                f"no instance of service {service!r} confirmed {envelope.type!r} within "
                f"{self.config.request_timeout:g} s",
                whole_bus=False,
            ) from None
        finally:
            link.drop_ack(reply)
        if answer == ACK_OK:
            return
        if answer.startswith(ACK_HELD):
            self._hold(service, answer[len(ACK_HELD) :].decode(errors="replace"), envelope)
            return
        if answer == ACK_BUSY:
            raise BusUnavailable(f"service {service!r} is busy (inbox full)", whole_bus=False)
        if answer == NO_RESPONDERS:
            raise BusUnavailable(
                f"service {service!r} is listed but no instance of it answers (it may have "
                "just stopped)",
                whole_bus=False,
            )
        raise BusUnavailable(f"service {service!r} refused {envelope.type!r}", whole_bus=False)

    async def _on_message(self, msg: Msg) -> None:
        """Take one NATS message for this gateway: check it, hand it to the gateway.

        Runs once per NATS message to clients (an envelope, or a batch of them in order):
        kept to a few attribute reads and the decode.
        """
        sink = self._sink
        if sink is None:
            return
        subject = msg.subject
        from_services = self._from_services
        if not subject.startswith(from_services):
            self._mismatch(subject, "a subject wsbus does not use")
            return
        sender = subject[len(from_services) :]
        headers = msg.headers
        if headers:
            if LOST_HEADER in headers:
                self._service_lost(sender)
                return
            instance = headers.get(DONE_HEADER)
            if instance is not None:
                self._done(sender, instance, msg.data)
                return
        data = msg.data
        try:
            if data and data[0] in _ARRAY_FIRST_BYTES:
                # Counted before it is decoded: a service batches at most BATCH_LIMIT, and
                # decoding a megabyte of tiny envelopes costs tens of milliseconds.
                count = _array_count(data)
                if count > BATCH_LIMIT:
                    self._mismatch(subject, f"a batch of {count} envelopes (at most {BATCH_LIMIT})")
                    return
                envelopes = _decode_batch(data)
            else:
                envelopes = [decode_envelope(data)]
        except (msgspec.DecodeError, msgspec.ValidationError):
            self._mismatch(subject, "bytes that are not envelopes")
            return
        if "." in sender:
            self._mismatch(subject, "a subject wsbus does not use")
            return
        self._sent_since_lost.add(sender)
        deliver = sink.deliver
        # A service's history message comes alone, naming its entry in the stream.
        seq = headers.get(SEQ_HEADER) if headers and len(envelopes) == 1 else None
        for envelope in envelopes:
            address = envelope.sender
            if type(address) is not ServiceAddress or address.name != sender:
                self._mismatch(subject, f"an envelope whose sender is {address!r}")
                continue
            reply = msg.reply
            # The answer goes to the instance that asked, and only to one of its
            # service's reply subjects.
            if (
                reply
                and envelope.type in control.REQUEST_TYPES
                and reply.startswith(f"{self.subjects.prefix}.reply.{sender}.")
            ):
                replies = self._replies
                replies[(sender, envelope.id)] = reply
                if len(replies) > _REPLY_LIMIT:
                    replies.popitem(last=False)
            marked = envelope.headers
            held = self._checking.get(sender)
            if held is not None and len(held) >= HOLD_LIMIT:
                self._overflow(sender, envelope)
            elif marked and (POSITION_HEADER in marked or GROUP_HEADER in marked):
                self._check_position(sender, envelope, seq)
            elif held is not None:
                held.append((envelope, None))  # behind a check: in order
            else:
                deliver(envelope)

    def _check_position(self, sender: str, envelope: Envelope, seq: str | None) -> None:
        """Hand on a service's positioned envelope once its position is checked.

        A position is believed only when the envelope is to exactly its group (an
        ``exclude`` allowed), the group keeps history, and the history stream's entry at
        the sequence the service named is this envelope at this position (a service's
        runtime sends only those; anything else was published by hand with a service's
        credentials). Until then, what the service sends after it waits (its order holds);
        one that fails goes on without its position, counted
        (``history_counters.mismatches``) and logged.
        """
        claim = self._claim(envelope, seq)
        if claim is None:
            envelope = self._unpositioned(
                sender, envelope, "it is not a history message as wsbus sends one"
            )
            if sender in self._checking:
                self._checking[sender].append((envelope, None))
            elif self._sink is not None:
                self._sink.deliver(envelope)
            return
        reader = self._history
        assert reader is not None  # _claim checked
        group, position, at = claim
        check = asyncio.create_task(
            reader.holds(group, position, envelope, at), name="wsbus-nats-position"
        )
        queue = self._checking.get(sender)
        if queue is None:
            queue = self._checking[sender] = deque()
            releaser = asyncio.create_task(
                self._release(sender, queue), name=f"wsbus-nats-release-{sender}"
            )
            self._releasers.add(releaser)
            releaser.add_done_callback(self._releasers.discard)
        queue.append((envelope, check))

    def _overflow(self, sender: str, envelope: Envelope) -> None:
        """Drop a service's envelope: too many of its own wait behind position checks.

        Only that service's traffic is dropped (others' goes on unhindered), and the
        gateway is told deliveries were lost at most once a heartbeat per service.
        """
        self.history_counters.overflows += 1
        self._warn.warning(
            f"overflow {sender}",
            "gateway %s dropped %s (%s) from service %r: %d of its messages wait behind "
            "history position checks already (it sends positioned messages faster than "
            "the history stream can be read: published by hand with its credentials?)",
            self._node,
            envelope.type,
            envelope.id,
            sender,
            HOLD_LIMIT,
        )
        now = time.monotonic()
        last = self._overflow_told.get(sender)
        if last is None or now - last >= self.config.heartbeat:
            self._overflow_told[sender] = now
            self._lost(
                "slow_consumer",
                f"gateway {self._node} dropped messages from service {sender!r}: too many "
                "waited for their history positions to be checked",
            )

    def _claim(self, envelope: Envelope, seq: str | None) -> tuple[str, Position, int] | None:
        """The group, position and entry sequence a service's envelope claims, if well-formed."""
        found = position_of(envelope)
        recipients = envelope.recipients
        if (
            found is None
            or seq is None
            or not (seq.isascii() and seq.isdigit() and 0 < len(seq) <= 20)
            or self._history is None
            or recipients is None
            or recipients.groups != (found[0],)
            or recipients.conn_ids
            or recipients.aliases
            or recipients.users
            or recipients.everyone
            or envelope.to is not None
            or not self._history_config.keeps(found[0])
        ):
            return None
        return found[0], found[1], int(seq)

    async def _release(
        self, sender: str, queue: deque[tuple[Envelope, asyncio.Task[bool | None] | None]]
    ) -> None:
        """Hand on ``sender``'s held envelopes in order, each once its check is done."""
        try:
            while queue:
                envelope, check = queue[0]
                if check is not None:
                    try:
                        held = await check
                    except Exception:
                        log.exception("checking the position of %s failed", envelope.id)
                        held = None
                    if not held:
                        envelope = self._unpositioned(
                            sender,
                            envelope,
                            "the history stream does not hold it there"
                            if held is False
                            else "it could not be checked now",
                            counted=held is False,
                        )
                queue.popleft()
                sink = self._sink
                if sink is not None and not self._closed:
                    sink.deliver(envelope)
        finally:
            if self._checking.get(sender) is queue:
                del self._checking[sender]

    def _unpositioned(
        self, sender: str, envelope: Envelope, why: str, *, counted: bool = True
    ) -> Envelope:
        """Return ``envelope`` without its history position.

        ``counted``: the position was not believed (counted, logged); otherwise it could
        not be checked (the reader logged why).
        """
        if counted:
            self.history_counters.mismatches += 1
            self._warn.warning(
                "position",
                "gateway %s takes %s (%s) from service %r without the history position it "
                "carries (%r): %s. Positions are the bus's to give: this one was published "
                "by hand with the service's NATS credentials (check who holds them)",
                self._node,
                envelope.type,
                envelope.id,
                sender,
                envelope.headers.get(POSITION_HEADER),
                why,
            )
        headers = {
            k: v for k, v in envelope.headers.items() if k not in (POSITION_HEADER, GROUP_HEADER)
        }
        return msgspec.structs.replace(envelope, headers=headers)

    def _hold(self, service: str, instance: str, envelope: Envelope) -> None:
        """Note that ``instance`` of ``service`` holds a client's message (its ack said so)."""
        sender = envelope.sender
        if type(sender) is not ClientAddress:
            return
        key = (service, instance)
        entry = self._held.get(key)
        if entry is None:
            entry = self._held[key] = (time.monotonic(), {})
        held = entry[1]
        held[envelope.id] = sender.conn_id
        if len(held) > HELD_LIMIT:
            del held[next(iter(held))]
            self._warn.warning(
                "held",
                "gateway %s keeps track of %d messages held by instance %s of service %r; "
                "the oldest is forgotten (should that instance die, its client is not told)",
                self._node,
                HELD_LIMIT,
                instance,
                service,
            )

    def _done(self, service: str, instance: str, data: bytes) -> None:
        """Forget the messages an instance says its handlers are done with."""
        entry = self._held.get((service, instance))
        if entry is None:
            return
        try:
            ids = _decode_ids(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self._mismatch(f"(done notice of {service}.{instance})", "a malformed done notice")
            return
        held = entry[1]
        for id_ in ids:
            held.pop(id_, None)
        if not held:
            del self._held[(service, instance)]

    async def _watch_held(self) -> None:
        """Each heartbeat: fail what dead instances held (their clients are told)."""
        heartbeat = self.config.heartbeat
        window = heartbeat * LIVE_HEARTBEATS
        while True:
            await asyncio.sleep(heartbeat)
            directory, sink = self._directory, self._sink
            if directory is None or sink is None or not self._held:
                continue
            now = time.monotonic()
            for key, (since, held) in list(self._held.items()):
                service, instance = key
                # A fresh instance may answer before its directory entry reaches here.
                if now - since <= window or directory.instance_live(service, instance):
                    continue
                del self._held[key]
                log.warning(
                    "instance %s of service %r is gone, holding %d client messages not "
                    "handled yet; their clients are told service_error",
                    instance,
                    service,
                    len(held),
                )
                for id_, conn_id in held.items():
                    sink.deliver(
                        Envelope(
                            id=EnvelopeId(f"{self._node}-bus-{os.urandom(6).hex()}"),
                            type=control.FAILED,
                            sender=ServiceAddress(service),
                            content=msgspec.to_builtins(control.Failed(conn_id, id_)),
                            created=time.time(),
                            to=GatewayAddress(sink.node),
                        )
                    )

    def _mismatch(self, subject: str, what: str) -> None:
        link = self._link
        if link is not None:
            link.counters.sender_mismatches += 1
        self._warn.warning(
            "mismatch",
            "gateway %s dropped %s on NATS subject %s: only services may send to a gateway, "
            "each as itself (check the NATS permissions: wsbus nats-config)",
            self._node,
            what,
            subject,
        )

    def _disconnected(self) -> None:
        if self._directory is not None:
            self._directory.disconnected()

    def _reconnected(self) -> None:
        if self._directory is not None:
            self._directory.reconnected()
        self._recheck_claims()
        self._lost(
            "bus_disconnected",
            "the gateway's connection to NATS broke and was made again: messages sent to "
            "clients meanwhile may be lost",
        )

    def _slow_consumer(self, sub: Subscription) -> None:
        if sub is not self._inbox:
            return
        self._lost(
            "slow_consumer",
            "NATS dropped messages for this gateway: it read them too slowly",
        )

    def _service_lost(self, sender: str) -> None:
        """A service says what it sent may be lost: believed once a heartbeat at most.

        Only from a service that sent this gateway something since its previous notice
        (otherwise it had nothing here to lose): any service could otherwise make every
        client of the gateway hear ``wsbus.gap`` as often as it liked.
        """
        now = time.monotonic()
        last = self._lost_heard.get(sender)
        if sender not in self._sent_since_lost or (
            last is not None and now - last < self.config.heartbeat
        ):
            self._warn.warning(
                "lost notice",
                "gateway %s ignored a lost-deliveries notice from service %r: it sent nothing "
                "here since its last one, or sent one within a heartbeat",
                self._node,
                sender,
            )
            return
        self._sent_since_lost.discard(sender)
        self._lost_heard[sender] = now
        self._lost(
            "bus_disconnected",
            f"service {sender!r} lost its connection to NATS: what it sent may be lost",
        )

    def _lost(self, reason: str, detail: str) -> None:
        """Tell the gateway, once per burst: a burst of drops in one read is one notice."""
        pending = self._lost_pending
        if (reason, detail) in pending:
            return
        pending.append((reason, detail))
        if len(pending) == 1:
            asyncio.get_running_loop().call_soon(self._tell_lost)

    def _tell_lost(self) -> None:
        pending, self._lost_pending = self._lost_pending, []
        sink = self._sink
        if not isinstance(sink, HearsLoss):
            for reason, detail in pending:
                log.warning("deliveries may be lost (%s): %s", reason, detail)
            return
        for reason, detail in pending:
            try:
                sink.deliveries_lost(reason, detail)
            except Exception:
                log.exception("the gateway failed to hear of lost deliveries")


def _array_count(data: bytes) -> int:
    """Return the item count of the MessagePack array ``data`` starts with (its header)."""
    first = data[0]
    if first == 0xDC:
        return int.from_bytes(data[1:3], "big")
    if first == 0xDD:
        return int.from_bytes(data[1:5], "big")
    return first & 0x0F


def array_header(count: int) -> bytes:
    """Return the MessagePack header of an array of ``count`` items (a batch's first bytes)."""
    if count < 16:
        return bytes([0x90 | count])
    if count < 65536:
        return b"\xdc" + count.to_bytes(2, "big")
    return b"\xdd" + count.to_bytes(4, "big")
