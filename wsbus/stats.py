"""The gateway's counters: one definition, a mutable form the gateway counts in and a snapshot.

:class:`Counters` declares every figure once; :class:`Stats`, the frozen snapshot users
read, is the same fields made immutable; :meth:`Counters.zero` gives the gateway the
same attributes in plain slots to count on. Two of them are gauges, worked out from the
open sessions when a snapshot is taken (see :data:`GAUGES`); the rest are counted as
things happen.
"""

from __future__ import annotations

from typing import Any, Final, cast

import msgspec

__all__ = ["GAUGES", "Counters", "Stats", "bump"]

GAUGES: Final = frozenset({"connections", "deliveries_pending"})
"""Figures that are not counted but read from the open connections at each snapshot."""


class Counters(msgspec.Struct):
    """The mutable counters behind :class:`Stats`: the one list of their names and types.

    Build one with :meth:`zero`; the gateway's parts add to its attributes as they go, and
    :meth:`snapshot` freezes them. Every attribute is documented on :class:`Stats`.
    """

    connections: int
    connections_total: int
    connections_refused: int
    frames_received: int
    frames_published: int
    frames_acked: int
    frames_rejected: int
    frames_lost: int
    frames_in_flight: int
    rejected_by_code: dict[str, int]
    bus_envelopes: int
    control_requests: int
    service_errors: int
    messages_routed: int
    messages_unrouted: int
    messages_partial: int
    messages_elsewhere: int
    deliveries_queued: int
    deliveries_written: int
    deliveries_dropped: int
    deliveries_pending: int
    deliveries_refused: int
    dropped_by_close_code: dict[int, int]
    reports: int
    reports_lost: int
    closes_by_code: dict[int, int]
    gaps_heard: int
    gap_notices: int
    alias_releases_failed: int
    frames_control: int
    presence_events: int
    presence_events_sent: int
    presence_events_lost: int
    presence_events_queued: int
    receipts_requested: int
    receipts: int
    receipts_pending: int
    acks_requested: int
    acks: int
    unacked: int
    unacked_dropped: int
    unacked_closed: int
    resumes: int
    resumes_refused: int
    replayed: int
    redelivered: int
    history_duplicates: int
    history_gaps: int
    sessions_closed: int
    sessions_saved: int
    sessions_lost: int
    sessions_saving: int
    sessions_ended: int

    @staticmethod
    def zero() -> Counters:
        """Return counters to add to, all zero (and empty, for the ones kept by key).

        They are kept in plain slots, attribute for attribute these: assigning to a
        Struct's attribute costs about 25 ns more, and each frame and each delivery adds
        to two counters on its way (measured: 8% of a delivery's cost in the gateway).
        """
        tally = _Tally()
        for field in msgspec.structs.fields(Counters):
            setattr(tally, field.name, 0 if field.type is int else {})
        return cast(Counters, tally)  # the same attributes, faster to assign

    def snapshot(self, **gauges: int) -> Stats:
        """Return a frozen copy, with the :data:`GAUGES` given as keyword arguments."""
        copied: dict[str, Any] = {}
        for name in Counters.__struct_fields__:
            value = getattr(self, name)
            copied[name] = dict(value) if isinstance(value, dict) else value
        copied.update(gauges)
        return Stats(**copied)


class _Tally:
    """What :meth:`Counters.zero` returns: the counters in plain slots."""

    __slots__ = Counters.__struct_fields__
    snapshot = Counters.snapshot


