"""The Gateway over the in-memory bus and in-memory connections: every error code, every
close code the core decides, the guarantees of SPEC section 4, and the counters."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import pytest

from tests.conftest import Control, Flood, assert_balanced, codes
from wsbus import (
    ClientAddress,
    Codec,
    ConfigError,
    ConnId,
    Context,
    Drop,
    Envelope,
    Gateway,
    GatewayConfig,
    HandshakeRequest,
    MemoryBus,
    Recipients,
    RequestTimeout,
    Service,
    TokenAuth,
    Verdict,
    handles,
    hookimpl,
)
from wsbus.edge import MemoryClient, memory_pair
from wsbus.wire import WireLimits
from wsbus_cli.demo_services import Echo
from wsbus_testing.services import Failing

Connect = Callable[..., Awaitable[MemoryClient]]


async def test_welcome_is_the_first_frame(wsbus_client: MemoryClient) -> None:
    welcome = wsbus_client.welcome
    assert welcome is not None
    assert welcome["protocol"] == "wsbus.v1"
    assert welcome["codec"] == "wsbus.v1.json"
    assert welcome["conn_id"].startswith("test.")
    assert welcome["limits"]["max_frame_bytes"] == 65536
    assert welcome["limits"]["max_items"] == 4096


@pytest.mark.parametrize("max_items", [0, 1])
def test_a_cap_of_values_that_refuses_every_frame_is_a_config_error(max_items: int) -> None:
    with pytest.raises(ConfigError, match="max_items"):
        GatewayConfig(wire=WireLimits(max_items=max_items))


async def test_message_is_stamped_published_then_acked(
    wsbus_client: MemoryClient, wsbus_bus: MemoryBus
) -> None:
    wsbus_client.send("echo", {"x": 1}, id="r1")
    ack = await wsbus_client.receive()
    assert ack["type"] == "wsbus.ack"
    assert ack["content"] == {"ref": "r1"}
    [published] = wsbus_bus.published
    assert published.sender == ClientAddress(ConnId(wsbus_client.conn_id or ""))
    assert published.id == "r1"
    reply = await wsbus_client.receive()
    assert reply["type"] == "echo.reply"
    assert reply["reply_to"] == "r1"
    assert reply["from"] == "echo"
    assert reply["content"]["sender"] == {
        "type": "client",
        "conn_id": wsbus_client.conn_id,
        "alias": None,
        "user": None,
    }


async def test_no_id_means_no_ack(wsbus_client: MemoryClient, wsbus_bus: MemoryBus) -> None:
    wsbus_client.send("echo", "hi")
    reply = await wsbus_client.receive()
    assert reply["type"] == "echo.reply"
    assert len(wsbus_bus.published) == 1


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("not json", "malformed"),
        ("[1, 2]", "malformed"),
        ('{"content": 1}', "invalid_message"),
        ('{"type": 5}', "invalid_message"),
        ('{"type": "echo", "sender": "service:auth"}', "unknown_field"),
        ('{"type": "echo", "Sender": "x"}', "unknown_field"),
        ('{"type": "echo", "sender ": "x"}', "unknown_field"),
        ('{"type": "echo", "\u0455ender": "x"}', "unknown_field"),
        ('{"type": "echo", "type": "wsbus.x"}', "malformed"),
        ('{"type": "wsbus.welcome"}', "reserved_type"),
        ('{"type": "wsbus.auth", "content": {"token": "t"}}', "reserved_type"),
        ('{"type": "echo", "content": ' + "[" * 40 + "]" * 40 + "}", "limit_exceeded"),
        ('{"type": "echo", "content": 1e999}', "bad_value"),
        ('{"type": "echo", "content": 18446744073709551616}', "bad_value"),
        ('{"type": "echo", "content": "\\ud800"}', "bad_value"),
        ('{"type": "nobody.handles.this"}', "no_route"),
    ],
)
async def test_error_codes_keep_the_connection_open(
    wsbus_client: MemoryClient, wsbus_bus: MemoryBus, raw: str, code: str
) -> None:
    wsbus_client.send_raw(raw)
    error = await wsbus_client.receive()
    assert error["type"] == "wsbus.error"
    assert error["content"]["code"] == code
    assert error["content"]["retry"] is False
    assert len(error["content"]["message"]) < 120
    assert wsbus_bus.published == []
    # Still open: a good frame gets through.
    wsbus_client.send("echo", 1, id="after")
    assert (await wsbus_client.receive())["type"] == "wsbus.ack"


async def test_error_carries_the_ref_of_a_valid_id(wsbus_client: MemoryClient) -> None:
    wsbus_client.send_raw('{"type": "echo", "id": "q7", "from": "x"}')
    error = await wsbus_client.receive()
    assert error["content"]["code"] == "unknown_field"
    assert error["content"]["ref"] == "q7"


@pytest.mark.parametrize(
    "wsbus_config", [GatewayConfig(node="t", wire=WireLimits(max_frame_bytes=100))]
)
async def test_frame_over_the_size_cap(wsbus_client: MemoryClient) -> None:
    wsbus_client.send("echo", "x" * 200)
    error = await wsbus_client.receive()
    assert error["content"]["code"] == "limit_exceeded"


async def test_msgpack_client_gets_msgpack(wsbus_connect: Connect) -> None:
    client = await wsbus_connect(Codec.MSGPACK)
    assert client.welcome is not None and client.welcome["codec"] == "wsbus.v1.msgpack"
    client.send("echo", {"b": [1, 2]}, id="m")
    raw = await client.receive_raw()
    assert msgspec.msgpack.decode(raw)["type"] == "wsbus.ack"
    client.send_raw(b"\x82\xa4type\xa4echo\xa7content\xd6\xff\x00\x00\x00\x01")
    error = await client.receive_until("wsbus.error")
    assert error["content"]["code"] == "bad_value"


async def test_binary_frame_on_json_closes_1003(
    wsbus_client: MemoryClient, wsbus_gateway: Gateway
) -> None:
    wsbus_client.send_raw(b'{"type": "echo"}')
    assert await wsbus_client.wait_closed() == 1003
    await _settle(wsbus_gateway)
    stats = wsbus_gateway.stats()
    assert stats.frames_lost == 1
    assert_balanced(stats)


async def test_text_frame_on_msgpack_closes_1003(wsbus_connect: Connect) -> None:
    client = await wsbus_connect(Codec.MSGPACK)
    client.send_raw('{"type": "echo"}')
    assert await client.wait_closed() == 1003


async def test_error_budget_closes_4400(
    wsbus_client: MemoryClient, wsbus_gateway: Gateway, wsbus_bus: MemoryBus
) -> None:
    for _ in range(25):
        wsbus_client.send_raw("junk")
    assert await wsbus_client.wait_closed() == 4400
    await _settle(wsbus_gateway)
    stats = wsbus_gateway.stats()
    assert stats.rejected_by_code["malformed"] == 21
    assert stats.frames_lost == 4
    assert wsbus_bus.published == []
    assert_balanced(stats)


async def test_no_route_and_rate_limit_do_not_spend_the_error_budget(
    wsbus_client: MemoryClient,
) -> None:
    for _ in range(30):
        wsbus_client.send_raw('{"type": "nobody.handles.this"}')
    frames = [await wsbus_client.receive() for _ in range(30)]
    assert codes(frames) == ["no_route"] * 30
    assert wsbus_client.close_code is None


@pytest.mark.parametrize("wsbus_config", [GatewayConfig(node="t", rate=1, burst=3)])
async def test_rate_limited(wsbus_client: MemoryClient, wsbus_bus: MemoryBus) -> None:
    for i in range(10):
        wsbus_client.send("echo", i)
    frames = [await wsbus_client.receive() for _ in range(10)]
    assert codes(frames).count("rate_limited") == 7
    error = next(f for f in frames if f["type"] == "wsbus.error")
    assert error["content"]["retry"] is True
    assert len(wsbus_bus.published) == 3
    assert wsbus_client.close_code is None


# test_rate_limited_for_too_long_closes_4429 moved to tests/wsbus/test_session.py
# (fabricated clock).


async def test_bus_unavailable_says_retry(wsbus_client: MemoryClient, wsbus_bus: MemoryBus) -> None:
    wsbus_bus.down = True
    wsbus_client.send("echo", 1, id="a")
    error = await wsbus_client.receive()
    assert error["content"] == {
        "code": "unavailable",
        "message": "service unavailable; retry",
        "retry": True,
        "ref": "a",
    }
    wsbus_bus.down = False
    wsbus_client.send("echo", 1, id="b")
    assert (await wsbus_client.receive())["type"] == "wsbus.ack"


@pytest.mark.parametrize("wsbus_config", [GatewayConfig(node="t", bus_down_close_after=0)])
async def test_bus_down_too_long_closes_new_clients_1014(
    wsbus_connect: Connect, wsbus_bus: MemoryBus
) -> None:
    first = await wsbus_connect()
    wsbus_bus.down = True
    first.send("echo", 1)
    assert (await first.receive())["content"]["code"] == "unavailable"
    late = await wsbus_connect(welcome=False)
    assert await late.wait_closed() == 1014
    assert first.close_code is None


@pytest.mark.parametrize("wsbus_config", [GatewayConfig(node="t", max_connections=1)])
async def test_connection_cap_closes_1013(wsbus_connect: Connect) -> None:
    await wsbus_connect()
    second = await wsbus_connect(welcome=False)
    assert await second.wait_closed() == 1013


class _Refuser:
    @hookimpl
    def wsbus_authorize(self, client: ClientAddress, message: Envelope) -> Verdict | None:
        if message.type == "chat.say":
            return Verdict.deny("no chatting here")
        if message.type == "chat.leave":
            return Verdict.deny("out", close=True)
        return None

    @hookimpl
    def wsbus_transform_inbound(self, message: Envelope) -> Envelope | Drop | None:
        if message.content == "drop me":
            return Drop("dropped by policy")
        if message.content == "rewrite":
            # A plugin may rewrite content, but a sender it sets is overwritten.
            from wsbus import ServiceAddress

            return msgspec.structs.replace(
                message, content="rewritten", sender=ServiceAddress("auth")
            )
        return None


@pytest.mark.parametrize("wsbus_plugins", [[_Refuser()]])
async def test_authorize_and_transform_hooks(
    wsbus_client: MemoryClient, wsbus_bus: MemoryBus
) -> None:
    wsbus_client.send("chat.say", {"room": "r", "text": "x"}, id="s")
    error = await wsbus_client.receive()
    assert error["content"] == {
        "code": "forbidden",
        "message": "no chatting here",
        "retry": False,
        "ref": "s",
    }
    wsbus_client.send("echo", "drop me")
    assert (await wsbus_client.receive())["content"]["code"] == "forbidden"
    wsbus_client.send("echo", "rewrite")
    reply = await wsbus_client.receive()
    assert reply["content"]["content"] == "rewritten"
    assert reply["content"]["sender"]["type"] == "client"
    [published] = wsbus_bus.published
    assert published.sender == ClientAddress(ConnId(wsbus_client.conn_id or ""))
    wsbus_client.send("chat.leave", {"room": "r"})
    assert (await wsbus_client.receive())["content"]["code"] == "forbidden"
    assert await wsbus_client.wait_closed() == 4403


@pytest.mark.parametrize(
    ("wsbus_config", "wsbus_plugins"),
    [(GatewayConfig(node="t", allow_anonymous=False, auth_timeout=5), [TokenAuth({"s3": "ann"})])],
)
async def test_authentication(wsbus_connect: Connect) -> None:
    good = await wsbus_connect(request=HandshakeRequest(token="s3"))
    assert good.welcome is not None and good.welcome["user"] == "ann"

    bad = await wsbus_connect(request=HandshakeRequest(token="nope"), welcome=False)
    assert await bad.wait_closed() == 4401

    by_frame = await wsbus_connect(welcome=False)
    by_frame.send("wsbus.auth", {"token": "s3"})
    welcome = await by_frame.receive()
    assert welcome["type"] == "wsbus.welcome" and welcome["content"]["user"] == "ann"

    wrong_frame = await wsbus_connect(welcome=False)
    wrong_frame.send("echo", "hi")
    assert await wrong_frame.wait_closed() == 4401

    bad_token_frame = await wsbus_connect(welcome=False)
    bad_token_frame.send("wsbus.auth", {"token": "guess"})
    assert await bad_token_frame.wait_closed() == 4401


@pytest.mark.parametrize(
    ("wsbus_config", "wsbus_plugins"),
    [(GatewayConfig(node="t", allow_anonymous=False, auth_timeout=0.1), [TokenAuth({"s": "u"})])],
)
async def test_no_authentication_in_time_closes_4408(wsbus_connect: Connect) -> None:
    silent = await wsbus_connect(welcome=False)
    assert await silent.wait_closed() == 4408


async def test_slow_consumer_is_closed_4507_and_others_are_unaffected(
    wsbus_connect: Connect, wsbus_gateway: Gateway
) -> None:
    slow = await wsbus_connect(buffer=8)
    fast = await wsbus_connect()
    for client in (slow, fast):
        client.send("ctl.join", {"group": "all"})
        assert (await client.receive())["content"] == {"joined": True}
    # The slow client stops reading; the service floods the group.
    fast.send("flood", {"n": 3000, "group": "all"})
    received: list[int] = []
    async with asyncio.timeout(10):
        while len(received) < 3000:
            frame = await fast.receive()
            if frame["type"] == "flood.item":
                received.append(frame["content"]["i"])
    assert received == list(range(3000))
    assert await slow.wait_closed() == 4507
    await _settle(wsbus_gateway)
    stats = wsbus_gateway.stats()
    assert stats.closes_by_code.get(4507) == 1
    assert stats.dropped_by_close_code[4507] > 0
    assert_balanced(stats)


@pytest.mark.parametrize(
    "wsbus_config", [GatewayConfig(node="t", slow_consumer="drop", drain_timeout=0.2)]
)
async def test_slow_consumer_drop_policy_reports_to_the_sender(
    wsbus_connect: Connect, wsbus_gateway: Gateway, wsbus_bus: MemoryBus
) -> None:
    slow = await wsbus_connect(buffer=4)
    slow.send("flood", {"n": 2000})
    async with asyncio.timeout(30):
        while wsbus_gateway.stats().deliveries_refused == 0:
            await asyncio.sleep(0.02)
    assert slow.close_code is None
    stats = wsbus_gateway.stats()
    assert_balanced(stats)


async def test_order_from_one_connection_to_the_bus(
    wsbus_client: MemoryClient, wsbus_bus: MemoryBus
) -> None:
    for i in range(150):
        wsbus_client.send("echo", i, id=f"m{i}")
    for _ in range(300):
        await wsbus_client.receive()
    assert [e.content for e in wsbus_bus.published] == list(range(150))


async def test_per_sender_order_through_group_fan_out(wsbus_connect: Connect) -> None:
    clients = [await wsbus_connect(codec) for codec in (Codec.JSON, Codec.MSGPACK, Codec.JSON)]
    for client in clients:
        client.send("ctl.join", {"group": "g"})
        await client.receive()
    clients[0].send("flood", {"n": 500, "group": "g"})
    for client in clients:
        items: list[int] = []
        while len(items) < 500:
            frame = await client.receive()
            if frame["type"] == "flood.item":
                items.append(frame["content"]["i"])
        assert items == list(range(500))


async def test_service_sends_to_alias_user_group_everyone(
    wsbus_connect: Connect, wsbus_services: list[Any]
) -> None:
    a = await wsbus_connect()
    b = await wsbus_connect()
    a.send("ctl.alias", {"alias": "ann"})
    assert (await a.receive())["content"] == {"alias": "ann"}
    b.send("ctl.join", {"group": "g"})
    await b.receive()

    async def expect(client: MemoryClient, body: str) -> None:
        frame = await client.receive()
        assert frame["type"] == "ctl.item" and frame["content"] == body
        assert frame["from"] == "control"

    b.send("ctl.send", {"recipients": {"aliases": ["ann"]}, "body": "to ann"})
    await expect(a, "to ann")
    a.send("ctl.send", {"recipients": {"groups": ["g"]}, "body": "to g"})
    await expect(b, "to g")
    a.send("ctl.send", {"recipients": {"conn_ids": [b.conn_id]}, "body": "to b"})
    await expect(b, "to b")
    a.send("ctl.send", {"recipients": {"everyone": True, "exclude": [a.conn_id]}, "body": "all"})
    await expect(b, "all")
    a.send("ctl.send", {"recipients": {"everyone": True}, "body": "everyone"})
    await expect(a, "everyone")
    await expect(b, "everyone")
    assert a.pending() == 0 and b.pending() == 0


async def test_unmatched_recipients_are_reported_to_the_service(
    wsbus_client: MemoryClient, wsbus_services: list[Any], wsbus_gateway: Gateway
) -> None:
    control = next(s for s in wsbus_services if isinstance(s, Control))
    wsbus_client.send("ctl.send", {"recipients": {"aliases": ["ghost"]}, "body": "x"})
    async with asyncio.timeout(5):
        while not control.undeliverable:
            await asyncio.sleep(0.01)
    [report] = control.undeliverable
    assert report.content["reason"] == "no_match"
    assert report.content["recipients"] == {"aliases": ["ghost"]}
    stats = wsbus_gateway.stats()
    assert stats.messages_unrouted == 1
    assert_balanced(stats)


async def test_chat_rooms_and_nicknames(wsbus_connect: Connect) -> None:
    ann = await wsbus_connect()
    bob = await wsbus_connect(Codec.MSGPACK)
    ann.send("chat.nick", {"nick": "ann"}, id="1")
    assert (await ann.receive_until("chat.nick.reply"))["content"] == {"ok": True, "nick": "ann"}
    bob.send("chat.nick", {"nick": "ann"}, id="1")
    taken = await bob.receive_until("chat.nick.reply")
    assert taken["content"] == {"ok": False, "error": "that nickname is taken"}
    for client in (ann, bob):
        client.send("chat.join", {"room": "lobby"})
        await client.receive_until("chat.join.reply")
    ann.send("chat.say", {"room": "lobby", "text": "hello"})
    for client in (ann, bob):
        message = await client.receive_until("chat.message")
        assert message["content"] == {"room": "lobby", "from": "ann", "text": "hello"}


async def test_graceful_shutdown_acks_or_refuses_every_frame(
    wsbus_connect: Connect, wsbus_gateway: Gateway
) -> None:
    client = await wsbus_connect()
    for i in range(50):
        client.send("echo", i, id=f"f{i}")
    closing = asyncio.create_task(wsbus_gateway.close())
    for i in range(50, 60):
        client.send("echo", i, id=f"f{i}")
    frames = []
    async with asyncio.timeout(10):
        while True:
            try:
                frames.append(await client.receive())
            except Exception:
                break
    await closing
    assert client.close_code == 1001
    answered = {
        f["content"]["ref"]
        for f in frames
        if f["type"] == "wsbus.ack"
        or (f["type"] == "wsbus.error" and f["content"]["code"] == "shutting_down")
    }
    assert answered == {f"f{i}" for i in range(60)}
    stats = wsbus_gateway.stats()
    assert stats.frames_published + stats.rejected_by_code.get("shutting_down", 0) == 60
    assert_balanced(stats)


async def test_closed_gateway_refuses_new_connections_1001(
    wsbus_connect: Connect, wsbus_gateway: Gateway
) -> None:
    await wsbus_gateway.close()
    late = await wsbus_connect(welcome=False)
    assert await late.wait_closed() == 1001


class _BusThatFailsToStart(MemoryBus):
    async def start(self, sink: Any) -> None:
        raise ConnectionRefusedError("no bus here")


async def test_a_bus_that_fails_to_start_leaves_no_task_running() -> None:
    before = asyncio.all_tasks()
    gateway = Gateway(_BusThatFailsToStart(), config=GatewayConfig(node="t"), entry_points=False)
    with pytest.raises(ConnectionRefusedError):
        async with gateway:
            pass  # pragma: no cover
    assert asyncio.all_tasks() == before
    with pytest.raises(ConnectionRefusedError):
        await gateway.start()  # start() alone, again: still nothing left behind
    assert asyncio.all_tasks() == before
    await gateway.close()


async def test_service_disconnects_a_client(
    wsbus_connect: Connect, wsbus_services: list[Any]
) -> None:
    client = await wsbus_connect()
    control = next(s for s in wsbus_services if isinstance(s, Control))
    await control.link.disconnect(ConnId(client.conn_id or ""), 4001, "bye")
    assert await client.wait_closed() == 4001


class _FlakyAuthorizer:
    @hookimpl
    def wsbus_authorize(self, message: Envelope) -> None:
        if message.content == "boom":
            raise RuntimeError("authorization backend down")


@pytest.mark.parametrize(
    ("wsbus_services", "wsbus_plugins"),
    [([Echo(), Flood(), Control(), Failing()], [_FlakyAuthorizer()])],
)
async def test_counters_balance_after_a_mixed_run(
    wsbus_connect: Connect, wsbus_gateway: Gateway
) -> None:
    a = await wsbus_connect()
    b = await wsbus_connect(Codec.MSGPACK, buffer=4)
    for client in (a, b):
        client.send("ctl.join", {"group": "mix"})
        await client.receive()
    a.send("failing.raise", None, id="f")  # acked, then service_error
    a.send("echo", "boom", id="p")  # the authorize plugin raises: unavailable
    a.send("echo", 1, id="1")
    a.send_raw("junk")
    a.send_raw('{"type": "nobody"}')
    a.send("ctl.send", {"recipients": {"aliases": ["ghost"], "groups": ["mix"]}, "body": "p"})
    a.send("ctl.send", {"recipients": {"users": ["nobody"]}, "body": "u"})
    a.send("flood", {"n": 1500, "group": "mix"})  # b stops reading: closed 4507
    async with asyncio.timeout(10):
        while b.close_code is None:
            await asyncio.sleep(0.01)
    a.send_raw(b"binary on json")  # closes a with 1003
    await a.wait_closed()
    await _settle(wsbus_gateway)
    stats = wsbus_gateway.stats()
    assert stats.frames_received >= 9
    assert stats.service_errors == 1 and stats.rejected_by_code["unavailable"] == 1
    assert stats.messages_partial >= 1 and stats.messages_unrouted >= 1
    assert stats.deliveries_dropped > 0
    assert_balanced(stats)
    await wsbus_gateway.close()
    final = wsbus_gateway.stats()
    assert final.connections == 0 and final.deliveries_pending == 0
    assert_balanced(final)


async def _settle(gateway: Gateway) -> None:
    """Let closing connections finish: bounded."""
    async with asyncio.timeout(5):
        while any(c.close_code is not None for c in gateway._sessions.values()):
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.01)


async def test_order_is_kept_when_writes_switch_between_direct_and_queued(
    wsbus_connect: Connect, wsbus_gateway: Gateway
) -> None:
    # A small client buffer makes the gateway alternate between writing at once and
    # queueing; the reader keeps up, so nothing is dropped and the order holds.
    client = await wsbus_connect(buffer=8)
    client.send("flood", {"n": 1000})
    items: list[int] = []
    async with asyncio.timeout(10):
        while len(items) < 1000:
            frame = await client.receive()
            if frame["type"] == "flood.item":
                items.append(frame["content"]["i"])
    assert items == list(range(1000))
    stats = wsbus_gateway.stats()
    assert stats.deliveries_written == 1000
    assert_balanced(stats)


@pytest.mark.parametrize(
    "wsbus_config", [GatewayConfig(node="t", outbound_bytes=256 * 1024, drain_timeout=0.2)]
)
async def test_the_outbound_queue_is_bounded_in_bytes_too(
    wsbus_connect: Connect, wsbus_gateway: Gateway
) -> None:
    # Large echo replies to a client that stopped reading: far fewer than outbound_queue
    # frames, but more bytes than outbound_bytes: closed 4507 instead of holding memory.
    client = await wsbus_connect(buffer=1)
    for _ in range(30):
        client.send("echo", "x" * 30_000)
    assert await client.wait_closed() == 4507
    await _settle(wsbus_gateway)
    assert_balanced(wsbus_gateway.stats())


async def test_a_nickname_cannot_pose_as_a_connection_id(wsbus_connect: Connect) -> None:
    ann = await wsbus_connect()
    bob = await wsbus_connect()
    ann.send("chat.nick", {"nick": bob.conn_id})
    reply = await ann.receive_until("chat.nick.reply")
    assert reply["content"] == {"ok": False, "error": "a nickname is 1-32 of A-Z a-z 0-9 _ -"}


async def test_a_client_that_falls_behind_and_catches_up_gets_everything_in_order(
    wsbus_connect: Connect, wsbus_gateway: Gateway
) -> None:
    def writers() -> list[asyncio.Task[object]]:
        return [t for t in asyncio.all_tasks() if t.get_name().startswith("wsbus-writer-")]

    lagging = await wsbus_connect(buffer=8)
    lagging.send("ctl.join", {"group": "lag"})
    assert (await lagging.receive())["content"] == {"joined": True}
    # An idle connection has no writer task: frames go straight to the connection.
    assert writers() == []
    lagging.send("flood", {"n": 500, "group": "lag"})
    received: list[int] = []
    saw_writer = False
    async with asyncio.timeout(10):
        while len(received) < 500:
            if len(received) % 50 == 0:
                await asyncio.sleep(0.01)  # behind: the gateway queues, then writes
                saw_writer = saw_writer or bool(writers())
            frame = await lagging.receive()
            if frame["type"] == "flood.item":
                received.append(frame["content"]["i"])
    assert received == list(range(500))
    assert saw_writer
    await _settle(wsbus_gateway)
    assert writers() == []  # caught up: the writer ended with its queue
    # And the next burst is written in order too, queued or not.
    lagging.send("flood", {"n": 100, "group": "lag"})
    again = [(await lagging.receive())["content"]["i"] for _ in range(100)]
    assert again == list(range(100))
    assert_balanced(wsbus_gateway.stats())


async def test_a_connection_adapter_whose_send_fails_is_closed_1011_once(
    wsbus_gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    from wsbus.edge import MemoryConnection

    class Broken(MemoryConnection):
        attempts = 0

        async def send(self, data: bytes) -> None:
            Broken.attempts += 1
            raise RuntimeError("adapter bug")

        def send_nowait(self, data: bytes) -> bool:
            return False

    conn = Broken()
    served = asyncio.create_task(wsbus_gateway.serve(conn))
    async with asyncio.timeout(5):
        while conn.close_code is None:
            await asyncio.sleep(0.01)
        await served
    assert conn.close_code == 1011
    # The welcome's one failed write closes the connection: no second try of that frame.
    assert Broken.attempts == 1
    failures = [r for r in caplog.records if "writing to" in r.getMessage()]
    assert len(failures) == 1 and "adapter" in failures[0].getMessage()
    assert wsbus_gateway.stats().closes_by_code.get(1011) == 1


# -- a full service inbox: back-pressure without deadlock or double publishing -----------


@contextlib.asynccontextmanager
async def _serving(bus: MemoryBus) -> AsyncIterator[Callable[[], Awaitable[MemoryClient]]]:
    """A started gateway on ``bus``; yields a function that connects a welcomed client.

    Every connection's task is ended by the gateway's close, or cancelled (bounded).
    """
    gateway = Gateway(bus, config=GatewayConfig(node="test"), entry_points=False)
    await gateway.start()
    tasks: list[asyncio.Task[None]] = []

    async def connect() -> MemoryClient:
        conn, client = memory_pair()
        tasks.append(asyncio.create_task(gateway.serve(conn)))
        frame = await client.receive()
        assert frame["type"] == "wsbus.welcome", frame
        client.conn_id = frame["content"]["conn_id"]
        return client

    connect.gateway = gateway  # type: ignore[attr-defined]
    try:
        yield connect
    finally:
        await gateway.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:  # noqa: ASYNC109
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


class _Joiner(Service):
    """Its first message waits for the test, then sends to nobody and joins its sender."""

    name = "joiner"

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.joined: bool | Exception | None = None
        self.done = asyncio.Event()

    @handles("joiner.work")
    async def work(self, message: Envelope, ctx: Context) -> None:
        if message.content != "first":
            return
        assert isinstance(message.sender, ClientAddress)
        await self.go.wait()
        # Reaches no connection: the gateway reports it undeliverable to this service,
        # whose inbox is full.
        ctx.send(Recipients(conn_ids=(ConnId("test.ffff"),)), "joiner.note")
        try:
            self.joined = await ctx.join(message.sender.conn_id, "room")
        except RequestTimeout as exc:
            self.joined = exc
        self.done.set()


async def test_a_report_to_a_full_inbox_does_not_hold_up_control_answers() -> None:
    joiner = _Joiner()
    bus = MemoryBus([joiner], inbox_size=2, timeout=2.0)
    async with _serving(bus) as connect:
        gateway: Gateway = connect.gateway  # type: ignore[attr-defined]
        client = await connect()
        client.send("joiner.work", "first")
        for n in range(4):
            client.send("joiner.work", n)
        # The inbox is full and the client's next frame waits for room.
        await _until(lambda: gateway.stats().frames_in_flight == 1)
        joiner.go.set()
        async with asyncio.timeout(30):
            await joiner.done.wait()
        # The report could not wait for room (it would have held up the answer): lost.
        assert joiner.joined is True
        await _until(lambda: gateway.stats().frames_published == 5)
        stats = gateway.stats()
        assert stats.reports_lost == 1
        assert_balanced(stats)


class _Fan(Service):
    """Records the ``fan.shared`` messages it takes; slow (a turn away) while ``slow``."""

    slow = True

    def __init__(self) -> None:
        self.shared: list[object] = []

    async def _take(self, message: Envelope) -> None:
        if message.type == "fan.shared":
            self.shared.append(message.content)
        if _Fan.slow:
            await asyncio.sleep(0.002)


class _FanA(_Fan):
    name = "fan-a"

    @handles("fan-a.work", "fan.shared")
    async def work(self, message: Envelope, ctx: Context) -> None:
        await self._take(message)


class _FanB(_Fan):
    name = "fan-b"

    @handles("fan-b.work", "fan.shared")
    async def work(self, message: Envelope, ctx: Context) -> None:
        await self._take(message)


async def test_a_type_two_busy_services_handle_is_taken_by_both_not_refused() -> None:
    a, b = _FanA(), _FanB()
    bus = MemoryBus([a, b], inbox_size=4, timeout=1.0)
    try:
        async with _serving(bus) as connect:
            gateway: Gateway = connect.gateway  # type: ignore[attr-defined]
            # Four clients per service: while one is let in, three still wait.
            flooders = [await connect() for _ in range(8)]
            for i, flooder in enumerate(flooders):
                for n in range(1000):
                    flooder.send("fan-a.work" if i % 2 else "fan-b.work", n)
            # Both inboxes are full, and others wait for each.
            await _until(lambda: gateway.stats().frames_in_flight == 8)
            sender = await connect()
            sender.send("fan.shared", "both", id="s")
            answer = await sender.receive(timeout=30)
            assert answer["type"] == "wsbus.ack", answer
            _Fan.slow = False  # let the floods drain
            await _until(lambda: a.shared == b.shared == ["both"], timeout=30)
            for flooder in flooders:
                flooder.close()
            await _until(lambda: gateway.stats().frames_in_flight == 0, timeout=30)
            assert_balanced(gateway.stats())
    finally:
        _Fan.slow = True


class _Counter(Service):
    name = "counter"

    def __init__(self) -> None:
        self.taken: list[object] = []

    @handles("counter.take")
    async def take(self, message: Envelope, ctx: Context) -> None:
        self.taken.append(message.content)


class _OldContractBus(MemoryBus):
    """A bus adapter written to the older contract: publish_nowait returns None."""

    def publish_nowait(self, envelope: Envelope) -> None:  # type: ignore[override]
        super().publish_nowait(envelope)


async def test_a_publish_nowait_that_returns_none_publishes_each_frame_once() -> None:
    counter = _Counter()
    bus = _OldContractBus([counter])
    async with _serving(bus) as connect:
        client = await connect()
        for n in range(3):
            client.send("counter.take", n, id=str(n))
        for _ in range(3):
            assert (await client.receive())["type"] == "wsbus.ack"
        await _until(lambda: len(counter.taken) >= 3)
        for _ in range(5):
            await asyncio.sleep(0)
        assert counter.taken == [0, 1, 2]


async def test_a_frame_waiting_for_room_when_its_connection_ends_is_counted() -> None:
    gate = _Gate()
    bus = MemoryBus([gate], inbox_size=1, timeout=30.0)
    gateway = Gateway(bus, config=GatewayConfig(node="test"), entry_points=False)
    await gateway.start()
    try:
        conn, client = memory_pair()
        reader = asyncio.create_task(gateway.serve(conn))
        await client.receive()  # the welcome
        for n in range(3):  # one held by the service, one in its inbox, one waiting
            client.send("gate.hold", n)
        await _until(lambda: gateway.stats().frames_in_flight == 1)
        client.close()
        # The edge ends the connection's task (as a server closing does): the frame
        # waiting for room ends with it.
        reader.cancel()
        async with asyncio.timeout(10):
            await asyncio.gather(reader, return_exceptions=True)
        stats = gateway.stats()
        assert stats.frames_in_flight == 0
        assert stats.frames_received == 3
        assert_balanced(stats)
    finally:
        gate.open.set()
        await gateway.close()


class _Gate(Service):
    """Holds each message until the test opens the gate."""

    name = "gate"

    def __init__(self) -> None:
        self.open = asyncio.Event()

    @handles("gate.hold")
    async def hold(self, message: Envelope, ctx: Context) -> None:
        await self.open.wait()


async def test_a_writer_stopped_before_it_ran_does_not_hold_up_a_flushing_close() -> None:
    """The reader ends (stopping the writer) right after a flushing close was decided."""
    from collections import deque
    from types import SimpleNamespace

    from wsbus.gateway import _Link, _Settler

    conn, client = memory_pair()
    link = _Link(conn, _Settler())
    session = SimpleNamespace(
        conn_id="test.1", outbox=deque([(b"{}", None)]), close_code=None, close_reason=""
    )
    session.flush_ended = lambda: setattr(session, "flushing", False)
    link.session = session  # type: ignore[assignment]
    link.write()  # a frame waits: the writer is started, and has not run yet
    session.close_code, session.flushing = 4400, True
    link.close()  # the closer waits for the writer to flush the outbox
    await link.stop_writer()
    # The closer is woken, not left waiting for a writer that will never run.
    assert link.writer is None
    for _ in range(10):
        await asyncio.sleep(0)
    assert link.closer is not None and link.closer.done()
    assert client.close_code == 4400


# -- the bus says deliveries may have been lost ----------------------------------------------


async def test_the_gateway_hears_loss_and_tells_every_client(
    wsbus_gateway: Gateway, wsbus_connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    from wsbus.bus import HearsLoss

    assert isinstance(wsbus_gateway, HearsLoss)
    clients = [await wsbus_connect(), await wsbus_connect()]
    with caplog.at_level(logging.WARNING, logger="wsbus.gateway"):
        wsbus_gateway.deliveries_lost("bus_disconnected", "link to nats://10.0.0.7 reset")
        wsbus_gateway.deliveries_lost("bus_disconnected", "link to nats://10.0.0.7 reset")
    for client in clients:
        gap = await client.receive()
        assert gap["type"] == "wsbus.gap" and gap["content"]["reason"] == "bus_disconnected"
        assert "10.0.0.7" not in str(gap)  # the bus's words are for the operator's log
        assert client.pending() == 0  # the second loss, with nothing between: one notice
    [warning] = [r.getMessage() for r in caplog.records if "may have been lost" in r.message]
    assert "10.0.0.7" in warning and "2 connections" in warning
    stats = wsbus_gateway.stats()
    assert (stats.gaps_heard, stats.gap_notices) == (2, 2)
    assert_balanced(stats)


async def test_one_sessions_failing_settle_does_not_skip_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An adapter's unsent() that raises: the other sessions of the pass are still settled."""
    from types import SimpleNamespace

    from wsbus.gateway import _Settler

    settled: list[str] = []

    def session(conn_id: str, fails: bool) -> Any:
        def settle() -> None:
            if fails:
                raise RuntimeError("planned")
            settled.append(conn_id)
            fake.unconfirmed = None  # all counted

        fake = SimpleNamespace(conn_id=conn_id, unconfirmed=[True], settle=settle)
        return fake

    settler = _Settler()
    with caplog.at_level(logging.DEBUG, logger="wsbus.gateway"):
        for _ in range(2):
            for fake in (session("a.1", True), session("a.2", False), session("a.3", False)):
                settler.add(fake)
            for _ in range(3):
                await asyncio.sleep(0)
    assert settled == ["a.2", "a.3"] * 2
    tracebacks = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(tracebacks) == 1 and "a.1" in tracebacks[0].getMessage()
    assert "failed again" in caplog.text


