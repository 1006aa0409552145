"""Services: @handles, sync and async handlers, the context, control requests and errors."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import pytest
import pytest_asyncio

from tests.conftest import assert_balanced
from wsbus import (
    BusUnavailable,
    ClientAddress,
    ConfigError,
    ConnId,
    Context,
    ControlError,
    Envelope,
    Gateway,
    GatewayAddress,
    GatewayConfig,
    MemoryBus,
    Recipients,
    RequestTimeout,
    Service,
    ServiceAddress,
    ServiceFailed,
    control,
    handles,
    memory_pair,
)
from wsbus.edge import MemoryClient
from wsbus.envelope import EnvelopeId, NodeId
from wsbus.service import FROM_GATEWAYS, ServiceLink, ServiceRunner
from wsbus_testing.children import Child
from wsbus_testing.services import Failing

Connect = Callable[..., Awaitable[MemoryClient]]
Spawn = Callable[[str], Child]


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


class Reporter(Service):
    """Sends the gateway ``wsbus.failed`` reports it makes up, as a buggy runtime might."""

    name = "reporter"

    @handles("reporter.send")
    async def send(self, message: Envelope, ctx: Context) -> None:
        for content in message.content:
            ctx.link._put("wsbus.failed", content, to=GatewayAddress("test"))  # type: ignore[arg-type]
        ctx.reply("sent")


@pytest.fixture
def wsbus_services() -> list[Service]:
    return [Blocking(), Faulty(), Admin(), Caller(), Failing(), Reporter()]


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
        assert (await wsbus_client.receive())["content"]["code"] == "service_error"
        wsbus_client.send("fine", None)
        assert (await wsbus_client.receive())["content"] == "still here"
    assert "service 'faulty' failed handling 'boom' (id 1)" in caplog.text
    # The traceback, with the exception's type and text, stays in the service's log.
    assert "RuntimeError: bug in a handler" in caplog.text


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


# -- a handler that raises ------------------------------------------------------------------

LEAKS = (Failing.SECRET, "hunter2", "RuntimeError", "Traceback", "secret.py", "line ")


def assert_service_error(frame: dict[str, object], ref: str) -> None:
    """The frame is ``service_error`` for ``ref`` and says nothing of the service's insides."""
    assert frame["type"] == "wsbus.error", frame
    content = frame["content"]
    assert isinstance(content, dict)
    assert content["code"] == "service_error" and content["ref"] == ref, frame
    assert content["retry"] is False
    text = msgspec.json.encode(frame).decode()
    for leak in LEAKS:
        assert leak not in text, (leak, frame)


async def test_a_client_is_told_service_error_with_its_ref_and_no_internals(
    wsbus_client: MemoryClient, wsbus_gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="wsbus.service"):
        for type, ref in (("failing.raise", "a1"), ("failing.raise_sync", "s1")):
            wsbus_client.send(type, {"x": 1}, id=ref)
            ack = await wsbus_client.receive()
            assert ack["type"] == "wsbus.ack" and ack["content"] == {"ref": ref}
            assert_service_error(await wsbus_client.receive(), ref)
        # The service carries on.
        wsbus_client.send("failing.ok", None, id="ok")
        assert (await wsbus_client.receive_until("failing.ok.reply"))["content"] == "ok"
    # The service's log has the traceback, with the message type and id.
    for type, ref in (("failing.raise", "a1"), ("failing.raise_sync", "s1")):
        assert f"service 'failing' failed handling {type!r} (id {ref})" in caplog.text
    assert caplog.text.count(f"RuntimeError: {Failing.SECRET}") == 2
    stats = wsbus_gateway.stats()
    # Published and acked, not rejected: the failure came after.
    assert stats.service_errors == 2 and stats.frames_rejected == 0
    assert stats.frames_acked == 3
    assert_balanced(stats)


async def test_what_a_handler_sent_before_it_raised_comes_first(
    wsbus_client: MemoryClient,
) -> None:
    wsbus_client.send("failing.half", None, id="h")
    frames = [await wsbus_client.receive() for _ in range(3)]
    assert [f["type"] for f in frames] == ["wsbus.ack", "failing.half.reply", "wsbus.error"]
    assert frames[1]["content"] == "half" and frames[1]["reply_to"] == "h"
    assert_service_error(frames[2], "h")


