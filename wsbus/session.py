"""One client connection's decisions, sans-I/O: what a frame becomes, what is queued, when to close.

A :class:`Session` never awaits and never reads a clock: the driver (the
:class:`~wsbus.Gateway`) feeds it the frames it reads with the current time, and it
answers with the envelope to publish (or None), queueing its own answer frames (acks,
errors) in its outbox. Deliveries from the bus are queued the same way, under the
outbound bounds and the slow-consumer policy. When it decides to close it records the
code, the reason and whether the outbox is to be flushed first, and tells its driver.

The driver does the I/O: it writes the outbox (:meth:`Session.written` after each frame
the connection took), closes the connection, and publishes. The one synchronous
hand-off to the transport the session makes itself is ``send_nowait`` (a capability an
edge may offer, see :class:`wsbus.edge.SendsNowait`), tried only when nothing is queued
before the frame: it never waits, and it is what keeps fan-out free of a task switch per
frame. A test gives the session a fabricated clock, a fake ``send_nowait`` and a fake
driver, and runs thousands of steps a second.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeAlias

import msgspec

from . import control
from .envelope import (
    ClientAddress,
    ConnId,
    Envelope,
    EnvelopeId,
    GatewayAddress,
    ServiceAddress,
    node_of,
)
from .errors import BusUnavailable, NoRoute, PluginError
from .hooks import Drop, Hooks
from .limits import ErrorBudget, TokenBucket
from .receipts import ReceiptTracker
from .stats import Counters, bump
from .wire import (
    ClientFrame,
    Codec,
    ErrorCode,
    Rejection,
    ServerFrame,
    decode_client_frame,
    encode_server_frame,
    frame_decoder,
    frame_id,
)

if TYPE_CHECKING:
    from .gateway import GatewayConfig

__all__ = ["RATE_QUIET", "SETTLE_EVERY", "CloseCode", "Driver", "Mark", "Session"]

# The gateway's one logger: operators filter on it, whichever part decided.
log = logging.getLogger("wsbus.gateway")


class CloseCode:
    """The WebSocket close codes the gateway uses (SPEC section 3)."""

    NORMAL: Final = 1000
    GOING_AWAY: Final = 1001
    UNSUPPORTED_DATA: Final = 1003
    INVALID_DATA: Final = 1007
    POLICY: Final = 1008
    TOO_BIG: Final = 1009
    INTERNAL_ERROR: Final = 1011
    TRY_AGAIN_LATER: Final = 1013
    BAD_GATEWAY: Final = 1014
    ERROR_BUDGET: Final = 4400
    AUTH_FAILED: Final = 4401
    FORBIDDEN: Final = 4403
    AUTH_TIMEOUT: Final = 4408
    RESUMED: Final = 4409
    """The session was resumed on another connection (this one was half-open)."""
    RATE_LIMITED: Final = 4429
    SLOW_CONSUMER: Final = 4507


RATE_QUIET: Final = 1.0
"""Seconds without a rate-limit refusal that end a rate-limited episode."""

SETTLE_EVERY: Final = 64
"""Deliveries taken while earlier ones wait in the transport, between two looks inline:
the list of unconfirmed frames stays within what the transport holds plus this."""

Mark: TypeAlias = "bool | ReceiptTracker"
"""What a queued frame is: False for the gateway's own frame, True for a delivery, a
:class:`~wsbus.receipts.ReceiptTracker` for a delivery whose outcome a receipt waits for
(truthy too, so counting deliveries costs what it did)."""

SESSION_CONTROL: Final = frozenset({control.PROCESSED, "wsbus.resume"})
"""``wsbus.*`` types a client may send to an open session (the gateway answers them).

``wsbus.resume`` is accepted only as the first frame after the welcome, which the gateway
reads before the session sees frames: here it is answered ``invalid_message``."""

MAX_PROCESSED_ID: Final = 256
"""The longest id a ``wsbus.processed`` frame may name (envelope ids are far shorter)."""

REF_DECODE_LIMIT: Final = 4096
"""Refused frames up to this size are skimmed for their id, for the error's ``ref``;
larger ones are not, so that refusing a flood stays cheap."""


def _ref(data: str | bytes, codec: Codec) -> str | None:
    """Return the id of a frame being refused without processing, if it is cheap to find.

    Only the top-level ``id`` is read (msgspec skips the rest in C): the frame is not
    validated, so a refusal costs what skimming at most REF_DECODE_LIMIT bytes costs.
    """
    if len(data) > REF_DECODE_LIMIT:
        return None
    return frame_id(data, codec)


def _trace_headers(traceparent: str, frame: ClientFrame) -> dict[str, str]:
    """Return the envelope headers that carry a frame's W3C trace context (checked by wire)."""
    headers = {"traceparent": traceparent}
    if frame.tracestate is not None:
        headers["tracestate"] = frame.tracestate
    return headers


