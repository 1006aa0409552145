"""Services: @handles, sync and async handlers, the context, control requests and errors."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable

import pytest

from wsbus import (
    BusUnavailable,
    ClientAddress,
    ConfigError,
    ConnId,
    Context,
    ControlError,
    Envelope,
    MemoryBus,
    MemoryClient,
    Recipients,
    RequestTimeout,
    Service,
    ServiceAddress,
    handles,
)
from wsbus.service import ServiceLink

Connect = Callable[..., Awaitable[MemoryClient]]


class Blocking(Service):
    """A plain-def handler: runs in a worker thread, so it may block."""

    def __init__(self) -> None:
        self.threads: list[int] = []

    @handles("block")
    def block(self, message: Envelope, ctx: Context) -> None:
        self.threads.append(threading.get_ident())
        ctx.reply({"slept": True})


class Faulty(Service):
    name = "faulty"

    @handles("boom")
    async def boom(self, message: Envelope, ctx: Context) -> None:
        raise RuntimeError("bug in a handler")

    @handles("fine")
    async def fine(self, message: Envelope, ctx: Context) -> None:
        ctx.reply("still here")


class Admin(Service):
    name = "admin"

    @handles("admin.list")
    async def list_clients(self, message: Envelope, ctx: Context) -> None:
        assert isinstance(message.sender, ClientAddress)
        await ctx.join(message.sender.conn_id, "ops")
        await ctx.set_alias(message.sender.conn_id, "root")
        clients = await ctx.clients()
        in_ops = await ctx.clients("ops")
        ctx.reply({"all": [c.conn_id for c in clients], "ops": [c.alias for c in in_ops]})

    @handles("admin.bad")
    async def bad(self, message: Envelope, ctx: Context) -> None:
        errors = []
        for call in (
            ctx.join(ConnId("test.999"), "g"),
            ctx.disconnect(message.sender.conn_id, 1011),  # type: ignore[union-attr]
            ctx.set_alias(message.sender.conn_id, "not valid!"),  # type: ignore[union-attr]
        ):
            try:
                await call
            except ControlError as exc:
                errors.append(exc.code)
        ctx.reply(errors)


class Caller(Service):
    """Sends to another service by type, and gets its reply by name."""

    name = "caller"

    def __init__(self) -> None:
        self.replies: list[Envelope] = []

    @handles("call")
    async def call(self, message: Envelope, ctx: Context) -> None:
        ctx.link.publish("fine", "from a service")

    @handles("fine.reply")
    async def got(self, message: Envelope, ctx: Context) -> None:
        self.replies.append(message)


@pytest.fixture
def wsbus_services() -> list[Service]:
    return [Blocking(), Faulty(), Admin(), Caller()]


def test_handles_collects_types_and_names_default_to_the_class() -> None:
    assert Blocking.name == "blocking"
    assert Blocking.handled_types() == {"block"}
    assert Faulty.handled_types() == {"boom", "fine"}

    class Child(Faulty):
        name = "child"

        @handles("extra", "more")
        async def extra(self, message: Envelope, ctx: Context) -> None:
            pass

    assert Child.handled_types() == {"boom", "fine", "extra", "more"}
    with pytest.raises(ConfigError):
        handles()


async def test_sync_handler_runs_in_a_worker_thread(
    wsbus_client: MemoryClient, wsbus_services: list[Service]
) -> None:
    wsbus_client.send("block", None, id="b")
    frames = [await wsbus_client.receive(), await wsbus_client.receive()]
    reply = next(f for f in frames if f["type"] == "block.reply")
    assert reply["content"] == {"slept": True} and reply["reply_to"] == "b"
    blocking = wsbus_services[0]
    assert isinstance(blocking, Blocking)
    assert blocking.threads and blocking.threads[0] != threading.get_ident()


async def test_a_failing_handler_is_logged_and_the_service_goes_on(
    wsbus_client: MemoryClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="wsbus.service"):
        wsbus_client.send("boom", None, id="1")
        assert (await wsbus_client.receive())["type"] == "wsbus.ack"
        wsbus_client.send("fine", None)
        assert (await wsbus_client.receive())["content"] == "still here"
    assert "service 'faulty' failed handling 'boom'" in caplog.text


async def test_control_requests(wsbus_client: MemoryClient) -> None:
    wsbus_client.send("admin.list", None)
    reply = await wsbus_client.receive()
    assert reply["content"] == {"all": [wsbus_client.conn_id], "ops": ["root"]}


async def test_control_errors_name_their_cause(wsbus_client: MemoryClient) -> None:
    wsbus_client.send("admin.bad", None)
    reply = await wsbus_client.receive()
    assert reply["content"] == ["unknown_connection", "invalid_request", "invalid_name"]


async def test_service_to_service_and_reply_by_name(
    wsbus_client: MemoryClient, wsbus_services: list[Service]
) -> None:
    caller = wsbus_services[3]
    assert isinstance(caller, Caller)
    wsbus_client.send("call", None)
    async with asyncio.timeout(5):
        while not caller.replies:
            await asyncio.sleep(0.01)
    [reply] = caller.replies
    assert reply.content == "still here"
    assert reply.sender == ServiceAddress("faulty")


async def test_a_request_nobody_answers_times_out() -> None:
    loop = asyncio.get_running_loop()
    sent: list[Envelope] = []
    link = ServiceLink("lonely", sent.append, loop, timeout=0.05)
    with pytest.raises(RequestTimeout) as info:
        await link.join("n.1", "g")  # type: ignore[arg-type]
    assert "wsbus.join" in str(info.value)
    assert sent[0].sender == ServiceAddress("lonely")
    assert isinstance(info.value, TimeoutError)


async def test_services_stamp_their_own_name() -> None:
    loop = asyncio.get_running_loop()
    sent: list[Envelope] = []
    link = ServiceLink("svc", sent.append, loop)
    link.send(Recipients(everyone=True), "note", 1)
    link.publish("other", 2)
    assert [e.sender for e in sent] == [ServiceAddress("svc")] * 2
    assert len({e.id for e in sent}) == 2


async def test_bus_refusal_surfaces_in_the_handler(
    wsbus_bus: MemoryBus, wsbus_gateway: object
) -> None:
    class Sender(Service):
        @handles("x")
        async def x(self, message: Envelope, ctx: Context) -> None:
            pass

    service = Sender()
    await wsbus_bus.add_service(service)
    wsbus_bus.down = True
    with pytest.raises(BusUnavailable):
        service.link.publish("anything")