# The snapshot is the counters made immutable: the same fields, declared once above.
# mypy's dataclass model forbids a frozen class inheriting a mutable one; msgspec allows
# it, and it is what keeps the names from being written out twice.
class Stats(Counters, frozen=True):  # type: ignore[misc]
    """A snapshot of the gateway's counters.

    These identities hold at every snapshot (the tests check them exactly):

    - ``frames_received == frames_published + frames_rejected + frames_lost + frames_in_flight
      + frames_control``
    - ``deliveries_queued == deliveries_written + deliveries_dropped + deliveries_pending``
    - ``bus_envelopes == control_requests + service_errors + messages_routed +
      messages_unrouted + messages_elsewhere``

    ``messages_unrouted`` (no connection reached at all) and ``messages_partial`` (some
    recipients missed) each sent one ``wsbus.undeliverable`` report, as did every refused
    delivery: ``reports == messages_unrouted + messages_partial + deliveries_refused``.

    Presence events, delivery receipts and client acknowledgements each balance on their own:

    - ``presence_events == presence_events_sent + presence_events_lost +
      presence_events_queued``
    - ``receipts_requested == receipts + receipts_pending``
    - ``acks_requested == acks + unacked + unacked_dropped + unacked_closed``
    - ``sessions_closed == sessions_saved + sessions_lost + sessions_saving +
      sessions_ended``

    A resume's deliveries are deliveries like any other: ``replayed`` and ``redelivered``
    are part of ``deliveries_queued`` (and so of its identity). A ``wsbus.resume`` frame
    ends as a resume (counted in ``frames_control``) or a refusal (in ``frames_rejected``,
    under ``resume_failed`` when the token or its session was at fault).

    Attributes:
        connections: open connections now.
        connections_total: connections accepted since start.
        connections_refused: connections closed before the welcome (auth, capacity, ...).
        frames_received: client frames read, after authentication.
        frames_published: frames put on the bus.
        frames_acked: of those, acked (they carried an id).
        frames_rejected: frames answered with ``wsbus.error``.
        frames_lost: frames that ended with their connection's close (wrong frame type).
        frames_in_flight: frames being published right now.
        rejected_by_code: ``frames_rejected`` by error code.
        bus_envelopes: envelopes the bus delivered to the gateway.
        control_requests: of those, ``wsbus.*`` control requests (and the presence
            events of other gateways: they change nothing routed).
        service_errors: of those, ``wsbus.failed`` reports: a service's handler raised on a
            client's message. Each told that client ``service_error`` (with the message's
            id as ``ref``), unless it had disconnected or the message carried no id.
        messages_routed: messages queued to at least one connection.
        messages_unrouted: messages that reached no connection (reported to the sender).
        messages_partial: routed messages that missed some recipients (reported).
        messages_elsewhere: messages with nothing to deliver and nothing to report: every
            match was excluded, or a shared bus sent them to every gateway and none of the
            recipients was this one's.
        deliveries_queued: (message, connection) pairs queued for writing.
        deliveries_written: of those, written to the connection; with an adapter that can
            tell (``unsent()``, as the WebSocket edge), once they have reached the socket.
        deliveries_dropped: of those, dropped because the connection closed first.
        deliveries_pending: of those, waiting in a queue now, or taken by the connection
            and not yet known to have reached the socket.
        deliveries_refused: deliveries never queued because the queue was full and the
            slow-consumer policy is ``drop`` (reported to the sender).
        dropped_by_close_code: ``deliveries_dropped`` by the close code that ended them.
        reports: ``wsbus.undeliverable`` reports sent.
        reports_lost: reports and control answers that could not be put on the bus.
        closes_by_code: connections closed, by close code.
        gaps_heard: times the bus said deliveries meant for this gateway may have been
            lost (its link broke, or it dropped envelopes: :class:`~wsbus.bus.HearsLoss`).
        gap_notices: ``wsbus.gap`` frames queued for clients: one per open connection for
            each loss heard, except where the connection's last notice already covers it
            (nothing was queued or connected since the previous loss).
        alias_releases_failed: aliases the bus could not release when they were cleared,
            replaced or their connection ended (on a bus that keeps aliases unique across
            gateways); each is tried again, and the bus frees it when the gateway is gone.
        frames_control: client frames the gateway handled itself: ``wsbus.processed``
            acknowledgements and ``wsbus.resume`` frames that resumed.
        presence_events: ``wsbus.presence`` events this gateway made: a connection of its
            own joined or left a group (or disconnected, leaving each), or it reported a
            dead gateway.
        presence_events_sent: of those, taken by the bus.
        presence_events_lost: of those, the bus did not take (the report queue was full,
            or the bus refused): services and other gateways never heard of them.
        presence_events_queued: of those, waiting to go on the bus now.
        receipts_requested: messages to clients that asked for a delivery receipt (the
            ``wsbus-receipt`` header) from a service.
        receipts: of those, answered with this gateway's ``wsbus.receipt`` (once the
            outcome for every connection it delivered to was known).
        receipts_pending: of those, waiting for an outcome now (a delivery not yet
            written, nor dropped).
        acks_requested: deliveries that asked their client for an acknowledgement (the
            ``wsbus-ack`` header), each one the gateway began to wait for.
        acks: of those, acknowledged by the client (``wsbus.processed``; each reported to
            the service that sent it).
        unacked: of those, awaited now.
        unacked_dropped: of those, no longer awaited because their connection awaited
            ``resume.max_unacked`` newer ones (the oldest make room).
        unacked_closed: of those, still unacknowledged when their connection closed
            (kept in the closed session's record, for redelivery on resume).
        resumes: sessions resumed (``wsbus.resumed`` sent).
        resumes_refused: ``wsbus.resume`` frames refused with ``resume_failed``: forged,
            used, expired or another user's token, or resume off.
        replayed: deliveries queued by resumes from the groups' history (also counted in
            ``deliveries_queued``).
        redelivered: unacknowledged deliveries queued again by resumes (also counted in
            ``deliveries_queued``).
        history_duplicates: history messages the bus delivered twice, dropped by the
            gateway's per-group order stage before routing (not in ``bus_envelopes``).
        history_gaps: holes in a history group's order that its history could not fill
            (or a new epoch): each sent the group's members here ``wsbus.gap`` with
            ``groups``.
        sessions_closed: welcomed connections closed with resume on.
        sessions_saved: of those, kept by the session store (the bus's, or the gateway's).
        sessions_lost: of those, not kept: the store could not be reached (warned about,
            once a minute at most). Their clients cannot resume.
        sessions_saving: of those, being saved now.
        sessions_ended: of those, not kept because they cannot be resumed: closed by a
            service (``wsbus.disconnect``) or for what the client did (1008, 4400, 4401,
            4403, 4408, 4429), or with nothing to restore (no group, alias or unacked).
    """


def bump(counter: dict[Any, int], key: Any, n: int = 1) -> None:
    """Add ``n`` to ``counter[key]``, starting from zero."""
    counter[key] = counter.get(key, 0) + n
