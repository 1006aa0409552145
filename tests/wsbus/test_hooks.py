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
    Drop,
    Envelope,
    Gateway,
    GatewayConfig,
    HandshakeRequest,
    Identity,
    Refusal,
    ServiceAddress,
    Undeliverable,
    Verdict,
    hookimpl,
)
from wsbus.edge import MemoryClient
from wsbus.errors import PluginError
from wsbus.hooks import PLUGIN_LOG_INTERVAL, Hooks, _FailureLog

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
    def wsbus_delivery_failed(self, message: Envelope, failure: Undeliverable) -> None:
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
async def test_a_crashing_authenticator_closes_1013_and_logs_once(
    wsbus_connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    # The server's fault, not the client's credentials: a close the client retries after
    # (not 4401, which tells it to stop), and a broken plugin does not flood the log.
    for _ in range(5):
        client = await wsbus_connect(welcome=False)
        assert await client.wait_closed() == 1013
    records = [r for r in caplog.records if "wsbus_authenticate hook raised" in r.getMessage()]
    assert len(records) == 1
    assert "auth backend down" not in records[0].getMessage()


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


# -- a plugin that raises is a server fault --------------------------------------------------


class FlakyAuthorizer:
    """Raises in wsbus_authorize on messages whose content is "boom"."""

    @hookimpl
    def wsbus_authorize(self, client: ClientAddress, message: Envelope) -> Verdict | None:
        if message.content == "boom":
            raise RuntimeError("authz backend at 10.0.0.7 is down")
        return None


class FlakyTransform:
    """Raises in wsbus_transform_inbound on messages whose content is "boom"."""

    @hookimpl
    def wsbus_transform_inbound(self, message: Envelope) -> Envelope | None:
        if message.content == "boom":
            raise RuntimeError("transform bug at /srv/plugin.py")
        return None


class RaisingOutbound:
    @hookimpl
    def wsbus_transform_outbound(self, message: Envelope) -> Envelope | None:
        raise RuntimeError("outbound bug")


@pytest.mark.parametrize(
    ("wsbus_plugins", "hook", "plugin"),
    [
        ([FlakyAuthorizer()], "wsbus_authorize", "tests.wsbus.test_hooks.FlakyAuthorizer"),
        ([FlakyTransform()], "wsbus_transform_inbound", "tests.wsbus.test_hooks.FlakyTransform"),
    ],
)
async def test_fifty_raising_hook_calls_answer_unavailable_and_do_not_close_the_client(
    wsbus_client: MemoryClient,
    wsbus_gateway: Gateway,
    caplog: pytest.LogCaptureFixture,
    hook: str,
    plugin: str,
) -> None:
    n = 50
    assert n > wsbus_gateway.config.error_budget
    with caplog.at_level(logging.ERROR, logger="wsbus.hooks"):
        for i in range(n):
            wsbus_client.send("echo", "boom", id=f"b{i}")
        for i in range(n):
            error = await wsbus_client.receive()
            assert error["type"] == "wsbus.error", error
            assert error["content"] == {
                "code": "unavailable",
                "message": "the server could not process this message; retry",
                "retry": True,
                "ref": f"b{i}",
            }
        # Still open, and a message the plugin does not trip on goes through.
        wsbus_client.send("echo", "fine", id="f")
        assert (await wsbus_client.receive())["type"] == "wsbus.ack"
        assert (await wsbus_client.receive())["content"]["content"] == "fine"
    assert wsbus_client.close_code is None
    stats = wsbus_gateway.stats()
    assert stats.rejected_by_code == {"unavailable": n}
    assert_balanced(stats)
    # Logged once, with the plugin, the hook and the traceback; the other 49 are counted
    # and wait for the next interval.
    [record] = [r for r in caplog.records if r.name == "wsbus.hooks"]
    assert plugin in record.getMessage() and f"its {hook} hook raised" in record.getMessage()
    assert record.exc_info is not None


def test_a_raising_hook_names_the_plugin_that_raised() -> None:
    client = ClientAddress("n.1")  # type: ignore[arg-type]
    hooks = Hooks([Named()], entry_points=False)
    hooks.register(FlakyAuthorizer(), name="acme-authz")
    message = msgspec.structs.replace(_message("boom"), sender=client)
    with pytest.raises(PluginError) as info:
        hooks.authorize(client, message)
    assert (info.value.hook, info.value.plugin) == ("wsbus_authorize", "acme-authz")
    assert isinstance(info.value.__cause__, RuntimeError)
    # Unnamed: by class; the one that did not raise is not blamed.
    hooks = Hooks([FlakyTransform(), Upper()], entry_points=False)
    with pytest.raises(PluginError) as info:
        hooks.transform_inbound(client, message)
    assert info.value.plugin == "tests.wsbus.test_hooks.FlakyTransform"
    with pytest.raises(PluginError) as info:
        Hooks([RaisingOutbound()], entry_points=False).transform_outbound(message)
    assert info.value.hook == "wsbus_transform_outbound"


def test_a_plugin_that_keeps_raising_is_logged_once_per_interval() -> None:
    log = _FailureLog(60.0)
    key = ("wsbus_authorize", "p")
    assert log.admit(key, 1000.0) == 0  # the first: at once
    assert [log.admit(key, 1000.0 + t) for t in range(1, 30)] == [None] * 29
    assert log.admit(("wsbus_authorize", "other"), 1010.0) == 0  # another plugin: its own
    # The interval is over: log now, counting the 29 that were not logged and this one.
    assert log.admit(key, 1060.0) == 30
    assert log.admit(key, 1061.0) is None
    assert log.admit(key, 1200.0) == 2
    assert PLUGIN_LOG_INTERVAL > 0


@pytest.mark.parametrize("wsbus_plugins", [[RaisingOutbound()]])
async def test_a_raising_outbound_transform_is_reported_and_logged_once(
    wsbus_connect: Connect, wsbus_gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    client = await wsbus_connect()
    with caplog.at_level(logging.ERROR, logger="wsbus.hooks"):
        for i in range(5):
            client.send("echo", i, id=f"e{i}")
            assert (await client.receive())["type"] == "wsbus.ack"
        async with asyncio.timeout(5):
            while wsbus_gateway.stats().messages_unrouted < 5:
                await asyncio.sleep(0.01)
    assert len([r for r in caplog.records if r.name == "wsbus.hooks"]) == 1
    assert client.pending() == 0
    assert_balanced(wsbus_gateway.stats())
