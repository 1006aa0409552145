"""The gateway's accounting identities (SPEC section 4), checked exactly."""

from __future__ import annotations

from wsbus import Stats

__all__ = ["assert_balanced"]


def assert_balanced(stats: Stats) -> None:
    """Check the accounting identities of SPEC section 4 exactly.

    Every frame received is published, rejected, lost, in flight or a control frame; every
    delivery queued is written, dropped or pending; and so on for envelopes, reports,
    presence events, receipts, acknowledgements and sessions. Call it once the gateway has
    settled (nothing in flight that a test is not counting).
    """
    assert stats.frames_received == (
        stats.frames_published
        + stats.frames_rejected
        + stats.frames_lost
        + stats.frames_in_flight
        + stats.frames_control
    ), stats
    assert stats.deliveries_queued == (
        stats.deliveries_written + stats.deliveries_dropped + stats.deliveries_pending
    ), stats
    assert stats.bus_envelopes == (
        stats.control_requests
        + stats.service_errors
        + stats.messages_routed
        + stats.messages_unrouted
        + stats.messages_elsewhere
    ), stats
    assert stats.reports == (
        stats.messages_unrouted + stats.messages_partial + stats.deliveries_refused
    ), stats
    assert stats.presence_events == (
        stats.presence_events_sent + stats.presence_events_lost + stats.presence_events_queued
    ), stats
    assert stats.receipts_requested == stats.receipts + stats.receipts_pending, stats
    assert stats.acks_requested == (
        stats.acks + stats.unacked + stats.unacked_dropped + stats.unacked_closed
    ), stats
    assert stats.sessions_closed == (
        stats.sessions_saved + stats.sessions_lost + stats.sessions_saving + stats.sessions_ended
    ), stats
    assert sum(stats.rejected_by_code.values()) == stats.frames_rejected, stats
    assert sum(stats.dropped_by_close_code.values()) == stats.deliveries_dropped, stats
