"""Running a wsbus :class:`~wsbus.Service` on the NATS bus: :class:`ServiceHost`.

The same ``Service`` subclass that runs on the in-memory and Pyro buses runs here unchanged.
Any number of instances of one service may run (in one process or many): they share the
service's traffic through a NATS queue group, one instance per message.

An instance receives everything on one subscription, ``P.svc.<service>.>`` (so each
sender's order is kept), checks each envelope's sender against the subject, and answers
the sender's request once its runner holds the envelope (``busy`` when its inbox is full).
What it sends goes out in call order through one task: to gateways as plain NATS messages
(what is queued for one gateway goes as one batch), to services as requests whose answers
are awaited in the background; one that fails is reported back to the service as
``wsbus.undeliverable`` (a control request: its call raises ``ControlError``), never
dropped unseen.

A client's message to a handler is acknowledged with the instance's id, and the gateway is
told when the handler is done with it: should the instance die first, the gateway tells the
client ``service_error``. A clean stop (:meth:`ServiceHost.close`, or SIGTERM for
:func:`run_service`) drains: the instance leaves the queue group first (the other
instances get the new traffic), finishes what it holds for up to ``drain_timeout``
seconds, and tells the clients of what is left ``service_error``. After its link to NATS
broke and was made again, an instance tells every gateway that what it sent meanwhile may
be lost (they send their clients ``wsbus.gap``).

A message to one group that keeps history (the gateways' settings, read from the history
stream) is appended to the group's history in JetStream before it goes to any gateway
(:class:`~wsbus_nats.history.HistoryWriter`), in the sender task, so each sender's order
holds; it goes on stamped with its position, and an append that fails makes the send fail
as one on a down link does (``wsbus.undeliverable``): never sent without its position.
Positions are the bus's to give: the ``wsbus-pos`` and ``wsbus-group`` headers a service
sets are dropped (as on the other buses), and each history message names its entry's
stream sequence to the gateways (:data:`~wsbus_nats.bus.SEQ_HEADER`), which check it. An
instance of a service that declared ``wsbus.presence`` gets the gateways' presence events
(one instance of the service each).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections import deque
from collections.abc import Sequence
from typing import Final

import msgspec
import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from wsbus import control
from wsbus.bus import SHARED_HEADER, is_for_gateway
from wsbus.envelope import (
    ClientAddress,
    Envelope,
    EnvelopeId,
    GatewayAddress,
    NodeId,
    Recipients,
    ServiceAddress,
    decode_envelope,
    encode_envelope,
    node_of,
)
from wsbus.errors import BusUnavailable, ConfigError, NoRoute
from wsbus.history import GROUP_HEADER, POSITION_HEADER, HistoryConfig, history_group
from wsbus.service import Outcome, Service, ServiceRunner, load_service, serve_until_stopped

from .bus import (
    ACK_BUSY,
    ACK_HELD,
    ACK_OK,
    ACK_REFUSED,
    DONE_HEADER,
    LOST_HEADER,
    SEQ_HEADER,
    array_header,
    read_presence,
)
from .config import NatsConfig, redact_url
from .directory import Directory, ServiceEntry
from .history import HistoryCounters, HistoryWriter
from .link import NO_RESPONDERS, Link, LinkCounters, RateLimitedLog, quietly
from .subjects import FROM_GATEWAY, FROM_SERVICE, Subjects, check_tokens, sent_by

__all__ = ["ServiceHost", "load_service", "run_service"]

log = logging.getLogger("wsbus.nats.service")

BATCH_COUNT: Final = 256
"""The most envelopes one NATS message to a gateway carries."""
BATCH_BYTES: Final = 256 * 1024
"""The most bytes of envelopes one NATS message to a gateway carries (and at most half the
server's max_payload)."""

BUS_NODE: Final = NodeId("bus")
"""The sender node of the reports the bus runtime itself makes (as on Pyro)."""
HISTORY_REFRESH_HEARTBEATS: Final = 10
"""An instance reads the history stream's settings again this often (a stream made anew
by an operator, with other settings, is taken up within that)."""
_ANY_GROUP: Final = HistoryConfig(groups=("*",))
_HISTORY_HEADERS: Final = frozenset({POSITION_HEADER, GROUP_HEADER})

# What the sender task sends: subject, payload, the envelope (None: a notice in headers
# only), whether a service instance must confirm it (a request) or not (a message to a
# gateway), the reply subject, and NATS headers.
_Item = tuple[str, bytes, Envelope | None, bool, str, dict[str, str] | None]


class ServiceHost:
    """One instance of a service on the NATS bus, in this process.

    Args:
        service: the service instance.
        config: NATS settings.
        inbox_size: envelopes that may wait for the service; past that, senders are told
            ``busy`` (a client: ``unavailable``, retry).
        instance: this instance's id (random by default; a subject token).
        drain_timeout: on a clean stop (:meth:`close`), the most seconds the instance
            spends finishing what it holds once it has stopped taking new envelopes;
            what is left then is failed (``service_error`` to a client).
    """

    def __init__(
        self,
        service: Service,
        config: NatsConfig | None = None,
        *,
        inbox_size: int = 1000,
        instance: str | None = None,
        drain_timeout: float = 5.0,
    ) -> None:
        self.service = service
        self.drain_timeout = drain_timeout
        self.config = config if config is not None else NatsConfig()
        self.inbox_size = inbox_size
        self.instance = instance if instance is not None else os.urandom(4).hex()
        self.subjects = Subjects(self.config.prefix)
        self.name = service.name
        self._link: Link | None = None
        self._directory: Directory | None = None
        self._runner: ServiceRunner | None = None
        self._subs: list[Subscription] = []
        self._outbound: deque[_Item] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self._timeouts: dict[str, asyncio.TimerHandle] = {}
        self._warn = RateLimitedLog(log)
        self._reply_subject = ""
        self._to_gateway: dict[str, str] = {}  # node -> the subject to it from this service
        # Client messages whose handlers are done, by gateway node, not yet told.
        self._handled: dict[str, list[str]] = {}
        self._tracked: set[str] = set()  # the types whose handlers say when they are done
        self._ack_held = ACK_HELD + self.instance.encode()
        self._inbox_sub: Subscription | None = None  # the queue-group subscription
        self._history: HistoryWriter | None = None
        self.history_counters = HistoryCounters()
        """What this instance's history appends met (see :class:`HistoryCounters`)."""
        self._history_task: asyncio.Task[None] | None = None
        self._history_gateways: tuple[NodeId, ...] = ()  # live at the last look for it
        self._stopping = False
        self._closed = False

    # -- life ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, start the service, subscribe, and join the directory.

        Raises:
            ConfigError: the service name or instance id cannot be a subject token.
            BusUnavailable: no NATS server (with JetStream) could be reached.
        """
        check_tokens("service name", [self.name])
        check_tokens("service instance id", [self.instance])
        config = self.config
        link = Link(
            config,
            f"wsbus service {self.name} {self.instance}",
            on_reconnected=self._reconnected,
            on_disconnected=self._disconnected,
            inbox_prefix=self.subjects.inbox(FROM_SERVICE, self.name),
        )
        self._link = link
        await link.connect()
        try:
            self._history = HistoryWriter(link, self.subjects, self.name, self.history_counters)
            types = sorted(type(self.service).handled_types())
            entry = ServiceEntry(self.name, self.instance, types)
            directory = Directory(link, self.subjects, service=entry)
            self._directory = directory
            self._tracked = {t for t in type(self.service).handled_types()}
            self._runner = ServiceRunner(
                self.service,
                self._emit,
                inbox_size=self.inbox_size,
                timeout=config.request_timeout,
                gateways=self._gateways,
                finished=self._finished,
            )
            self._sender = asyncio.create_task(self._send(), name=f"wsbus-nats-{self.name}")
            await self._runner.start()
            subjects = self.subjects
            self._reply_subject = subjects.reply(self.name, self.instance)
            self._inbox_sub = await link.subscribe(
                subjects.service_inbox(self.name), self._on_message, self.name
            )
            self._subs.append(await link.subscribe(self._reply_subject, self._on_answer))
            if control.PRESENCE in types:
                self._subs.append(
                    await link.subscribe(subjects.presence_all, self._on_presence, self.name)
                )
            # Listed last: no gateway routes here before the subscriptions are made.
            await directory.start()
            # Gateways make the history stream before they list themselves.
            await self._refresh_history(at_start=True)
            self._history_task = asyncio.create_task(
                self._keep_history_current(), name=f"wsbus-nats-{self.name}-history"
            )
        except BaseException:
            await self.close()
            raise
        log.info(
            "service %r (instance %s) on NATS at %s, handling %s",
            self.name,
            self.instance,
            ", ".join(map(redact_url, config.servers)),
            types,
        )

    def figures(self) -> dict[str, int]:
        """What ``wsbus service --metrics`` reports: the runner's figures and the link's.

        ``bus_available``: 1 while connected to NATS; ``nats_<counter>_total``: the link's
        counters (reconnects, disconnects, slow consumers, refusals, ...).
        """
        figures = {} if self._runner is None else self._runner.figures()
        link = self._link
        if link is not None:
            figures["bus_available"] = 1 if link.connected else 0
            for name, value in link.counters.as_dict().items():
                figures[f"nats_{name}_total"] = value
        return figures

    async def close(self) -> None:
        """Stop cleanly, draining first; idempotent.

        The instance first stops taking new envelopes (its queue-group subscription is
        drained: the other instances get the service's new traffic), then lets its handlers
        finish what it holds, for up to ``drain_timeout`` seconds; what is left then is
        failed (a client is told ``service_error``). Then it sends what is queued, leaves the
        directory and closes the connection.
        """
        if self._stopping:
            return
        self._stopping = True
        link = self._link
        connected = link is not None and link.connected
        if self._inbox_sub is not None:
            inbox_sub, self._inbox_sub = self._inbox_sub, None
            # Drained, not unsubscribed: what NATS delivered already is still confirmed
            # and handled (an unsubscribe would leave its senders waiting for a timeout).
            if connected:
                await quietly(inbox_sub.drain(), self.config.request_timeout)  # type: ignore[no-untyped-call]
            else:
                await quietly(inbox_sub.unsubscribe(), self.config.request_timeout)
        if self._runner is not None:
            # While the link is down nothing handled could be answered: no drain then.
            await self._runner.stop(drain=self.drain_timeout if connected else 0.0)
        if self._sender is not None:
            # What is queued goes out first (bounded: the link may be down).
            try:
                if link is not None and link.connected:
                    async with asyncio.timeout(max(1.0, self.config.request_timeout)):
                        while not self._idle.is_set() or self._handled:
                            self._wake.set()
                            await self._idle.wait()
            except TimeoutError:
                log.warning(
                    "service %r stopped with %d envelopes not sent", self.name, len(self._outbound)
                )
        self._closed = True
        if self._history_task is not None:
            self._history_task.cancel()
            await asyncio.gather(self._history_task, return_exceptions=True)
        # Left only now: while it drained, the gateways kept this instance for live (and
        # did not fail what it held).
        if self._directory is not None:
            await self._directory.close()
        for sub in self._subs:
            await quietly(sub.unsubscribe(), self.config.request_timeout)
        self._subs.clear()
        if self._sender is not None:
            self._sender.cancel()
            await asyncio.gather(self._sender, return_exceptions=True)
        for handle in self._timeouts.values():
            handle.cancel()
        self._timeouts.clear()
        if link is not None:
            await link.close()

    @property
    def counters(self) -> LinkCounters:
        """The link's counters: disconnects, reconnects, slow consumers, mismatches, ..."""
        return self._link.counters if self._link is not None else LinkCounters()

    @property
    def directory(self) -> Directory | None:
        """The instance's view of the bus (None before start)."""
        return self._directory

    async def _gateways(self) -> Sequence[NodeId]:
        directory = self._directory
        return directory.live_gateways() if directory is not None else []

    # -- sending -------------------------------------------------------------------------

    def _emit(self, envelope: Envelope) -> None:
        """Queue an envelope from the service (on the loop thread); refuse what cannot go.

        Raises:
            NoRoute: nothing on the bus handles its type (or the service it names).
            BusUnavailable: the link is down, or too much is queued already.
        """
        link, directory = self._link, self._directory
        if link is None or directory is None or self._closed:
            raise BusUnavailable("the service is not on the NATS bus")
        if not link.connected:
            link.counters.refused += 1
            raise BusUnavailable("the connection to NATS is down; reconnecting")
        outbound = self._outbound
        if len(outbound) >= self.config.outbound_size:
            raise BusUnavailable(
                f"service {self.name!r} sends faster than NATS takes it "
                f"({len(outbound)} envelopes queued)",
                whole_bus=False,
            )
        headers = envelope.headers
        if headers and (POSITION_HEADER in headers or GROUP_HEADER in headers):
            # Positions are the bus's to give (as on the other buses): one a service chose
            # would keep its message out of history and disorder the group at gateways.
            kept = {k: v for k, v in headers.items() if k not in _HISTORY_HEADERS}
            envelope = msgspec.structs.replace(envelope, headers=kept)
        subjects = self.subjects
        to = envelope.to
        recipients = envelope.recipients
        if (
            to is None
            and recipients is not None
            and len(recipients.conn_ids) == 1
            and not (recipients.everyone or recipients.aliases or recipients.users)
            and not recipients.groups
        ):
            # The common case inline (a reply or a send to one connection): this runs once
            # per envelope to a client.
            node = node_of(recipients.conn_ids[0])
            if directory.gateway_reachable(node):
                subject = self._to_gateway.get(node)
                if subject is None:
                    subject = self._to_gateway[node] = subjects.to_gateway(node, self.name)
                    if len(self._to_gateway) > 1000:
                        self._to_gateway.clear()
                data = encode_envelope(envelope)
                if len(data) + 512 <= link.max_payload:
                    outbound.append((subject, data, envelope, False, "", None))
                    self._idle.clear()
                    self._wake.set()
                    return
        if isinstance(to, GatewayAddress) or is_for_gateway(envelope):
            if self._may_keep_history(envelope):
                # Appended (and stamped) in the sender task, then sent: in order.
                outbound.append(("", b"", envelope, False, "", None))
                self._idle.clear()
                self._wake.set()
                return
            nodes = self._gateway_nodes(envelope)
            if nodes is None:
                return
            if len(nodes) > 1 and envelope.recipients is not None:
                headers = {**envelope.headers, SHARED_HEADER: "1"}
                envelope = msgspec.structs.replace(envelope, headers=headers)
            payload = self._payload(envelope)
            if payload is None:
                return
            reply = self._reply_subject if envelope.type in control.REQUEST_TYPES else ""
            for node in nodes:
                outbound.append(
                    (subjects.to_gateway(node, self.name), payload, envelope, False, reply, None)
                )
        else:
            if isinstance(to, ServiceAddress):
                if not directory.service_live(to.name):
                    raise NoRoute(envelope.type)
                services = [to.name]
            else:
                services = directory.services_for(envelope.type)
                if not services:
                    raise NoRoute(envelope.type)
            payload = self._payload(envelope)
            if payload is None:
                return
            for service in services:
                subject = subjects.to_service(service, FROM_SERVICE, self.name)
                outbound.append((subject, payload, envelope, True, "", None))
        self._idle.clear()
        self._wake.set()

    # -- handlers done ------------------------------------------------------------------

    def _finished(self, message: Envelope, outcome: Outcome) -> None:
        """The runner is done with ``message``: a client's, tracked, is reported.

        Handled or failed (the runner told the client ``service_error`` itself), the
        gateway is told it is done; stopped (not finished), the client is told
        ``service_error`` now (see :meth:`_fail_unfinished`).
        """
        if message.type not in self._tracked or type(message.sender) is not ClientAddress:
            return
        if outcome == "stopped":
            self._fail_unfinished(message)
        else:
            self._note_handled(message)

    def _fail_unfinished(self, message: Envelope) -> None:
        """Tell a client its message will not be handled: this instance is stopping.

        Through the gateway that owns the connection, then a done notice so that it does
        not fail it twice. Should the failure not go (the link is down), no done notice
        goes either: the gateway fails it once this instance has left.
        """
        sender = message.sender
        assert type(sender) is ClientAddress
        failed = Envelope(
            id=EnvelopeId(f"{self.name}-{self.instance}-stop-{os.urandom(6).hex()}"),
            type=control.FAILED,
            sender=ServiceAddress(self.name),
            content=msgspec.to_builtins(control.Failed(sender.conn_id, message.id)),
            created=time.time(),
            to=GatewayAddress(node_of(sender.conn_id)),
        )
        try:
            self._emit(failed)
        except (BusUnavailable, NoRoute) as exc:
            log.info(
                "service %r could not tell client %s that %s will not be handled (%s); its "
                "gateway will, once this instance has left",
                self.name,
                sender.conn_id,
                message.id,
                exc,
            )
            return
        self._note_handled(message)

    def _note_handled(self, message: Envelope) -> None:
        """A handler is done with ``message``: its gateway is told (batched)."""
        sender = message.sender
        if type(sender) is not ClientAddress or self._closed:
            return
        node = node_of(sender.conn_id)
        ids = self._handled.setdefault(node, [])
        ids.append(message.id)
        if len(ids) >= BATCH_COUNT:
            self._queue_done()
        self._idle.clear()
        self._wake.set()

    def _queue_done(self) -> None:
        """Queue the done notices gathered so far, one per gateway."""
        handled, self._handled = self._handled, {}
        headers = {DONE_HEADER: self.instance}
        for node, ids in handled.items():
            subject = self.subjects.to_gateway(node, self.name)
            payload = msgspec.msgpack.encode(ids)
            self._outbound.append((subject, payload, None, False, "", headers))

    def _gateway_nodes(self, envelope: Envelope) -> list[NodeId] | None:
        """The gateways an envelope goes to; None when it was reported undeliverable."""
        directory = self._directory
        assert directory is not None
        to = envelope.to
        if isinstance(to, GatewayAddress):
            if directory.gateway_reachable(to.node):
                return [to.node]
            self._undelivered(envelope, "no_route", f"gateway {to.node} is not on the bus")
            return None
        recipients = envelope.recipients
        if recipients is not None:
            node = _only_node(recipients)
            if node is not None:
                if directory.gateway_reachable(node):
                    return [node]
                self._undelivered(
                    envelope, "no_match", f"gateway {node}, which held these connections, is gone"
                )
                return None
        if recipients is None and envelope.type in control.REQUEST_TYPES:
            # A request for any one gateway (the runtime asks each one itself when it
            # lists them: ServiceRunner's gateways).
            nodes = directory.live_gateways()[:1]
        else:
            nodes = directory.reachable_gateways()
        if not nodes:
            self._undelivered(envelope, "no_match", "no gateway is on the bus")
            return None
        return nodes

    def _payload(self, envelope: Envelope) -> bytes | None:
        """Encode an envelope; None (reported too_large) when NATS would not carry it."""
        link = self._link
        assert link is not None
        payload = encode_envelope(envelope)
        if len(payload) + 512 > link.max_payload:
            link.counters.too_large += 1
            self._warn.warning(
                "too large",
                "service %r: %s (%s) is %d bytes, more than the NATS server takes in one "
                "message (max_payload %d); not sent",
                self.name,
                envelope.type,
                envelope.id,
                len(payload),
                link.max_payload,
            )
            self._undelivered(
                envelope, "too_large", f"larger than a NATS message may carry ({link.max_payload})"
            )
            return None
        return payload

    async def _send(self) -> None:
        """Send what the service emitted, in order, for ever (one task: one order)."""
        outbound = self._outbound
        wake = self._wake
        while True:
            if not outbound:
                if self._handled:
                    self._queue_done()
                    continue
                self._idle.set()
                wake.clear()
                await wake.wait()
                continue
            subject, payload, envelope, confirm, reply, headers = outbound.popleft()
            link = self._link
            assert link is not None
            if not subject and envelope is not None:
                try:
                    await self._send_history(envelope, link)
                except Exception as exc:
                    # The sender task must go on: everything queued behind waits on it.
                    log.exception("service %r: sending %s failed", self.name, envelope.id)
                    self._undelivered(envelope, "unavailable", f"sending it failed ({exc!r})")
                continue
            batch: list[Envelope] | None = None
            if not confirm and headers is None and not reply and outbound:
                # What waits for the same gateway goes in one NATS message, in order
                # (a MessagePack array of envelopes): NATS's cost is per message.
                batch, payload = self._batch(subject, payload, envelope, link.max_payload)
            try:
                if not confirm:
                    try:
                        # nats-py's own publish: one coroutine less per envelope.
                        await link.nc.publish(subject, payload, reply=reply, headers=headers)
                    except nats.errors.Error as exc:
                        raise link.refusal(exc, len(payload)) from None
                    continue
                ack, future = link.new_ack()
                try:
                    await link.publish(subject, payload, reply=ack)
                except BaseException:
                    link.drop_ack(ack)
                    raise
            except BusUnavailable as exc:
                for failed in batch if batch is not None else [envelope]:
                    if failed is not None:
                        self._undelivered(failed, "unavailable", exc.reason)
                continue
            assert envelope is not None
            # Confirmations are awaited in the background: sending goes on meanwhile.
            service = subject.split(".")[2]
            loop = asyncio.get_running_loop()
            self._timeouts[ack] = loop.call_later(
                self.config.request_timeout, self._ack_timeout, ack, future
            )
            future.add_done_callback(functools.partial(self._confirmed, envelope, service, ack))

    # -- history -------------------------------------------------------------------------

    def _may_keep_history(self, envelope: Envelope) -> bool:
        """True when ``envelope`` enters a group's history (or may: settings unknown yet)."""
        writer = self._history
        if writer is None:
            return False
        config = writer.config
        return history_group(envelope, config if config is not None else _ANY_GROUP) is not None

    async def _refresh_history(self, *, at_start: bool = False) -> None:
        """Read the history stream's settings again.

        Raises:
            ConfigError: at start only, the stream is not as wsbus makes it.
        """
        writer = self._history
        if writer is None:
            return
        try:
            await writer.refresh()
        except ConfigError:
            if at_start:
                raise
            log.exception("service %r: the history stream cannot be used", self.name)
        except BusUnavailable as exc:
            log.warning("service %r: the history settings could not be read: %s", self.name, exc)

    async def _keep_history_current(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat * HISTORY_REFRESH_HEARTBEATS)
            if self._link is not None and self._link.connected:
                await self._refresh_history()

    async def _send_history(self, envelope: Envelope, link: Link) -> None:
        """Append a group's envelope to its history if it keeps any, then send it on.

        An append that fails fails the send (the service is told): an envelope of a group
        keeping history never reaches a gateway without its position.
        """
        writer = self._history
        assert writer is not None
        if writer.config is None:
            # No stream seen yet. A gateway makes it before it lists itself: once one is
            # listed that was not at the last look, the stream is there (unless no
            # gateway keeps history: an older wsbus), so look again then.
            gateways = tuple(self._directory.live_gateways()) if self._directory else ()
            if gateways != self._history_gateways or writer.stale(self.config.heartbeat):
                self._history_gateways = gateways
                await self._refresh_history()
        config = writer.config
        group = history_group(envelope, config) if config is not None else None
        notice: dict[str, str] | None = None
        if group is not None:
            try:
                envelope, seq = await writer.append_at(group, envelope)
                # Where the entry is: each gateway checks the position against it.
                notice = {SEQ_HEADER: str(seq)}
            except BusUnavailable as exc:
                self._warn.warning(
                    "history append",
                    "service %r: %s (%s) to group %r was not sent: its history append failed: %s",
                    self.name,
                    envelope.type,
                    envelope.id,
                    group,
                    exc.reason,
                )
                self._undelivered(envelope, "unavailable", exc.reason)
                return
        nodes = self._gateway_nodes(envelope)
        if nodes is None:
            return
        if len(nodes) > 1:
            headers = {**envelope.headers, SHARED_HEADER: "1"}
            envelope = msgspec.structs.replace(envelope, headers=headers)
        payload = self._payload(envelope)
        if payload is None:
            return
        for node in nodes:
            try:
                await link.nc.publish(
                    self.subjects.to_gateway(node, self.name), payload, headers=notice
                )
            except nats.errors.Error as exc:
                self._undelivered(envelope, "unavailable", link.refusal(exc, len(payload)).reason)
                return

    def _batch(
        self, subject: str, payload: bytes, envelope: Envelope | None, max_payload: int
    ) -> tuple[list[Envelope] | None, bytes]:
        """Take from the queue what follows for the same subject; return it and the bytes.

        None (and ``payload`` as it was) when nothing follows that can join it.
        """
        outbound = self._outbound
        limit = min(BATCH_BYTES, max_payload // 2)
        parts = [payload]
        envelopes = [envelope]
        size = len(payload)
        while outbound and len(parts) < BATCH_COUNT:
            following = outbound[0]
            if (
                following[0] != subject
                or following[3]
                or following[4]
                or following[5] is not None
                or size + len(following[1]) > limit
            ):
                break
            outbound.popleft()
            parts.append(following[1])
            envelopes.append(following[2])
            size += len(following[1])
        if len(parts) == 1:
            return None, payload
        return [e for e in envelopes if e is not None], array_header(len(parts)) + b"".join(parts)

    def _ack_timeout(self, ack: str, future: asyncio.Future[bytes]) -> None:
        self._timeouts.pop(ack, None)
        if self._link is not None:
            self._link.drop_ack(ack)
        if not future.done():
            future.set_exception(TimeoutError())

    def _confirmed(
        self, envelope: Envelope, service: str, ack: str, future: asyncio.Future[bytes]
    ) -> None:
        handle = self._timeouts.pop(ack, None)
        if handle is not None:
            handle.cancel()
        if future.cancelled():
            return
        exc = future.exception()
        if exc is None:
            answer = future.result()
            if answer == ACK_OK:
                return
            if answer == ACK_BUSY:
                detail = f"service {service!r} is busy (inbox full)"
            elif answer == NO_RESPONDERS:
                detail = f"no instance of service {service!r} answers"
            else:
                detail = f"service {service!r} refused it"
        elif isinstance(exc, TimeoutError):
            detail = (
                f"no instance of service {service!r} confirmed it within "
                f"{self.config.request_timeout:g} s"
            )
        else:
            detail = str(exc)
        self._undelivered(envelope, "unavailable", detail)

    def _undelivered(self, envelope: Envelope, status: str, detail: str) -> None:
        """Tell the service what the bus did not deliver (a report, or a failed request)."""
        runner = self._runner
        if runner is None or self._closed:
            return
        if envelope.type in control.REQUEST_TYPES:
            # The request's caller is waiting: answer it now rather than after its timeout.
            code = "unavailable" if status in ("unavailable", "too_large") else "unknown_connection"
            report = Envelope(
                id=envelope.id,
                type=control.RESULT,
                sender=GatewayAddress(BUS_NODE),
                content=msgspec.to_builtins(control.Result(False, code=code, message=detail)),
                reply_to=envelope.id,
                created=time.time(),
                to=ServiceAddress(self.name),
            )
        elif envelope.type.startswith("wsbus."):
            self._warn.warning(
                f"lost {envelope.type}",
                "service %r: %s (%s) was not delivered: %s",
                self.name,
                envelope.type,
                envelope.id,
                detail,
            )
            return
        else:
            recipients = envelope.recipients if envelope.recipients is not None else Recipients()
            report = Envelope(
                id=envelope.id,
                type=control.UNDELIVERABLE,
                sender=GatewayAddress(BUS_NODE),
                content=msgspec.to_builtins(control.Undeliverable(status, recipients, detail)),
                reply_to=envelope.id,
                created=time.time(),
                to=ServiceAddress(self.name),
            )
        try:
            runner.accept(report)
        except BusUnavailable:
            self._warn.warning(
                "report lost",
                "service %r: the report that %s was not delivered (%s) was lost: inbox full",
                self.name,
                envelope.id,
                detail,
            )

    # -- receiving -----------------------------------------------------------------------

    async def _on_message(self, msg: Msg) -> None:
        """Take one envelope for the service; confirm it (or say busy) to its sender."""
        runner, link, directory = self._runner, self._link, self._directory
        if runner is None or link is None or directory is None:
            return
        answer = ACK_REFUSED
        origin = self.subjects.origin(msg.subject)
        if origin is None:
            self._mismatch(msg.subject, "a subject wsbus does not use")
        else:
            kind, sender = origin
            try:
                envelope = decode_envelope(msg.data)
            except (msgspec.DecodeError, msgspec.ValidationError):
                self._mismatch(msg.subject, "bytes that are not an envelope")
            else:
                if not sent_by(envelope, kind, sender):
                    self._mismatch(msg.subject, f"an envelope whose sender is {envelope.sender!r}")
                else:
                    if kind == FROM_GATEWAY:
                        directory.saw_gateway(sender)
                    try:
                        runner.accept(envelope)
                    except BusUnavailable:
                        answer = ACK_BUSY
                    else:
                        # A client's message to a handler: the gateway keeps track of it
                        # until the handler is done (and tells the client if this
                        # instance dies first).
                        tracked = type(envelope.sender) is ClientAddress and (
                            envelope.type in self._tracked
                        )
                        answer = self._ack_held if tracked else ACK_OK
        if msg.reply:
            # Unsent (the link broke): the sender hears nothing and reports it unavailable.
            with contextlib.suppress(BusUnavailable):
                await link.publish(msg.reply, answer)

    async def _on_presence(self, msg: Msg) -> None:
        """Take a gateway's presence event (this service declared ``wsbus.presence``)."""
        runner = self._runner
        if runner is None:
            return
        node = self.subjects.presence_sender(msg.subject)
        envelope = read_presence(msg.data, node)
        if isinstance(envelope, str):
            self._mismatch(msg.subject, envelope)
            return
        try:
            runner.accept(envelope)
        except BusUnavailable:
            self._warn.warning(
                "presence lost",
                "service %r: a presence event from gateway %s was lost: inbox full",
                self.name,
                node,
            )

    async def _on_answer(self, msg: Msg) -> None:
        """Take a gateway's answer to one of this instance's control requests."""
        runner = self._runner
        if runner is None:
            return
        try:
            envelope = decode_envelope(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self._mismatch(msg.subject, "bytes that are not an envelope")
            return
        if type(envelope.sender) is not GatewayAddress or envelope.type != control.RESULT:
            self._mismatch(msg.subject, f"{envelope.type!r} from {envelope.sender!r}")
            return
        try:
            runner.accept(envelope)
        except BusUnavailable:
            log.warning("service %r: an answer from the gateway was lost: inbox full", self.name)

    def _mismatch(self, subject: str, what: str) -> None:
        link = self._link
        if link is not None:
            link.counters.sender_mismatches += 1
        self._warn.warning(
            "mismatch",
            "service %r dropped %s on NATS subject %s: each sender may send only as itself "
            "(check the NATS permissions: wsbus nats-config)",
            self.name,
            what,
            subject,
        )

    def _disconnected(self) -> None:
        if self._directory is not None:
            self._directory.disconnected()

    def _reconnected(self) -> None:
        directory = self._directory
        if directory is None or self._closed:
            return
        directory.reconnected()
        # What this instance sent just before the break may not have reached the
        # gateways: each is told, and tells its clients.
        notice = {LOST_HEADER: self.name}
        for node in directory.reachable_gateways():
            subject = self.subjects.to_gateway(node, self.name)
            self._outbound.append((subject, b"", None, False, "", notice))
        self._idle.clear()
        self._wake.set()


def _only_node(recipients: Recipients) -> NodeId | None:
    """The one node every recipient is on, when they are connection ids only; else None."""
    if recipients.everyone or recipients.aliases or recipients.users or recipients.groups:
        return None
    conn_ids = recipients.conn_ids
    if not conn_ids:
        return None
    node = node_of(conn_ids[0])
    for conn_id in conn_ids[1:]:
        if node_of(conn_id) != node:
            return None
    return node


def run_service(service: Service | str, config: NatsConfig | None = None) -> None:
    """Run a service on the NATS bus until SIGINT or SIGTERM (blocks)."""
    instance = load_service(service) if isinstance(service, str) else service
    asyncio.run(serve_until_stopped(lambda: ServiceHost(instance, config), instance.name))
