"""What the gateway does with one envelope from the bus, sans-I/O.

:class:`Outbound` takes the envelopes the bus delivers: a message for clients is passed
through the outbound hooks, resolved to connections, encoded once per codec and queued on
each target :class:`~wsbus.session.Session` in arrival order (that is what keeps
per-sender, per-client order); a ``wsbus.*`` control request is carried out on the
registry and answered. Whatever must go back on the bus (control answers, ``wsbus.
undeliverable`` reports) is left in :attr:`Outbound.to_bus` for the gateway to publish.
It never awaits, and takes the time as an argument.

On a bus that keeps aliases unique across gateways (:class:`~wsbus.bus.ClaimsAliases`),
setting or clearing an alias needs the bus: with :attr:`Outbound.claims` set, those
requests are checked here and left, in order, in :attr:`Outbound.alias_requests` for the
gateway to carry out (:class:`~wsbus.aliases.AliasClaims`), which answers them with
:meth:`Outbound.answer`.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Final, Literal, NamedTuple

import msgspec

from . import control
from .bus import SHARED_HEADER
from .envelope import (
    ClientAddress,
    ConnId,
    Envelope,
    GatewayAddress,
    IdFactory,
    NodeId,
    Recipients,
    ServiceAddress,
    node_of,
)
from .errors import AliasTaken, InvalidName, PluginError, UnknownConnection
from .history import GROUP_HEADER, POSITION_HEADER
from .hooks import Drop, Hooks
from .presence import Presence
from .receipts import ReceiptTracker
from .registry import ClientInfo, ClientRegistry
from .router import Router
from .session import Mark, Session
from .stats import Counters
from .wire import Codec, ErrorCode, ServerFrame, encode_server_frame

__all__ = ["AliasChange", "Outbound"]

log = logging.getLogger("wsbus.gateway")


GAP_MESSAGES: Final = {
    "bus_disconnected": "the gateway lost its link to the message bus: messages meant for "
    "this connection may have been lost",
    "slow_consumer": "the message bus dropped messages meant for this gateway: some for "
    "this connection may have been lost",
}
"""The ``wsbus.gap`` reasons, and what a client is told for each. A reason the bus gives
that is not here reaches clients as ``unknown``; its words stay in the gateway's log."""


class AliasChange(NamedTuple):
    """A ``wsbus.alias.set`` or ``wsbus.alias.clear`` that waits for the bus's alias table.

    Attributes:
        request: the control request, to answer.
        conn_id: the connection whose alias changes.
        alias: the alias asked for; None to clear it.
        wall: when the request arrived (seconds since the epoch).
    """

    request: Envelope
    conn_id: ConnId
    alias: str | None
    wall: float