async def test_service_errors_are_not_charged_to_the_error_budget(
    wsbus_client: MemoryClient, wsbus_gateway: Gateway
) -> None:
    n = 3 * wsbus_gateway.config.error_budget
    for i in range(n):
        wsbus_client.send("failing.raise", None, id=f"r{i}")
    errors: list[dict[str, Any]] = []
    while len(errors) < n:
        frame = await wsbus_client.receive()
        if frame["type"] == "wsbus.error":
            errors.append(frame)
    for i, frame in enumerate(errors):
        assert_service_error(frame, f"r{i}")
    assert wsbus_client.close_code is None
    wsbus_client.send("failing.ok", None)
    assert (await wsbus_client.receive())["content"] == "ok"
    assert_balanced(wsbus_gateway.stats())


async def test_no_error_without_an_id_and_none_for_a_service_sent_message(
    wsbus_client: MemoryClient, wsbus_gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="wsbus.service"):
        # No id: the gateway hears of it (it counts the report) but has nothing to refer
        # the client to, so it says nothing.
        wsbus_client.send("failing.raise", None)
        # A message the service sent itself fails: only the service's log hears of it.
        wsbus_client.send("failing.relay", None, id="relay")
        wsbus_client.send("failing.ok", None, id="k")
        frames: list[dict[str, Any]] = []
        # The service handles in order: its reply to "k" comes after both failures.
        while not frames or frames[-1].get("reply_to") != "k":
            frames.append(await wsbus_client.receive())
    assert "wsbus.error" not in [f["type"] for f in frames], frames
    assert [f["content"] for f in frames if f["type"] != "wsbus.ack"] == ["relayed", "ok"]
    assert "from ServiceAddress(name='failing')" in caplog.text
    assert caplog.text.count(f"RuntimeError: {Failing.SECRET}") == 2
    stats = wsbus_gateway.stats()
    assert stats.service_errors == 1
    assert_balanced(stats)


