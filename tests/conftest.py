"""Shared fixtures and helpers for wsbus's own tests (the kit's fixtures come from the plugin)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from wsbus import (
    ClientAddress,
    Context,
    Envelope,
    Recipients,
    Service,
    handles,
)
from wsbus_cli.demo_services import Chat, Echo
from wsbus_testing.accounting import assert_balanced as assert_balanced  # tests import it here
from wsbus_testing.services import Flood as Flood

# Hypothesis's deadline and its too_slow health check time the machine, not the code: on a
# busy 2-core machine (the suite runs on two workers) they fail tests that are right. Every
# wait a test makes is bounded by its own timeouts instead.
settings.register_profile("wsbus", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("wsbus")


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


def codes(frames: list[dict[str, Any]]) -> list[str]:
    """Return the error codes among frames."""
    return [f["content"]["code"] for f in frames if f["type"] == "wsbus.error"]
