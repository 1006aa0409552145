"""Hooks: the specs, the typed facade, chaining, and the gateway calling each of them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import msgspec
import pytest

from tests.conftest import assert_balanced
from wsbus import (
    ClientAddress,
    DeliveryFailure,
    Drop,
    Envelope,
    Gateway,
    GatewayConfig,
    HandshakeRequest,
    Hooks,
    Identity,
    MemoryClient,
    Refusal,
    ServiceAddress,
    Verdict,
    hookimpl,
)

Connect = Callable[..., Awaitable[MemoryClient]]


def _message(content: object = None, type: str = "t") -> Envelope:
    return Envelope(id="1", type=type, sender=ServiceAddress("s"), content=content)  # type: ignore[arg-type]


class Upper:
    @hookimpl
    def wsbus_transform_outbound(self, message: Envelope) -> Envelope | None:
        if isinstance(message.content, str):
            return msgspec.structs.replace(message, content=message.content.upper())
        return None


class Exclaim:
    @hookimpl
    def wsbus_transform_outbound(self, message: Envelope) -> Envelope | None:
        if isinstance(message.content, str):
            return msgspec.structs.replace(message, content=message.content + "!")
        return None


class Censor:
    @hookimpl(tryfirst=True)
    def wsbus_transform_outbound(self, message: Envelope) -> Drop | None:
        return Drop("censored") if message.content == "secret" else None


def test_transforms_chain_in_pluggy_order() -> None:
    # pluggy calls the last registered first.
    hooks = Hooks([Upper(), Exclaim()], entry_points=False)
    result = hooks.transform_outbound(_message("hi"))
    assert isinstance(result, Envelope) and result.content == "HI!"
    hooks = Hooks([Exclaim(), Upper()], entry_points=False)
    result = hooks.transform_outbound(_message("hi"))
    assert isinstance(result, Envelope) and result.content == "hi!".upper()


def test_a_drop_stops_the_chain() -> None:
    hooks = Hooks([Upper(), Censor()], entry_points=False)
    assert hooks.transform_outbound(_message("secret")) == Drop("censored")


def test_no_plugins_means_allow_and_unchanged() -> None:
    hooks = Hooks(entry_points=False)
    message = _message("x")
    client = ClientAddress("n.1")  # type: ignore[arg-type]
    assert hooks.authorize(client, message) == Verdict.allow()
    assert hooks.transform_inbound(client, message) is message
    assert hooks.authenticate(HandshakeRequest()) is None


def test_entry_point_plugins_load_without_error() -> None:
    # No wsbus plugin is installed in the test environment: loading finds none.
    hooks = Hooks()
    assert hooks.authenticate(HandshakeRequest()) is None


def test_a_failing_notification_plugin_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        @hookimpl
        def wsbus_client_connected(self) -> None:
            raise RuntimeError("plugin bug")

    hooks = Hooks([Broken()], entry_points=False)
    with caplog.at_level(logging.ERROR):
        hooks.client_connected(ClientAddress("n.1"), HandshakeRequest())  # type: ignore[arg-type]
    assert "wsbus_client_connected hook raised" in caplog.text


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []

    @hookimpl
    def wsbus_client_connected(self, client: ClientAddress) -> None:
        self.events.append(("connected", client.conn_id))

    @hookimpl
    def wsbus_client_disconnected(self, client: ClientAddress, code: int) -> None:
        self.events.append(("disconnected", code))

    @hookimpl
    def wsbus_delivery_failed(self, message: Envelope, failure: DeliveryFailure) -> None:
        self.events.append(("failed", failure.reason))


recorder = Recorder()


@pytest.mark.parametrize("wsbus_plugins", [[recorder, Censor()]])
async def test_gateway_calls_the_notification_hooks(
    wsbus_connect: Connect, wsbus_gateway: Gateway
) -> None:
    recorder.events.clear()
    client = await wsbus_connect()
    client.send("ctl.send", {"recipients": {"aliases": ["ghost"]}, "body": "x"})
    client.send("ctl.send", {"recipients": {"everyone": True}, "body": "secret"})
    async with asyncio.timeout(5):
        while len([e for e in recorder.events if e[0] == "failed"]) < 2:
            await asyncio.sleep(0.01)
    client.close(1000)
    async with asyncio.timeout(5):
        while ("disconnected", 1000) not in recorder.events:
            await asyncio.sleep(0.01)
    assert recorder.events[0] == ("connected", client.conn_id)
    assert ("failed", "no_match") in recorder.events
    assert ("failed", "filtered") in recorder.events
    assert_balanced(wsbus_gateway.stats())


class Crashing:
    @hookimpl
    def wsbus_authenticate(self, request: HandshakeRequest) -> Identity:
        raise RuntimeError("auth backend down")


@pytest.mark.parametrize("wsbus_plugins", [[Crashing()]])
async def test_a_crashing_authenticator_refuses_4401(wsbus_connect: Connect) -> None:
    client = await wsbus_connect(welcome=False)
    assert await client.wait_closed() == 4401


class Named:
    @hookimpl
    def wsbus_authenticate(self, request: HandshakeRequest) -> Identity | Refusal | None:
        if request.headers.get("x-user"):
            return Identity(user=request.headers["x-user"], alias=request.headers["x-user"])
        return None


@pytest.mark.parametrize("wsbus_plugins", [[Named()]])
async def test_identity_sets_user_and_alias(wsbus_connect: Connect, wsbus_gateway: Gateway) -> None:
    client = await wsbus_connect(request=HandshakeRequest(headers={"x-user": "kim"}))
    assert client.welcome is not None and client.welcome["user"] == "kim"
    [info] = wsbus_gateway.clients()
    assert (info.user, info.alias) == ("kim", "kim")
    client.send("echo", None)
    reply = await client.receive()
    assert reply["content"]["sender"] == {
        "type": "client",
        "conn_id": client.conn_id,
        "alias": "kim",
        "user": "kim",
    }


@pytest.mark.parametrize(("wsbus_plugins", "wsbus_config"), [([Named()], GatewayConfig(node="t"))])
async def test_two_connections_of_one_user_with_a_taken_alias(wsbus_connect: Connect) -> None:
    await wsbus_connect(request=HandshakeRequest(headers={"x-user": "kim"}))
    # The alias is taken and the policy refuses: the second is refused at the door.
    second = await wsbus_connect(request=HandshakeRequest(headers={"x-user": "kim"}), welcome=False)
    assert await second.wait_closed() == 4401