class Outbound:
    """Routes, encodes and queues what the bus delivers; carries out control requests.

    Args:
        node: the gateway's node id.
        sessions: the open sessions by connection id (the gateway's own dict, shared).
        registry: the connections' names and groups.
        router: resolves recipients to connections (over ``registry``).
        hooks: the plugins' hooks (outbound transform, delivery failed).
        counters: the gateway's counters.
        ids: makes ids for the envelopes it sends on the bus.
        presence_frames: patterns of the groups whose members get ``wsbus.presence``
            frames (``GatewayConfig.presence_frames``).
    """

    def __init__(
        self,
        node: NodeId,
        sessions: dict[ConnId, Session],
        registry: ClientRegistry,
        router: Router,
        hooks: Hooks,
        counters: Counters,
        ids: IdFactory,
        *,
        presence_frames: Iterable[str] = (),
    ) -> None:
        self._node = node
        self.address = GatewayAddress(node)
        self._sessions = sessions
        self._registry = registry
        self._router = router
        self._hooks = hooks
        self._counters = counters
        self._ids = ids
        self.to_bus: deque[Envelope] = deque()
        """Envelopes to publish on the bus (answers and reports), oldest first."""
        # What had been queued and connected when the last gap notices went out.
        self._gap_mark: tuple[int, int] | None = None
        self.claims = False
        """Aliases are claimed on the bus: alias requests go to :attr:`alias_requests`."""
        self.alias_requests: deque[AliasChange] = deque()
        """Alias requests checked and waiting for the bus's alias table, oldest first."""
        self.presence = Presence(node, presence_frames)
        """The presence decisions: events to publish, frames for members."""
        self.probed: Callable[[Envelope], None] | None = None
        """Called with each ``wsbus.probe`` envelope that came back (the gateway's)."""
        self.post: Callable[[], None] | None = None
        """The gateway's function that publishes :attr:`to_bus` (for envelopes made outside
        :meth:`deliver`: a receipt completed by a write, an acknowledgement)."""
        self.joined: Callable[[ConnId, str], None] | None = None
        """Told of each join (the resumer notes where the group's history stood)."""

    def deliver(self, envelope: Envelope, wall: float) -> None:
        """Take one envelope from the bus at ``wall`` (seconds since the epoch).

        Never raises: every failure becomes a report to the sending service.
        """
        counters = self._counters
        counters.bus_envelopes += 1
        if envelope.type.startswith("wsbus."):
            if envelope.type == control.FAILED:
                counters.service_errors += 1
                self._service_failed(envelope)
                return
            if envelope.type == control.PRESENCE and isinstance(envelope.sender, GatewayAddress):
                # Another gateway's member joined or left: counted with the control
                # envelopes (it changes nothing routed).
                counters.control_requests += 1
                for group, content in self.presence.heard(envelope):
                    self._frame_members(group, content, None)
                return
            counters.control_requests += 1
            self._control(envelope, wall)
            return
        # A receipt or acknowledgements asked for (by a service): the one look per message
        # at them; a message without headers pays one truth test.
        headers = envelope.headers
        receipt = ack = False
        if headers and isinstance(envelope.sender, ServiceAddress):
            receipt = headers.get(control.RECEIPT_HEADER) == "1"
            ack = headers.get(control.ACK_HEADER) == "1"
            if receipt:
                counters.receipts_requested += 1
        if envelope.recipients is None:
            counters.messages_unrouted += 1
            self._report(
                envelope, "no_match", Recipients(), "the message names no recipients", wall
            )
            if receipt:
                self._receipt(envelope, Recipients(), None, wall)
            return
        try:
            result = self._hooks.transform_outbound(envelope)
        except Exception as exc:
            if not isinstance(exc, PluginError):  # a PluginError was logged by the hooks
                log.exception("an outbound transform plugin raised on %r", envelope.type)
            result = Drop("an outbound plugin failed")
        if isinstance(result, Drop):
            counters.messages_unrouted += 1
            self._report(envelope, "filtered", envelope.recipients, result.reason, wall)
            if receipt:
                self._receipt(envelope, Recipients(), "filtered", wall)
            return
        recipients = result.recipients
        if recipients is None:
            recipients = envelope.recipients
        targets, unmatched = self._router.resolve(recipients)
        missed_here = unmatched
        shared = unmatched is not None and result.headers.get(SHARED_HEADER) == "1"
        if unmatched is not None and shared:
            unmatched = self._own_misses(unmatched)
        if not targets and unmatched is None:
            # Nothing to deliver and nothing missed: every match was excluded, or the
            # message was shared with other gateways and none of it was this one's.
            counters.messages_elsewhere += 1
            if receipt:
                self._receipt(envelope, self._receipt_misses(missed_here, shared), None, wall)
            return
        if not targets:
            missed = unmatched or recipients
            counters.messages_unrouted += 1
            self._report(result, "no_match", missed, "no open connection matched", wall)
            if receipt:
                self._receipt(envelope, self._receipt_misses(missed_here, shared), None, wall)
            return
        sessions = self._sessions
        frame = ServerFrame(
            result.type, result.content, result.id, result.reply_to, result.sender.public_name
        )
        if ack:
            frame.ack = True
        if headers:
            # A history message: its group and position, for the client to resume from.
            frame.pos = headers.get(POSITION_HEADER)
            if frame.pos is not None:
                frame.group = headers.get(GROUP_HEADER)
        encoded: dict[Codec, bytes] = {}
        try:
            for codec in {sessions[conn_id].codec for conn_id in targets}:
                encoded[codec] = encode_server_frame(frame, codec)
        except (msgspec.EncodeError, TypeError, ValueError, OverflowError) as exc:
            counters.messages_unrouted += 1
            detail = f"content cannot be encoded: {exc}"
            self._report(result, "encode_failed", recipients, detail, wall)
            if receipt:
                self._receipt(envelope, Recipients(), "encode_failed", wall)
            return
        counters.messages_routed += 1
        refused: list[ConnId] = []
        if receipt or ack:
            tracker: ReceiptTracker | None = None
            if receipt:
                counters.receipts_pending += 1
                misses = self._receipt_misses(missed_here, shared)
                tracker = ReceiptTracker(
                    envelope,
                    self._node,
                    len(targets),
                    misses,
                    self._registry.addresses,
                    self._receipt_done,
                    wall,
                )
            # Awaited as the service sent it: a redelivery passes the hooks again.
            refused = self._queue_tracked(envelope, targets, encoded, tracker, ack)
        else:
            for conn_id in targets:
                session = sessions[conn_id]
                if not session.queue(encoded[session.codec], True) and session.close_code is None:
                    refused.append(conn_id)
        if unmatched is not None:
            counters.messages_partial += 1
            detail = "some recipients matched no connection"
            self._report(result, "no_match", unmatched, detail, wall)
        for conn_id in refused:
            only = Recipients(conn_ids=(conn_id,))
            self._report(result, "slow_consumer", only, "the client's queue is full", wall)

    def _queue_tracked(
        self,
        envelope: Envelope,
        targets: list[ConnId],
        encoded: dict[Codec, bytes],
        tracker: ReceiptTracker | None,
        ack: bool,
    ) -> list[ConnId]:
        """Queue a message that asked for a receipt or acknowledgements; return the refused.

        Each connection's outcome goes to the receipt (``tracker``; those queued tell it
        when they are written or dropped); with ``ack``, each delivery not refused is
        awaited for its acknowledgement.
        """
        mark: Mark = tracker if tracker is not None else True
        sessions = self._sessions
        refused: list[ConnId] = []
        for conn_id in targets:
            session = sessions[conn_id]
            if session.queue(encoded[session.codec], mark):
                if ack:
                    session.expect_ack(envelope)
                continue
            code = session.close_code
            if code is None:
                refused.append(conn_id)
                if tracker is not None:
                    tracker.outcome(conn_id, "refused")
                continue
            # Dropped by the close under way: still awaited, for redelivery on resume.
            if ack:
                session.expect_ack(envelope)
            if tracker is not None:
                tracker.outcome(conn_id, "dropped", code)
        return refused

    def _receipt_misses(self, unmatched: Recipients | None, shared: bool) -> Recipients:
        """Return what a receipt says matched nothing here.

        On a shared send, only the connection ids of this node (others' are their
        gateways' to say), but every name: a name is unmatched when no gateway matched it.
        """
        if unmatched is None:
            return Recipients()
        if not shared:
            return unmatched
        own = tuple(c for c in unmatched.conn_ids if node_of(c) == self._node)
        return msgspec.structs.replace(unmatched, conn_ids=own)

    def _receipt(
        self, envelope: Envelope, unmatched: Recipients, failed: str | None, wall: float
    ) -> None:
        """Send a receipt for a message with no delivery to wait for."""
        self._counters.receipts += 1
        self._send(
            control.RECEIPT, envelope, control.Receipt(self._node, (), unmatched, failed), wall
        )

    def _receipt_done(self, tracker: ReceiptTracker) -> None:
        """The last outcome of a receipted message is in: send its receipt."""
        counters = self._counters
        counters.receipts_pending -= 1
        counters.receipts += 1
        self._send(control.RECEIPT, tracker.envelope, tracker.receipt(), tracker.wall)
        if self.post is not None:
            self.post()

    def report(self, envelope: Envelope) -> None:
        """Publish an envelope of the gateway's own now (an acknowledgement, for a session)."""
        self.to_bus.append(envelope)
        if self.post is not None:
            self.post()

    def replay(
        self,
        session: Session,
        envelopes: Iterable[Envelope],
        kind: Literal["replayed", "redelivered", "held"],
        wall: float,
    ) -> int:
        """Queue envelopes to one session, in order: what a resume gives back.

        ``replayed``: from a group's history; ``redelivered``: deliveries the client had
        not acknowledged (asked again); ``held``: live deliveries held back while the
        resume replayed. Each passes the outbound hooks, as it did the first time; a
        refused one (a full queue under ``slow_consumer = "drop"``) is reported to its
        sender, as any refused delivery.

        Returns:
            How many were queued (counted in ``deliveries_queued``, and in ``replayed``
            or ``redelivered``).
        """
        counters = self._counters
        conn_id = session.conn_id
        queued = 0
        for envelope in envelopes:
            try:
                result = self._hooks.transform_outbound(envelope)
            except Exception as exc:
                if not isinstance(exc, PluginError):
                    log.exception("an outbound transform plugin raised on %r", envelope.type)
                continue
            if isinstance(result, Drop):
                continue
            headers = envelope.headers
            frame = ServerFrame(
                result.type, result.content, result.id, result.reply_to, result.sender.public_name
            )
            ack = kind == "redelivered" or headers.get(control.ACK_HEADER) == "1"
            frame.ack = ack
            frame.pos = headers.get(POSITION_HEADER)
            if frame.pos is not None:
                frame.group = headers.get(GROUP_HEADER)
            try:
                data = encode_server_frame(frame, session.codec)
            except (msgspec.EncodeError, TypeError, ValueError, OverflowError):
                log.warning("a %s message of type %r cannot be encoded", kind, envelope.type)
                continue
            if session.queue(data, True):
                if ack:
                    session.expect_ack(envelope)
            elif session.close_code is None:
                only = Recipients(conn_ids=(conn_id,))
                self._report(result, "slow_consumer", only, "the client's queue is full", wall)
                continue
            # Queued, or counted queued and dropped by the close under way.
            queued += 1
            if kind == "replayed":
                counters.replayed += 1
            elif kind == "redelivered":
                counters.redelivered += 1
        return queued

    def gap(self, reason: str) -> int:
        """Tell every open connection that deliveries to it may have been lost.

        Queues a ``wsbus.gap`` frame (after whatever is queued already) for each welcomed
        connection that is not closing: a closing one is told by its close, and one still
        authenticating was sent nothing yet. When nothing was queued and nobody connected
        since the previous notices, those notices already say it: nothing is queued.

        Returns:
            How many notices were queued.
        """
        counters = self._counters
        counters.gaps_heard += 1
        mark = (counters.deliveries_queued, counters.connections_total)
        if mark == self._gap_mark:
            return 0
        self._gap_mark = mark
        message = GAP_MESSAGES.get(reason)
        if message is None:
            reason, message = "unknown", "messages meant for this connection may have been lost"
        content = {"reason": reason, "message": message}
        registry = self._registry
        sent = 0
        for conn_id, session in list(self._sessions.items()):
            if session.close_code is None and conn_id in registry:
                session.send_control("wsbus.gap", content)
                sent += 1
        counters.gap_notices += sent
        return sent

    def _own_misses(self, unmatched: Recipients) -> Recipients | None:
        own = tuple(c for c in unmatched.conn_ids if node_of(c) == self._node)
        return Recipients(conn_ids=own) if own else None

    def _report(
        self, envelope: Envelope, reason: str, recipients: Recipients, detail: str, wall: float
    ) -> None:
        self._counters.reports += 1
        self._hooks.delivery_failed(envelope, control.Undeliverable(reason, recipients, detail))
        if isinstance(envelope.sender, ServiceAddress):
            content = control.Undeliverable(reason, recipients, detail)
            self._send(control.UNDELIVERABLE, envelope, content, wall)

    def _send(self, type: str, about: Envelope, content: msgspec.Struct, wall: float) -> None:
        sender = about.sender
        if not isinstance(sender, ServiceAddress):
            return
        self.to_bus.append(
            Envelope(
                id=self._ids(),
                type=type,
                sender=self.address,
                content=msgspec.to_builtins(content),
                reply_to=about.id,
                created=wall,
                to=sender,
            )
        )

    # -- presence ------------------------------------------------------------------------

    def join(self, conn_id: ConnId, group: str, wall: float) -> bool:
        """Put a connection in a group; when it was not in it, publish and frame the join.

        Every join of a connection goes through here (a service's request, a resume), so
        that services and members hear of each.

        Raises:
            UnknownConnection: the connection is not open.
            InvalidName: the group name does not match the name pattern.
        """
        joined = self._registry.join(conn_id, group)
        if joined:
            if self.joined is not None:
                self.joined(conn_id, group)
            client = self._registry.address(conn_id)
            self._presence(self.presence.event("join", group, client), wall)
        return joined

    def leave(self, conn_id: ConnId, group: str, wall: float) -> bool:
        """Take a connection out of a group; when it was in it, publish and frame the leave.

        Raises:
            UnknownConnection: the connection is not open.
        """
        client = self._registry.address(conn_id)
        left = self._registry.leave(conn_id, group)
        if left:
            self._presence(self.presence.event("leave", group, client, "left"), wall)
        return left

    def disconnected(self, info: ClientInfo, wall: float) -> None:
        """A connection ended (already out of the registry): it left each of its groups."""
        client = ClientAddress(info.conn_id, info.alias, info.user)
        for group in info.groups:
            self._presence(self.presence.event("leave", group, client, "disconnected"), wall)

    def gateway_lost(self, node: NodeId, report: bool, wall: float) -> None:
        """Gateway ``node`` died: leave frames for its members; with ``report``, tell services."""
        for group, content in self.presence.lost(node):
            self._frame_members(group, content, None)
        if report and node != self._node:
            self._publish_presence(control.PresenceEvent("gateway_lost", node), wall)

    def _presence(self, event: control.PresenceEvent, wall: float) -> None:
        self._publish_presence(event, wall)
        frame = self.presence.local(event)
        if frame is not None:
            self._frame_members(frame[0], frame[1], event.conn_id)

    def _publish_presence(self, event: control.PresenceEvent, wall: float) -> None:
        # Counted by the gateway's reporter, when it takes it from to_bus.
        self.to_bus.append(self.presence.envelope(event, self._ids(), wall))

    def _frame_members(self, group: str, content: dict[str, Any], skip: ConnId | None) -> None:
        """Send a ``wsbus.presence`` frame to the group's open members here, but ``skip``."""
        sessions = self._sessions
        for conn_id in self._registry.members(group):
            if conn_id == skip:
                continue
            session = sessions.get(conn_id)
            if session is not None and session.close_code is None:
                session.send_control(control.PRESENCE, content)

    # -- control -------------------------------------------------------------------------

    def _control(self, envelope: Envelope, wall: float) -> None:
        request_type = control.REQUEST_TYPES.get(envelope.type)
        if request_type is None:
            if envelope.type == control.PROBE:
                # A probe is not a request: nothing answers it, whoever sent it.
                if envelope.sender == self.address and self.probed is not None:
                    self.probed(envelope)
                return
            if envelope.type not in (control.RESULT, control.UNDELIVERABLE):
                detail = f"{envelope.type!r} is not a request"
                result = control.Result(False, None, "unknown_request", detail)
                self._send(control.RESULT, envelope, result, wall)
            return
        try:
            request = msgspec.convert(envelope.content, request_type)
            if self.claims and envelope.type in (control.ALIAS_SET, control.ALIAS_CLEAR):
                self._defer_alias(envelope, request, wall)
                return
            result = control.Result(True, self._do_control(envelope.type, request, wall))
        except msgspec.ValidationError as exc:
            result = control.Result(False, None, "invalid_request", str(exc))
        except UnknownConnection as exc:
            result = control.Result(False, None, "unknown_connection", str(exc))
        except AliasTaken as exc:
            result = control.Result(False, None, "alias_taken", str(exc))
        except InvalidName as exc:
            result = control.Result(False, None, "invalid_name", str(exc))
        self._send(control.RESULT, envelope, result, wall)

    def _defer_alias(self, envelope: Envelope, request: Any, wall: float) -> None:
        """Check an alias request now; leave it for the gateway to claim on the bus.

        Raises:
            UnknownConnection: the connection is not open here.
            InvalidName: the alias does not match the name pattern.
        """
        conn_id = request.conn_id
        if conn_id not in self._registry or conn_id not in self._sessions:
            raise UnknownConnection(conn_id)
        alias = request.alias if envelope.type == control.ALIAS_SET else None
        if alias is not None:
            self._registry.check_name("alias", alias)
        self.alias_requests.append(AliasChange(envelope, conn_id, alias, wall))

    def answer(self, request: Envelope, result: control.Result, wall: float) -> None:
        """Answer a control request the gateway carried out later (an alias change)."""
        self._send(control.RESULT, request, result, wall)

    def _service_failed(self, envelope: Envelope) -> None:
        """Tell a client that the service handling its message failed (``wsbus.failed``)."""
        try:
            report = msgspec.convert(envelope.content, control.Failed)
        except msgspec.ValidationError as exc:
            log.warning("a malformed %s report from %s: %s", envelope.type, envelope.sender, exc)
            return
        session = self._sessions.get(report.conn_id)
        if session is None or report.conn_id not in self._registry or self._made_here(report.ref):
            # Gone, or the frame had no id of its own: there is nothing to point the error at.
            return
        # Not counted as a rejection: the frame was published (and acked) already. No text
        # of the service's: what went wrong is in its log, under this id.
        content = {
            "code": ErrorCode.SERVICE_ERROR.value,
            "message": "the service failed handling this message; its log says why",
            "ref": report.ref,
            "retry": ErrorCode.SERVICE_ERROR.retry,
        }
        session.send_control("wsbus.error", content)

    def _made_here(self, ref: str) -> bool:
        """Return True when ``ref`` has the form of an id this gateway made for a frame.

        Frames sent without an id get one of the gateway's ids on the bus.
        """
        return self._ids.made(ref)

    def _do_control(self, type: str, request: Any, wall: float) -> Any:
        registry = self._registry
        if type == control.JOIN:
            return self.join(request.conn_id, request.group, wall)
        if type == control.LEAVE:
            return self.leave(request.conn_id, request.group, wall)
        if type == control.ALIAS_SET:
            # The registry is where a session reads its address: nothing else to update.
            return registry.set_alias(request.conn_id, request.alias)
        if type == control.ALIAS_CLEAR:
            registry.clear_alias(request.conn_id)
            return None
        if type == control.CLIENTS:
            infos: list[ClientInfo]
            if request.group is None:
                infos = registry.clients()
            else:
                infos = [registry.info(c) for c in registry.members(request.group)]
            return msgspec.to_builtins(infos)
        assert type == control.DISCONNECT
        code = request.code
        if not (code in (1000, 1001, 1008) or 4000 <= code <= 4999):
            raise msgspec.ValidationError("code must be 1000, 1001, 1008 or 4000-4999")
        session = self._sessions.get(request.conn_id)
        if session is None or request.conn_id not in registry:
            raise UnknownConnection(request.conn_id)
        reason = request.reason.encode()[:120].decode("utf-8", "ignore")
        # A service that shuts a client out means it: no resume brings the session back.
        session.kicked = True
        session.close(code, reason, flush=True)
        return None