async def test_the_gateway_ignores_reports_it_cannot_use(
    wsbus_client: MemoryClient, wsbus_gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    reports = [
        {"conn_id": "test.999", "ref": "gone"},  # no such connection
        {"conn_id": wsbus_client.conn_id},  # malformed
        {"conn_id": wsbus_client.conn_id, "ref": "test-0x1f"},  # an id the gateway made
    ]
    with caplog.at_level(logging.WARNING, logger="wsbus.gateway"):
        wsbus_client.send("reporter.send", reports, id="rep")
        frames = [await wsbus_client.receive(), await wsbus_client.receive()]
    assert [f["type"] for f in frames] == ["wsbus.ack", "reporter.send.reply"]
    assert "malformed wsbus.failed report" in caplog.text
    stats = wsbus_gateway.stats()
    assert stats.service_errors == 3
    assert_balanced(stats)


async def test_the_python_client_request_raises_service_error_at_once(
    wsbus_ws_connect: Callable[..., Awaitable[object]],
) -> None:
    from wsbus_websockets import Client

    client = await wsbus_ws_connect()
    assert isinstance(client, Client)
    # Bounded far below the request's own timeout: the error must come, not the timeout.
    async with asyncio.timeout(30):
        with pytest.raises(ServiceFailed) as info:
            await client.request("failing.raise", {"x": 1}, timeout=600)
    assert info.value.code == "service_error" and info.value.retry is False
    for leak in LEAKS:
        assert leak not in str(info.value)
    async with asyncio.timeout(30):
        assert (await client.request("failing.ok", timeout=600))["content"] == "ok"


# -- the same over the Pyro bus, with the service as its own process ----------------------


@pytest_asyncio.fixture
async def failing_process(wsbus_spawn_service: Spawn) -> Child:
    return await asyncio.to_thread(wsbus_spawn_service, "wsbus_testing.services:Failing")


async def test_service_error_from_a_service_process_over_pyro(
    failing_process: Child, wsbus_pyro_config: object
) -> None:
    from wsbus_pyro import PyroBus, PyroConfig
    from wsbus_websockets import connect, serve

    assert isinstance(wsbus_pyro_config, PyroConfig)
    gateway = Gateway(
        PyroBus(wsbus_pyro_config), config=GatewayConfig(node="py"), entry_points=False
    )
    await gateway.start()
    server = await serve(gateway, "127.0.0.1", 0)
    try:
        client = await connect(server.url, reconnect=False)
        try:
            for type in ("failing.raise", "failing.raise_sync"):
                # Bounded far below the request's own timeout: the error must come, not
                # the timeout.
                async with asyncio.timeout(30):
                    with pytest.raises(ServiceFailed) as info:
                        await client.request(type, {"x": 1}, timeout=600)
                assert info.value.code == "service_error" and info.value.retry is False
                for leak in LEAKS:
                    assert leak not in str(info.value)
            async with asyncio.timeout(30):
                assert (await client.request("failing.ok", timeout=600))["content"] == "ok"
        finally:
            await client.close()
        # The traceback is in the service process's own output, with the type and id.
        await asyncio.to_thread(failing_process.wait_output, f"RuntimeError: {Failing.SECRET}")
        assert "service 'failing' failed handling 'failing.raise_sync' (id c2)" in (
            failing_process.text
        )
        stats = gateway.stats()
        assert stats.service_errors == 2
        assert_balanced(stats)
    finally:
        await server.close()
        await gateway.close()


async def test_over_pyro_the_report_reaches_the_gateway_that_owns_the_client(
    failing_process: Child, wsbus_pyro_config: object
) -> None:
    from wsbus_pyro import PyroBus, PyroConfig

    assert isinstance(wsbus_pyro_config, PyroConfig)
    gateways = [
        Gateway(PyroBus(wsbus_pyro_config), config=GatewayConfig(node=n), entry_points=False)
        for n in ("g1", "g2")
    ]
    tasks = []
    try:
        clients = []
        for gateway in gateways:
            await gateway.start()
            conn, client = memory_pair()
            tasks.append(asyncio.create_task(gateway.serve(conn)))
            assert (await client.receive(10))["type"] == "wsbus.welcome"
            clients.append(client)
        for i, client in enumerate(clients):
            client.send("failing.raise", None, id=f"x{i}")
        for i, client in enumerate(clients):
            assert (await client.receive(30))["type"] == "wsbus.ack"
            assert_service_error(await client.receive(30), f"x{i}")
        for gateway in gateways:
            stats = gateway.stats()
            assert stats.service_errors == 1
            assert_balanced(stats)
    finally:
        for gateway in gateways:
            await gateway.close()
        await asyncio.gather(*tasks)


async def test_a_held_place_is_nobody_elses_until_taken_or_given_back() -> None:
    from wsbus.service import ServiceRunner
    from wsbus_testing.conformance import client_message

    class Still(Service):
        name = "still"

        @handles("still.take")
        async def take(self, message: Envelope, ctx: Context) -> None:
            pass

    def emit(envelope: Envelope) -> None:
        pass

    runner = ServiceRunner(Still(), emit, inbox_size=1)  # not started: takes nothing out
    assert runner.has_room()
    runner.hold_room()
    assert not runner.has_room()
    waiting = asyncio.create_task(runner.wait_for_room())
    await asyncio.sleep(0)
    assert not waiting.done()
    runner.release_held()  # the next in line gets the place
    async with asyncio.timeout(5):
        await waiting
    runner.accept(client_message("still.take", 1))
    assert not runner.has_room()

    other = ServiceRunner(Still(), emit, inbox_size=1)
    other.hold_room()
    other.accept_held(client_message("still.take", 2))  # the held place, taken
    assert not other.has_room()
    with pytest.raises(BusUnavailable):
        other.accept(client_message("still.take", 3))


# -- how each accepted envelope ended (the runtime's finished callback) ---------------------


class Ending(Service):
    """Handlers that return, raise, or wait on :attr:`gate` (async and sync)."""

    name = "ending"

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.started = asyncio.Event()

    @handles("end.ok")
    async def ok(self, message: Envelope, ctx: Context) -> None:
        await asyncio.sleep(0)

    @handles("end.raise")
    async def boom(self, message: Envelope, ctx: Context) -> None:
        raise RuntimeError("planned")

    @handles("end.sync_ok")
    def sync_ok(self, message: Envelope, ctx: Context) -> None:
        pass

    @handles("end.sync_raise")
    def sync_boom(self, message: Envelope, ctx: Context) -> None:
        raise RuntimeError("planned")

    @handles("end.wait")
    async def wait(self, message: Envelope, ctx: Context) -> None:
        self.started.set()
        await self.gate.wait()


async def _ended_runner(**kwargs: Any) -> tuple[Any, Ending, dict[str, str]]:
    from wsbus.service import ServiceRunner

    ended: dict[str, str] = {}

    def finished(envelope: Envelope, outcome: str) -> None:
        assert envelope.id not in ended, "called once per envelope"
        ended[envelope.id] = outcome

    service = Ending()
    runner = ServiceRunner(service, lambda envelope: None, finished=finished, **kwargs)
    await runner.start()
    return runner, service, ended


def _message(type: str, n: int) -> Envelope:
    from wsbus_testing.conformance import client_message

    # From a service: a failure is only logged (no client to tell, no emit needed).
    return msgspec.structs.replace(client_message(type, n, n), sender=ServiceAddress("peer"))


async def test_the_runtime_hears_once_how_each_accepted_envelope_ended() -> None:
    runner, service, ended = await _ended_runner()
    sent = {
        "end.ok": "handled",
        "end.raise": "failed",
        "end.sync_ok": "handled",
        "end.sync_raise": "failed",
        "end.nobody": "handled",  # no handler: logged and dropped, its handling is over
    }
    messages = {_message(type, i).id: outcome for i, (type, outcome) in enumerate(sent.items())}
    for i, type in enumerate(sent):
        runner.accept(_message(type, i))
    async with asyncio.timeout(10):
        while len(ended) < len(sent):
            await asyncio.sleep(0.01)
    assert ended == messages
    # A handler running and one waiting when the runner stops: both "stopped".
    runner.accept(_message("end.wait", 10))
    runner.accept(_message("end.ok", 11))
    async with asyncio.timeout(10):
        await service.started.wait()
    await runner.stop()
    assert ended[_message("end.wait", 10).id] == "stopped"
    assert ended[_message("end.ok", 11).id] == "stopped"
    assert len(ended) == len(sent) + 2


async def test_stop_with_drain_finishes_what_the_inbox_holds_first() -> None:
    runner, service, ended = await _ended_runner()
    runner.accept(_message("end.wait", 0))
    for i in range(1, 20):
        runner.accept(_message("end.ok", i))
    async with asyncio.timeout(10):
        await service.started.wait()
    stopping = asyncio.create_task(runner.stop(drain=60))
    await asyncio.sleep(0.05)
    assert not stopping.done()  # still draining: the handler waits
    service.gate.set()
    async with asyncio.timeout(30):
        await stopping
    assert list(ended.values()) == ["handled"] * 20


async def test_stop_with_drain_drops_what_it_could_not_finish_as_stopped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    runner, service, ended = await _ended_runner()
    runner.accept(_message("end.wait", 0))  # never released
    runner.accept(_message("end.ok", 1))
    async with asyncio.timeout(10):
        await service.started.wait()
    async with asyncio.timeout(30):
        await runner.stop(drain=0.2)
    assert ended == {_message("end.wait", 0).id: "stopped", _message("end.ok", 1).id: "stopped"}
    assert "draining" in caplog.text


# -- clients() across gateways -------------------------------------------------------------


class Lister(Service):
    """Lists the clients (of a group, when the message names one) to the sender."""

    name = "lister"

    @handles("list")
    async def list_clients(self, message: Envelope, ctx: Context) -> None:
        try:
            infos = await ctx.clients(message.content)
        except (RequestTimeout, ControlError) as exc:
            ctx.reply({"error": type(exc).__name__, "text": str(exc)})
            return
        ctx.reply(sorted(info.conn_id for info in infos))


async def test_clients_lists_every_gateways_clients() -> None:
    from tests.conftest import Control
    from tests.wsbus.cluster import Cluster, running

    async with running(Cluster([Lister(), Control()])) as run:
        a, b = run.gateways
        on_a, on_b, also_b = [await run.connect(g) for g in (a, b, b)]
        for client in (on_a, also_b):
            client.send("ctl.join", {"group": "room"})
            assert (await client.receive())["content"] == {"joined": True}
        on_a.send("list", None)
        everyone = sorted(str(c.conn_id) for c in (on_a, on_b, also_b))
        assert (await on_a.receive())["content"] == everyone
        on_b.send("list", "room")
        assert (await on_b.receive())["content"] == sorted([str(on_a.conn_id), str(also_b.conn_id)])
        for gateway in run.gateways:
            assert_balanced(gateway.stats())


async def test_a_silent_gateway_makes_clients_raise_naming_it() -> None:
    from tests.wsbus.cluster import Cluster, running

    cluster = Cluster([Lister()], timeout=0.2)
    async with running(cluster) as run:
        on_a = await run.connect(run.gateways[0])
        await run.connect(run.gateways[1])
        cluster.silent.add(run.gateways[1].node)
        on_a.send("list", None)
        answer = (await on_a.receive())["content"]
        # Never the part of the list gateway a gave: the whole list, or an error naming b.
        assert answer["error"] == "RequestTimeout" and "gateway 'b'" in answer["text"]


async def test_clients_asks_every_gateway_at_once_and_joins_in_their_order() -> None:
    loop = asyncio.get_running_loop()
    sent: list[Envelope] = []
    nodes = [NodeId("n2"), NodeId("n1"), NodeId("n2")]

    async def gateways() -> list[NodeId]:
        return nodes

    link = ServiceLink("svc", sent.append, loop, timeout=5.0, gateways=gateways)
    listing = asyncio.create_task(link.clients("g"))
    async with asyncio.timeout(5):
        while len(sent) < 2:
            await asyncio.sleep(0)
    # Both asked before either answered; a node listed twice asked once.
    assert [e.to for e in sent] == [GatewayAddress(NodeId("n2")), GatewayAddress(NodeId("n1"))]
    assert all(e.type == "wsbus.clients" and e.content == {"group": "g"} for e in sent)
    for request in reversed(sent):
        node = request.to.node  # type: ignore[union-attr]
        info = {"conn_id": f"{node}.1", "alias": None, "user": None, "groups": ["g"]}
        link.accept_result(_result(request, [info]))
    async with asyncio.timeout(5):
        infos = await listing
    assert [i.conn_id for i in infos] == ["n2.1", "n1.1"]


async def test_a_gateway_refusing_clients_is_named() -> None:
    loop = asyncio.get_running_loop()
    sent: list[Envelope] = []

    async def gateways() -> list[NodeId]:
        return [NodeId("n1"), NodeId("n2")]

    link = ServiceLink("svc", sent.append, loop, timeout=5.0, gateways=gateways)
    listing = asyncio.create_task(link.clients())
    async with asyncio.timeout(5):
        while len(sent) < 2:
            await asyncio.sleep(0)
    link.accept_result(_result(sent[0], []))
    refusal = {"ok": False, "code": "invalid_request", "message": "no"}
    link.accept_result(_result(sent[1], None, content=refusal))
    with pytest.raises(ControlError) as info:
        async with asyncio.timeout(5):
            await listing
    assert info.value.code == "invalid_request" and "gateway 'n2'" in info.value.message


async def test_no_gateways_means_an_empty_list_and_no_request() -> None:
    sent: list[Envelope] = []

    async def gateways() -> list[NodeId]:
        return []

    link = ServiceLink("svc", sent.append, asyncio.get_running_loop(), gateways=gateways)
    assert await link.clients() == [] and sent == []


def _result(request: Envelope, value: Any, content: Any = None) -> Envelope:
    """The gateway's answer to ``request``: ok with ``value``, or ``content`` as given."""
    return Envelope(
        id=EnvelopeId(f"answer-{request.id}"),
        type="wsbus.result",
        sender=GatewayAddress(request.to.node),  # type: ignore[union-attr]
        content=content if content is not None else {"ok": True, "value": value},
        reply_to=request.id,
    )


# -- only a gateway speaks as a gateway (security review, finding 2) ----------------------


class Listener(Service):
    """Handles every type only gateways send; records what its handler got."""

    name = "listener"

    def __init__(self) -> None:
        self.got: list[Envelope] = []
        self.marked = asyncio.Event()

    @handles(*sorted(FROM_GATEWAYS))
    async def gateways_word(self, message: Envelope, ctx: Context) -> None:
        self.got.append(message)

    @handles("listener.join")
    async def join(self, message: Envelope, ctx: Context) -> None:
        assert isinstance(message.sender, ClientAddress)
        await ctx.join(message.sender.conn_id, "room")
        ctx.reply(None)

    @handles("listener.marker")
    async def marker(self, message: Envelope, ctx: Context) -> None:
        self.marked.set()


class Poser(Service):
    """Sends the listener, as itself and by name, every type only gateways send.

    (By type, a service's ``wsbus.*`` message goes to the gateway, rule 3, on every bus.)
    """

    name = "poser"

    @handles("poser.forge")
    async def forge(self, message: Envelope, ctx: Context) -> None:
        lost = {"event": "gateway_lost", "node": "test"}
        for type_ in sorted(FROM_GATEWAYS):
            ctx.link._put(type_, lost, reply_to="x", to=ServiceAddress("listener"))
        ctx.link.publish("listener.marker")
        ctx.reply(None)


async def test_a_service_cannot_pose_as_a_gateway_to_another() -> None:
    listener = Listener()
    bus = MemoryBus([listener, Poser()])
    gateway = Gateway(bus, config=GatewayConfig(node="test"), entry_points=False)
    async with gateway:
        conn, client = memory_pair()
        serving = asyncio.create_task(gateway.serve(conn))
        await client.receive_until("wsbus.welcome")
        client.send("poser.forge", None, id="f")
        await client.receive_until("poser.forge.reply")
        async with asyncio.timeout(5):
            await listener.marked.wait()
        # Each dropped before its handler, and counted.
        assert listener.got == []
        assert listener.link.forged == 5
        # What the gateway says still comes: the join's presence event.
        client.send("listener.join", None, id="j")
        await client.receive_until("listener.join.reply")
        async with asyncio.timeout(5):
            while not listener.got:
                await asyncio.sleep(0.01)
        client.close()
        async with asyncio.timeout(5):
            await serving
    assert listener.got[0].type == control.PRESENCE
    assert listener.got[0].sender == GatewayAddress(NodeId("test"))
    assert listener.link.forged == 5


async def test_the_buses_own_reports_pass_as_a_gateways() -> None:
    # The Pyro message bus sends gateway_lost events and undeliverable reports as
    # GatewayAddress("bus"), the NATS service host its undeliverable reports too.
    listener = Listener()
    runner = ServiceRunner(listener, lambda envelope: None)
    await runner.start()
    try:
        for n, type_ in enumerate((control.PRESENCE, control.UNDELIVERABLE)):
            runner.accept(
                Envelope(
                    id=EnvelopeId(f"bus-{n}"),
                    type=type_,
                    sender=GatewayAddress(NodeId("bus")),
                    content={"event": "gateway_lost", "node": "b"},
                )
            )
        async with asyncio.timeout(5):
            while len(listener.got) < 2:
                await asyncio.sleep(0.01)
    finally:
        await runner.stop()
    assert [e.id for e in listener.got] == ["bus-0", "bus-1"]
    assert runner.forged == 0


async def test_a_forged_answer_resolves_no_request() -> None:
    loop = asyncio.get_running_loop()
    sent: list[Envelope] = []
    link = ServiceLink("svc", sent.append, loop, timeout=5.0)
    joining = asyncio.create_task(link.join(ConnId("n.1"), "g"))
    async with asyncio.timeout(5):
        while not sent:
            await asyncio.sleep(0)
    [request] = sent
    genuine = _result(request, True)
    forged = msgspec.structs.replace(
        genuine,
        sender=ServiceAddress("evil"),
        content={"ok": False, "code": "unknown_connection", "message": "forged"},
    )
    assert link.accept_result(forged)  # taken care of: dropped
    await asyncio.sleep(0)
    assert not joining.done() and link.forged == 1
    link.accept_result(genuine)
    async with asyncio.timeout(5):
        assert await joining is True
    assert link.forged == 1


async def test_forgeries_are_logged_rate_limited(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = ServiceRunner(Listener(), lambda envelope: None)
    forged = Envelope(
        id=EnvelopeId("f"),
        type=control.PROCESSED,
        sender=ServiceAddress("evil"),
        content={"conn_id": "a.1", "ids": ["m"]},
        to=ServiceAddress("listener"),
    )
    with caplog.at_level(logging.WARNING, logger="wsbus.service"):
        for _ in range(3):
            runner.accept(forged)
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1
        assert "'listener' dropped wsbus.processed f from service 'evil'" in lines[0]
        # The interval over: the next line says how many went unlogged.
        monkeypatch.setattr("wsbus.service.FORGED_LOG_INTERVAL", 0.0)
        runner.accept(forged)
        lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "2 more dropped" in lines[1]
    assert runner.forged == 4


async def test_a_sender_waiting_past_its_deadline_is_refused_and_the_next_keeps_waiting() -> None:
    from wsbus.service import ServiceRunner
    from wsbus_testing.conformance import client_message

    class Still(Service):
        name = "still"

        @handles("still.take")
        async def take(self, message: Envelope, ctx: Context) -> None:
            pass

    runner = ServiceRunner(Still(), lambda envelope: None, inbox_size=1)  # takes nothing out
    runner.accept(client_message("still.take", 1))
    loop = asyncio.get_running_loop()
    soon = asyncio.create_task(runner.wait_for_room("a", loop.time() + 0.01))
    later = asyncio.create_task(runner.wait_for_room("b", loop.time() + 600))
    first = asyncio.create_task(runner.wait_for_room("c", loop.time() + 0.02))
    async with asyncio.timeout(10):
        with pytest.raises(TimeoutError):
            await soon
        with pytest.raises(TimeoutError):
            await first
    await asyncio.sleep(0)
    assert not later.done()  # its own deadline is far: still in line
    later.cancel()
    await asyncio.gather(later, return_exceptions=True)
    # Nothing left in line, no place lost: the inbox's one place frees as before.
    assert not runner.has_room()
    runner._inbox.clear()
    assert runner.has_room()


@pytest.mark.parametrize("inbox_size", [16, 256, 1000])
async def test_many_senders_waiting_are_let_in_in_order_with_shares_worth_a_wake_up(
    inbox_size: int,
) -> None:
    # More senders wait than the inbox has places: each let in must come with several
    # places (a wake-up per envelope costs more than the envelope), in the order they
    # came, and nobody is left behind.
    from wsbus_testing.conformance import client_message

    taken: list[tuple[Any, int]] = []

    class Counting(Service):
        name = "counting"

        @handles("counting.take")
        async def take(self, message: Envelope, ctx: Context) -> None:
            taken.append(message.content)
            if len(taken) % 7 == 0:
                await asyncio.sleep(0)  # a service that sometimes yields mid-burst

    runner = ServiceRunner(Counting(), lambda envelope: None, inbox_size=inbox_size)
    least = max(1, min(32, inbox_size // 32))
    for i in range(inbox_size):  # full before anyone waits
        runner.accept(client_message("counting.take", ("fill", i)))
    senders, each = 60, 20
    wake_ups = 0
    first_in: list[int] = []

    async def sender(k: int) -> None:
        nonlocal wake_ups
        key = f"c.{k}"
        sent = 0
        while sent < each:
            if not runner.take_credit(key):
                await runner.wait_for_room(key)
                wake_ups += 1
                if sent == 0:
                    first_in.append(k)
            runner.accept(client_message("counting.take", (k, sent)))
            sent += 1

    tasks = []
    for k in range(senders):
        tasks.append(asyncio.create_task(sender(k)))
        await asyncio.sleep(0)  # each in line before the next comes
    await runner.start()
    try:
        async with asyncio.timeout(30):
            await asyncio.gather(*tasks)
            while len(taken) < inbox_size + senders * each:
                await asyncio.sleep(0.01)
    finally:
        await runner.stop()
    assert first_in == list(range(senders))
    # Every sender's envelopes, each once and in its order.
    for k in range(senders):
        assert [c[1] for c in taken if c[0] == k] == list(range(each))
    # A wake-up brings `least` places at the fewest (a sender's last may need fewer).
    assert wake_ups <= senders * each // least + senders
    assert runner.has_room() and not runner._credits


async def test_a_place_given_back_goes_to_the_next_in_line_whatever_the_share_floor() -> None:
    # The floor on shares (2 here) is for places the service frees as it drains; one
    # given back unused (a held place released) goes to the next sender waiting at once,
    # as before, even alone and with the service taking nothing.
    from wsbus_testing.conformance import client_message

    class Still(Service):
        name = "still"

        @handles("still.take")
        async def take(self, message: Envelope, ctx: Context) -> None:
            pass

    runner = ServiceRunner(Still(), lambda envelope: None, inbox_size=64)  # takes nothing
    for i in range(63):
        runner.accept(client_message("still.take", i))
    runner.hold_room()  # the last place, held for another sender: none free
    loop = asyncio.get_running_loop()
    first = asyncio.create_task(runner.wait_for_room("a", loop.time() + 600))
    second = asyncio.create_task(runner.wait_for_room("b", loop.time() + 0.1))
    await asyncio.sleep(0)
    assert not first.done()
    runner.release_held()  # given back: one place free, under the floor
    async with asyncio.timeout(10):
        await first
        runner.accept(client_message("still.take", 63))
        with pytest.raises(TimeoutError):
            await second  # no place at all: refused at its deadline
    assert not runner.has_room()