async def test_frames_read_together_are_counted_lost_when_the_reader_is_cancelled() -> None:
    # The reader holds a batch of frames read together; cancelled while it waits for room
    # in a stuck service's inbox, the frames it had not taken yet go down with the
    # connection counted, not silently.
    release = asyncio.Event()

    class Stuck(Service):
        name = "stuck"

        @handles("stuck.work")
        async def work(self, message: Envelope, ctx: Context) -> None:
            await release.wait()

    bus = MemoryBus([Stuck()], inbox_size=4)
    gateway = Gateway(bus, config=GatewayConfig(node="t"), entry_points=False)
    await gateway.start()
    try:
        conn, client = memory_pair()
        task = asyncio.create_task(gateway.serve(conn))
        assert (await client.receive())["type"] == "wsbus.welcome"
        for i in range(20):  # in the connection's buffer before the reader looks: one batch
            client.send("stuck.work", i)
        stats = gateway.stats
        async with asyncio.timeout(10):
            while stats().frames_in_flight == 0:
                await asyncio.sleep(0.01)
        taken = stats().frames_received
        assert 0 < taken < 20  # the rest of the batch is in the reader's hands
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        after = stats()
        assert after.frames_received == 20
        assert after.frames_lost >= 20 - taken
        release.set()
        assert_balanced(after)
    finally:
        release.set()
        await gateway.close()


async def test_a_session_that_cannot_be_made_leaves_the_gateway_idle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A failure making a connection's session (a bug, or a setting only found out then)
    # must not leave the gateway busy: its close would wait drain_timeout for nothing.
    gateway = Gateway(
        MemoryBus([Echo()]),
        config=GatewayConfig(node="t", drain_timeout=600),
        entry_points=False,
    )
    await gateway.start()

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no session")

    monkeypatch.setattr("wsbus.gateway.Session", broken)
    conn, _ = memory_pair()
    with pytest.raises(RuntimeError, match="no session"):
        await gateway.serve(conn)
    async with asyncio.timeout(60):  # a gateway left busy waits 605 s
        await gateway.close()
