"""Shared fixtures and helpers for wsbus's own tests (the kit's fixtures come from the plugin)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from wsbus import (
    ClientAddress,
    Context,
    Envelope,
    Recipients,
    Service,
    Stats,
    handles,
)
from wsbus_cli.demo_services import Chat, Echo


class Flood(Service):
    """Sends ``content["n"]`` numbered messages to the sender, or to a group."""

    name = "flood"

    @handles("flood")
    async def flood(self, message: Envelope, ctx: Context) -> None:
        assert isinstance(message.sender, ClientAddress)
        n = int(message.content["n"])
        group = message.content.get("group")
        pad = "x" * 8192 if message.content.get("pad") else None
        recipients = (
            Recipients(groups=(group,)) if group else Recipients(conn_ids=(message.sender.conn_id,))
        )
        for i in range(n):
            ctx.send(recipients, "flood.item", {"i": i} if pad is None else {"i": i, "pad": pad})
            if i % 64 == 63:
                # Let the event loop run the writers, as a real service's pace would.
                await asyncio.sleep(0)


class Control(Service):
    """Exposes gateway control to clients, for tests: join, alias, list, disconnect."""

    name = "control"

    def __init__(self) -> None:
        self.undeliverable: list[Envelope] = []

    @handles("ctl.join")
    async def join(self, message: Envelope, ctx: Context) -> None:
        assert isinstance(message.sender, ClientAddress)
        joined = await ctx.join(message.sender.conn_id, message.content["group"])
        ctx.reply({"joined": joined})

    @handles("ctl.alias")
    async def alias(self, message: Envelope, ctx: Context) -> None:
        assert isinstance(message.sender, ClientAddress)
        given = await ctx.set_alias(message.sender.conn_id, message.content["alias"])
        ctx.reply({"alias": given})

    @handles("ctl.send")
    async def send(self, message: Envelope, ctx: Context) -> None:
        ctx.send(Recipients(**message.content["recipients"]), "ctl.item", message.content["body"])

    @handles("wsbus.undeliverable")
    async def missed(self, message: Envelope, ctx: Context) -> None:
        self.undeliverable.append(message)


@pytest.fixture
def wsbus_services() -> list[Service]:
    """Every test gateway runs the demo services and the test helpers."""
    return [Echo(), Chat(), Flood(), Control()]


def assert_balanced(stats: Stats) -> None:
    """Check the accounting identities of SPEC section 4 exactly."""
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


def codes(frames: list[dict[str, Any]]) -> list[str]:
    """Return the error codes among frames."""
    return [f["content"]["code"] for f in frames if f["type"] == "wsbus.error"]