class Driver(Protocol):
    """What a session asks of the code that does its I/O (the gateway, or a test's fake).

    Each is called once per need, never re-entrantly into the session.
    """

    def write(self) -> None:
        """The outbox went from empty to one frame: write it out, calling ``written``."""

    def close(self) -> None:
        """The session decided to close (``close_code``, ``close_reason``, ``flushing``)."""

    def settle_soon(self) -> None:
        """Frames wait in the transport: call ``settle`` soon, and again while some do."""


class Session:
    """One open connection's state and decisions. Never awaits; the time is an argument.

    Args:
        conn_id: the connection's id.
        codec: the codec the connection negotiated.
        config: the gateway's settings.
        counters: the gateway's counters, added to as things happen.
        hooks: the plugins' hooks (inbound authorize and transform).
        addresses: where the connection's stamped address is kept (the registry's
            ``addresses`` view): read for each message, so an alias change is seen at once.
        next_id: makes ids for frames without one of their own, and for answer frames
            (an :class:`~wsbus.envelope.IdFactory`'s ``next``, shared by the sessions).
        send_nowait: the connection's non-waiting write, when it has one.
        unsent: the connection's count of taken frames not yet on the socket, when it
            can tell: deliveries count written only once they have left.
        driver: told when the outbox needs writing, the connection closing, or taken
            frames settling.
        report: publishes an envelope of the gateway's own (through its report queue,
            never waiting): the ``wsbus.processed`` acknowledgements for services.
    """

    __slots__ = (
        "_addresses",
        "_bucket",
        "_budget",
        "_config",
        "_counters",
        "_decode",
        "_driver",
        "_hooks",
        "_is_text",
        "_next_id",
        "_rate_last",
        "_rate_since",
        "_report",
        "_send_nowait",
        "_unacked",
        "_unsent",
        "close_code",
        "close_reason",
        "codec",
        "conn_id",
        "flushing",
        "frame_id",
        "kicked",
        "outbox",
        "outbox_bytes",
        "pending",
        "shutting_down",
        "unconfirmed",
    )

    def __init__(
        self,
        conn_id: ConnId,
        codec: Codec,
        config: GatewayConfig,
        counters: Counters,
        hooks: Hooks,
        addresses: Mapping[ConnId, ClientAddress],
        next_id: Callable[[], EnvelopeId],
        *,
        send_nowait: Callable[[bytes], bool] | None = None,
        unsent: Callable[[], int] | None = None,
        driver: Driver | None = None,
        report: Callable[[Envelope], None] | None = None,
    ) -> None:
        self.conn_id = conn_id
        self.codec = codec
        self._is_text = codec.is_text
        self._counters = counters
        self._hooks = hooks
        self._addresses = addresses
        self._next_id = next_id
        self._send_nowait = send_nowait
        self._unsent = unsent
        self._driver = driver
        self._report = report
        # Deliveries the client was asked to acknowledge, by id, oldest first; made with
        # the first one.
        self._unacked: dict[str, Envelope] | None = None
        self._config = config
        self._decode = frame_decoder(codec, config.wire)
        self._bucket = TokenBucket(config.rate, config.burst)
        self._budget = ErrorBudget(config.error_budget, config.error_window)
        self._rate_since: float | None = None
        self._rate_last = 0.0
        self.frame_id: str | None = None
        """The client's own id of the frame :meth:`receive` last returned, if it had one."""
        self.close_code: int | None = None
        """The code the connection is closing with; None while it is open."""
        self.close_reason = ""
        self.flushing = False
        """Closing, and the outbox is written first (it explains the close)."""
        self.shutting_down = False
        """The gateway is shutting down: frames are answered ``shutting_down``."""
        self.kicked = False
        """A service closed it (``wsbus.disconnect``): its session cannot be resumed."""
        # (encoded frame, is a delivery); the head stays queued until it is written. Made
        # only once a frame has to wait: an idle connection carries none (memory per
        # connection is a number users plan capacity with).
        self.outbox: deque[tuple[bytes, Mark]] | None = None
        self.outbox_bytes = 0
        self.pending = 0
        """Deliveries queued or taken and not yet known to have reached the socket."""
        # For each frame taken but not known to have reached the socket, whether it is a
        # delivery; None when there are none (the usual case).
        self.unconfirmed: deque[Mark] | None = None

    # -- frames in -----------------------------------------------------------------------

    def receive(self, data: str | bytes, now: float, wall: float) -> Envelope | None:
        """Take one frame read at ``now`` (loop time; ``wall``: seconds since the epoch).

        Returns:
            The envelope to publish, stamped with the sender; None when the frame was
            answered (queued in the outbox) or the connection is closing.
        """
        counters = self._counters
        counters.frames_received += 1
        # One test for the three refusals before the rate limit (this runs once per frame).
        if (
            self.close_code is not None
            or self.shutting_down
            or isinstance(data, str) is not self._is_text
        ):
            self._refuse(data, now)
            return None
        if not self._bucket.take(now):
            self._rate_limited(data, now)
            return None
        frame = self._decode(data)
        if isinstance(frame, Rejection):
            if frame.code is ErrorCode.RESERVED_TYPE:
                # Only a wsbus.* type costs this second look: the gateway's own frames.
                control_frame = decode_client_frame(
                    data, self.codec, self._config.wire, allowed_control=SESSION_CONTROL
                )
                if not isinstance(control_frame, Rejection):
                    self._control_frame(control_frame, now, wall)
                    return None
            self.reject(frame.code, frame.message, frame.ref, now)
            return None
        own_id = self.frame_id = frame.id
        # Positional (id, type, sender, content, recipients, reply_to, headers, created):
        # half the cost of keywords, once per client frame. The id is the client's own,
        # when it gave one, so that replies can point at it.
        # (Not EnvelopeId(own_id): a NewType's call is a Python call, for nothing.)
        envelope = Envelope(
            own_id if own_id is not None else self._next_id(),  # type: ignore[arg-type]
            frame.type,
            self._addresses[self.conn_id],
            frame.content,
            None,
            frame.reply_to,
            # A client's W3C trace context travels on in the headers (docs/tracing.md);
            # the one look per frame at it.
            {} if frame.traceparent is None else _trace_headers(frame.traceparent, frame),
            wall,
        )
        if self._hooks.inbound_hooks:
            return self._inbound(envelope, own_id, now)
        return envelope

    def _refuse(self, data: str | bytes, now: float) -> None:
        """Refuse a frame read while closing, while shutting down, or of the wrong kind."""
        counters = self._counters
        if self.close_code is not None:
            # Read after we decided to close: it goes down with the connection.
            counters.frames_lost += 1
            return
        codec = self.codec
        if self.shutting_down:
            message = "the server is shutting down"
            self.reject(ErrorCode.SHUTTING_DOWN, message, _ref(data, codec), now)
            return
        counters.frames_lost += 1
        kind = "binary" if self._is_text else "text"
        self.close(CloseCode.UNSUPPORTED_DATA, f"{kind} frame on a {codec.value} connection")

    def _control_frame(self, frame: ClientFrame, now: float, wall: float) -> None:
        """Carry out a ``wsbus.*`` frame the client may send (:data:`SESSION_CONTROL`)."""
        if frame.type != control.PROCESSED:
            message = f"{frame.type} is accepted only as the first frame after wsbus.welcome"
            self.reject(ErrorCode.INVALID_MESSAGE, message, frame.id, now)
            return
        ids = frame.content.get("ids") if isinstance(frame.content, dict) else None
        if (
            not isinstance(ids, list)
            or not ids
            or not all(type(i) is str and 0 < len(i) <= MAX_PROCESSED_ID for i in ids)
        ):
            message = 'wsbus.processed needs content {"ids": [<message id>, ...]}'
            self.reject(ErrorCode.INVALID_MESSAGE, message, frame.id, now)
            return
        self._counters.frames_control += 1
        self.processed(ids, wall)

    def _rate_limited(self, data: str | bytes, now: float) -> None:
        # A flood that is only partly refused is still a flood: frames that get through do
        # not end the episode; a quiet second without a refusal does.
        if self._rate_since is None or now - self._rate_last > RATE_QUIET:
            self._rate_since = now
        self._rate_last = now
        if now - self._rate_since > self._config.rate_limit_close_after:
            self._counters.frames_lost += 1
            self.close(CloseCode.RATE_LIMITED, "rate limited for too long", flush=True)
            return
        message = "too many messages; slow down"
        self.reject(ErrorCode.RATE_LIMITED, message, _ref(data, self.codec), now)

    def _inbound(self, envelope: Envelope, frame_id: str | None, now: float) -> Envelope | None:
        """Run the inbound hooks on a wrapped frame; None when they refused it."""
        address = envelope.sender
        assert isinstance(address, ClientAddress)
        hooks = self._hooks
        try:
            verdict = hooks.authorize(address, envelope)
        except Exception as exc:
            self._plugin_failed(exc, envelope.type, frame_id, now)
            return None
        if not verdict.allowed:
            self.reject(ErrorCode.FORBIDDEN, verdict.reason or "not allowed", frame_id, now)
            if verdict.close:
                self.close(CloseCode.FORBIDDEN, "forbidden", flush=True)
            return None
        try:
            result = hooks.transform_inbound(address, envelope)
        except Exception as exc:
            self._plugin_failed(exc, envelope.type, frame_id, now)
            return None
        if isinstance(result, Drop):
            self.reject(ErrorCode.FORBIDDEN, result.reason, frame_id, now)
            return None
        if result.sender != address:
            # Plugins may rewrite a message but never its sender.
            result = msgspec.structs.replace(result, sender=address)
        return result

    def _plugin_failed(self, exc: Exception, type: str, frame_id: str | None, now: float) -> None:
        """Answer a frame whose inbound hook raised: the server's fault, so ``unavailable``."""
        if not isinstance(exc, PluginError):
            # Hooks wraps what plugins raise (and logs it, rate-limited); anything else is
            # a bug of wsbus's own.
            log.exception("the inbound hooks failed on %r", type)
        # Not the client's fault: unavailable is retryable and never charged to the budget.
        message = "the server could not process this message; retry"
        self.reject(ErrorCode.UNAVAILABLE, message, frame_id, now)

    def published(self, frame_id: str | None) -> None:
        """Count a frame the bus took, and ack it when it carried an id."""
        counters = self._counters
        counters.frames_published += 1
        if frame_id is not None:
            counters.frames_acked += 1
            self.send_control("wsbus.ack", {"ref": frame_id})

    def publish_failed(
        self, envelope: Envelope, frame_id: str | None, exc: Exception, now: float
    ) -> bool:
        """Answer a frame the bus refused with ``exc``.

        Returns:
            True when the failure says the bus as a whole is down (the gateway then closes
            new clients after ``bus_down_close_after``); False for a refusal of this one
            message (no service handles its type, one service is down).
        """
        if isinstance(exc, NoRoute):
            message = f"nothing handles type {envelope.type!r}"
            self.reject(ErrorCode.NO_ROUTE, message, frame_id, now)
            return False
        if isinstance(exc, BusUnavailable):
            whole_bus = exc.whole_bus
        else:
            log.error("publishing %r failed: %r", envelope.type, exc, exc_info=exc)
            whole_bus = True
        self.reject(ErrorCode.UNAVAILABLE, "service unavailable; retry", frame_id, now)
        return whole_bus

    def reject(self, code: ErrorCode, message: str, ref: str | None, now: float) -> None:
        """Answer a frame with ``wsbus.error``; a client's fault spends its error budget."""
        counters = self._counters
        counters.frames_rejected += 1
        bump(counters.rejected_by_code, code.value)
        content: dict[str, Any] = {"code": code.value, "message": message, "retry": code.retry}
        if ref is not None:
            content["ref"] = ref
        self.send_control("wsbus.error", content)
        if code.client_fault and not self._budget.spend(now):
            self.close(CloseCode.ERROR_BUDGET, "too many bad frames", flush=True)

    # -- frames out ----------------------------------------------------------------------

    def welcome(self, user: str | None, resume: dict[str, Any] | None = None) -> None:
        """Queue ``wsbus.welcome``: the connection's id, codec, user and limits.

        ``resume``: the resume token and window, when resume is on.
        """
        config = self._config
        limits = {
            "max_frame_bytes": config.wire.max_frame_bytes,
            "max_depth": config.wire.max_depth,
            "max_items": config.wire.max_items,
            "rate": config.rate,
            "burst": config.burst,
            "error_budget": config.error_budget,
        }
        content: dict[str, Any] = {
            "protocol": "wsbus.v1",
            "conn_id": self.conn_id,
            "codec": self.codec.value,
            "user": user,
            "limits": limits,
        }
        if resume is not None:
            content["resume"] = resume
        self.send_control("wsbus.welcome", content)

    def send_control(self, type: str, content: Any) -> None:
        """Queue a frame of the gateway's own (welcome, ack, error) for the client."""
        data = encode_server_frame(ServerFrame(type, content, self._next_id()), self.codec)
        self.queue(data, False)

    def queue(self, data: bytes, delivery: Mark) -> bool:
        """Queue one encoded frame for the client: a message (``delivery``) or an answer.

        A delivery marked with a :class:`~wsbus.receipts.ReceiptTracker` tells it when it
        is written or dropped once queued (what was not queued, the caller tells).

        Returns:
            False when it was not queued: the connection is closing (a delivery is counted
            dropped), or the queue is full and the slow-consumer policy is ``drop`` (a
            delivery is counted refused: report it). A full queue otherwise closes the
            connection with 4507, whatever the frame.
        """
        counters = self._counters
        outbox = self.outbox
        config = self._config
        if self.close_code is None and (
            (outbox is not None and len(outbox) >= config.outbound_queue)
            or self.outbox_bytes + len(data) > config.outbound_bytes
        ):
            if delivery and config.slow_consumer == "drop":
                counters.deliveries_refused += 1
                return False
            self.close(CloseCode.SLOW_CONSUMER, "slow consumer: messages were missed")
        if self.close_code is not None:
            if delivery:
                # Counted as queued and dropped at once: it goes down with the connection.
                counters.deliveries_queued += 1
                counters.deliveries_dropped += 1
                bump(counters.dropped_by_close_code, self.close_code)
            return False
        if delivery:
            counters.deliveries_queued += 1
            self.pending += 1
        if not outbox and self._send_nowait is not None and self._send_nowait(data):
            # Taken at once: nothing was queued before it, so the order is kept.
            self._taken(delivery)
            return True
        if outbox is None:
            outbox = self.outbox = deque()
        outbox.append((data, delivery))
        self.outbox_bytes += len(data)
        if len(outbox) == 1 and self._driver is not None:
            self._driver.write()
        return True

    def written(self) -> None:
        """The connection took the outbox's head (the driver's ``send`` returned)."""
        assert self.outbox
        data, delivery = self.outbox.popleft()
        self.outbox_bytes -= len(data)
        self._taken(delivery)

    def _taken(self, delivery: Mark) -> None:
        """Count a frame the connection took written once it has reached the socket."""
        unsent = self._unsent
        flags = self.unconfirmed
        if unsent is None or (flags is None and not unsent()):
            # Adapters that cannot tell count what they take; the common case of one
            # that can: the socket took everything so far.
            if delivery:
                self.pending -= 1
                self._counters.deliveries_written += 1
                if delivery is not True:
                    delivery.outcome(self.conn_id, "written")
            return
        if flags is None:
            flags = self.unconfirmed = deque()
            if self._driver is not None:
                self._driver.settle_soon()
        flags.append(delivery)
        if len(flags) % SETTLE_EVERY == 0:
            # The list grows only with deliveries: settled inline every so many, it stays
            # bounded however long the transport keeps holding a few bytes.
            self.settle()

    def settle(self) -> None:
        """Count written the deliveries the connection says have reached the socket."""
        flags = self.unconfirmed
        unsent = self._unsent
        if flags is None or unsent is None:
            return
        confirmed = len(flags) - unsent()
        counters = self._counters
        while confirmed > 0:
            flag = flags.popleft()
            if flag:
                self.pending -= 1
                counters.deliveries_written += 1
                if flag is not True:
                    flag.outcome(self.conn_id, "written")
            confirmed -= 1
        if not flags:
            self.unconfirmed = None

    # -- acknowledgements ----------------------------------------------------------------

    def expect_ack(self, envelope: Envelope) -> None:
        """Wait for the client to acknowledge a delivery it was asked to (``ack: true``).

        At most ``resume.max_unacked`` are awaited: past that, the oldest is no longer
        (counted ``unacked_dropped``). An id awaited already is not counted again.
        """
        unacked = self._unacked
        if unacked is None:
            unacked = self._unacked = {}
        elif envelope.id in unacked:
            return
        counters = self._counters
        unacked[envelope.id] = envelope
        counters.acks_requested += 1
        counters.unacked += 1
        if len(unacked) > self._config.resume.max_unacked:
            del unacked[next(iter(unacked))]
            counters.unacked -= 1
            counters.unacked_dropped += 1

    def processed(self, ids: list[str], wall: float) -> None:
        """The client acknowledged ``ids``: tell each sending service which it awaited.

        Ids not awaited (never asked, acknowledged already, or no longer tracked) are
        ignored: a client that acknowledges twice is not at fault.
        """
        unacked = self._unacked
        if not unacked:
            return
        by_sender: dict[ServiceAddress, list[str]] = {}
        done = 0
        for id in ids:
            envelope = unacked.pop(id, None)
            if envelope is None:
                continue
            done += 1
            if isinstance(envelope.sender, ServiceAddress):
                by_sender.setdefault(envelope.sender, []).append(id)
        if not done:
            return
        counters = self._counters
        counters.acks += done
        counters.unacked -= done
        if self._report is None:
            return
        address = self._addresses.get(self.conn_id)
        alias = address.alias if address is not None else None
        user = address.user if address is not None else None
        gateway = GatewayAddress(node_of(self.conn_id))
        for sender, acked in by_sender.items():
            content = control.Processed(self.conn_id, tuple(acked), alias, user)
            self._report(
                Envelope(
                    id=self._next_id(),
                    type=control.PROCESSED,
                    sender=gateway,
                    content=msgspec.to_builtins(content),
                    created=wall,
                    to=sender,
                )
            )

    def unacked(self) -> tuple[Envelope, ...]:
        """Return the deliveries awaiting the client's acknowledgement, oldest first.

        After the close, what goes into the closed session's record for redelivery.
        """
        return tuple(self._unacked.values()) if self._unacked else ()

    # -- closing -------------------------------------------------------------------------

    def close(self, code: int, reason: str, *, flush: bool = False) -> None:
        """Decide to close: nothing more is read or queued; a second decision is ignored.

        With ``flush`` what is queued (say, the error frame that explains the close) is
        written first; otherwise it is dropped.
        """
        if self.close_code is not None:
            return
        self.close_code = code
        self.close_reason = reason
        self.flushing = flush
        if not flush and self.outbox:
            self._unmark(code)
        if code not in (CloseCode.NORMAL, CloseCode.GOING_AWAY):
            log.info("closing %s with %d: %s", self.conn_id, code, reason)
        if self._driver is not None:
            self._driver.close()

    def flush_ended(self) -> None:
        """The flush before a close is over (done, or out of time): nothing more is written."""
        self.flushing = False
        code = self.close_code
        if self.outbox and code is not None:
            self._unmark(code)

    def _unmark(self, code: int) -> None:
        """Tell receipts now that the deliveries queued here will never be written.

        Closing without a flush, nothing more is written from the outbox: a receipt need
        not wait for the close handshake (a client that stopped reading holds it for
        seconds). They are still counted dropped by :meth:`discard`, as plain deliveries.
        """
        outbox = self.outbox
        assert outbox is not None
        # The head may be in the writer's hands (its send under way, which may yet
        # succeed): it is told when the send returns, or by discard.
        head = outbox.popleft()
        try:
            if all(mark is True or not mark for _, mark in outbox):
                return
            for _, mark in outbox:
                if mark and mark is not True:
                    mark.outcome(self.conn_id, "dropped", code)
            unmarked = deque((data, bool(mark)) for data, mark in outbox)
            outbox.clear()
            outbox.extend(unmarked)
        finally:
            outbox.appendleft(head)

    def ended(self, code: int, reason: str) -> tuple[int, str]:
        """The connection is closed (with ``code``, ``reason`` unless a close was decided).

        Nothing more is queued from now on. Returns the code and reason it ended with.
        """
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
        self.flushing = False
        return self.close_code, self.close_reason

    def discard(self) -> None:
        """Once the writer has stopped: drop what the socket never took, count the close."""
        code = self.close_code
        assert code is not None, "discard() comes after ended()"
        self.settle()
        counters = self._counters
        if self.pending:
            # Receipts waiting for these learn they were dropped.
            marks = list(self.unconfirmed or ())
            marks += [mark for _, mark in self.outbox or ()]
            for mark in marks:
                if mark and mark is not True:
                    mark.outcome(self.conn_id, "dropped", code)
            counters.deliveries_dropped += self.pending
            bump(counters.dropped_by_close_code, code, self.pending)
            self.pending = 0
        self.unconfirmed = None
        self.outbox = None
        self.outbox_bytes = 0
        unacked = self._unacked
        if unacked:
            # Kept for the closed session's record (unacked()): redelivered on resume.
            counters.unacked -= len(unacked)
            counters.unacked_closed += len(unacked)
        bump(counters.closes_by_code, code)
