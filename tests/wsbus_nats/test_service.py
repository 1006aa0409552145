"""Services on the NATS bus: :class:`wsbus_nats.ServiceHost` with a real nats-server."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio

from tests.wsbus_nats.test_bus import Hosts, LossSink, Stuck, Tally
from wsbus import Context, Recipients, Service, handles
from wsbus.envelope import ConnId, Envelope
from wsbus.errors import ConfigError, ControlError, NoRoute
from wsbus_nats import NatsBus, NatsConfig, ServiceHost
from wsbus_testing.conformance import client_message
from wsbus_testing.services import Director


class Caller(Service):
    """Drives a service's sends from a test: each handler replies with what happened."""

    name = "caller"

    def __init__(self) -> None:
        self.reports: list[Envelope] = []
        self.report_came = asyncio.Event()

    @handles("caller.publish")
    async def publish(self, message: Envelope, ctx: Context) -> None:
        """Publish ``content["type"]`` ``content["n"]`` times; reply with the error, if any."""
        try:
            for _ in range(int(message.content.get("n", 1))):
                ctx.link.publish(message.content["type"], message.content.get("body"))
        except NoRoute as exc:
            ctx.reply({"error": type(exc).__name__})
            return
        ctx.reply({"error": None})

    @handles("caller.join")
    async def join(self, message: Envelope, ctx: Context) -> None:
        """Ask the gateway of ``content["conn_id"]`` to add it to a group."""
        try:
            await ctx.join(ConnId(message.content["conn_id"]), "g")
        except ControlError as exc:
            ctx.reply({"code": exc.code})

    @handles("caller.big")
    def big(self, message: Envelope, ctx: Context) -> None:
        """From a worker thread: send the sender more than NATS carries in one message."""
        ctx.reply("x" * 2_000_000)

    @handles("wsbus.undeliverable")
    async def undeliverable(self, message: Envelope, ctx: Context) -> None:
        """Keep the report."""
        self.reports.append(message)
        self.report_came.set()


@pytest_asyncio.fixture
async def kit(nats_config: NatsConfig) -> AsyncIterator[Hosts]:
    hosts = Hosts(nats_config)
    try:
        yield hosts
    finally:
        await hosts.close()


async def _reply(sink: LossSink, type: str) -> Any:
    delivered = await sink.wait_for(lambda d: any(e.type == type for e in d))
    found = [e for e in delivered if e.type == type]
    sink.delivered.clear()
    return found[-1].content


async def test_names_that_are_not_subject_tokens_are_refused(nats_config: NatsConfig) -> None:
    class Dotted(Service):
        name = "my.service"

    with pytest.raises(ConfigError, match="subject token"):
        await ServiceHost(Dotted(), nats_config).start()
    with pytest.raises(ConfigError, match="subject token"):
        await ServiceHost(Tally(), nats_config, instance="a b").start()


async def test_a_service_sends_to_services_and_hears_what_failed(kit: Hosts) -> None:
    caller, tally, stuck = Caller(), Tally(), Stuck()
    for service in (caller, tally):
        await kit.host(service)
    await kit.host(stuck, inbox_size=1)
    sink = await kit.sink()
    bus = sink.bus

    await bus.publish(client_message("caller.publish", {"type": "tally.hit", "n": 3}))
    assert await _reply(sink, "caller.publish.reply") == {"error": None}
    async with asyncio.timeout(10):
        while len(tally.seen) < 3:
            await asyncio.sleep(0.01)

    await bus.publish(client_message("caller.publish", {"type": "nobody.handles.this"}))
    assert await _reply(sink, "caller.publish.reply") == {"error": "NoRoute"}

    # An inbox of one: of three sent at once, one or two are refused busy, and the
    # sender hears of each (a report per envelope, never nothing).
    await bus.publish(client_message("caller.publish", {"type": "stuck.wait", "n": 3}))
    assert await _reply(sink, "caller.publish.reply") == {"error": None}
    await asyncio.wait_for(caller.report_came.wait(), 10)
    await asyncio.sleep(0.2)
    assert 1 <= len(caller.reports) <= 2
    for report in caller.reports:
        assert report.content["reason"] == "unavailable" and "busy" in report.content["detail"]
    stuck.release.set()


async def test_a_request_to_a_gateway_that_is_gone_fails_at_once(kit: Hosts) -> None:
    await kit.host(Caller())
    sink = await kit.sink()
    await sink.bus.publish(client_message("caller.join", {"conn_id": "gone.1"}))
    assert await _reply(sink, "caller.join.reply") == {"code": "unknown_connection"}


async def test_too_large_from_a_service_is_reported_to_it(kit: Hosts) -> None:
    caller = Caller()
    host = await kit.host(caller)
    sink = await kit.sink()
    await sink.bus.publish(client_message("caller.big", None))
    await asyncio.wait_for(caller.report_came.wait(), 10)
    [report] = caller.reports
    assert report.content["reason"] == "too_large"
    assert host.counters.too_large == 1
    assert not [e for e in sink.delivered if e.type == "caller.big.reply"]


async def test_clients_lists_the_clients_of_every_gateway(kit: Hosts) -> None:
    await kit.host(Director())
    g1 = await kit.gateway("g1")
    g2 = await kit.gateway("g2")
    a = await kit.client(g1)
    b = await kit.client(g2)
    a.send("director.clients")
    listed = (await a.receive_until("director.clients.reply", timeout=10))["content"]
    assert sorted(listed["clients"]) == sorted([str(a.conn_id), str(b.conn_id)])


@pytest.fixture
def instance_process(nats_config: NatsConfig) -> Iterator[subprocess.Popen[str]]:
    """An Echo instance in its own process (run_service), ended by its own pid."""
    code = (
        "import sys; from wsbus_nats import NatsConfig, run_service; "
        "from wsbus_cli.demo_services import Echo; "
        f"run_service(Echo(), NatsConfig(servers=({nats_config.servers[0]!r},), heartbeat=0.5))"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)
        assert process.stdout is not None
        process.stdout.close()


async def test_an_instance_killed_leaves_the_traffic_to_the_others(
    kit: Hosts, instance_process: subprocess.Popen[str]
) -> None:
    from wsbus_cli.demo_services import Echo

    assert instance_process.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(instance_process.stdout.readline), 30)
    assert "ready" in line, line
    await kit.host(Echo())
    sink = await kit.sink()
    bus = sink.bus
    for i in range(50):
        await bus.publish(client_message("echo", i, i))
    await sink.wait_for(lambda d: len(d) >= 50)
    instance_process.kill()
    await asyncio.to_thread(instance_process.wait, 10)
    sink.delivered.clear()
    # Every message is taken by the live instance: none refused, every one answered.
    for i in range(50):
        await bus.publish(client_message("echo", i, i))
    delivered = await sink.wait_for(lambda d: len(d) >= 50)
    assert sorted(e.content["content"] for e in delivered) == list(range(50))


async def test_a_sync_handler_sends_from_its_worker_thread(kit: Hosts) -> None:
    class Threaded(Service):
        name = "threaded"

        @handles("threaded.go")
        def go(self, message: Envelope, ctx: Context) -> None:
            ctx.send(Recipients(conn_ids=(ConnId("sink.1"),)), "threaded.item", "from a thread")

    await kit.host(Threaded())
    sink = await kit.sink()
    await sink.bus.publish(client_message("threaded.go", None))
    assert await _reply(sink, "threaded.item") == "from a thread"


class Dawdler(Service):
    """Takes ``dawdler.wait`` and answers it only when :attr:`go` is set."""

    name = "dawdler"

    def __init__(self) -> None:
        self.go = asyncio.Event()

    @handles("dawdler.wait")
    async def wait(self, message: Envelope, ctx: Context) -> None:
        """Reply once allowed."""
        await self.go.wait()
        ctx.reply("done")


async def test_a_message_held_by_an_instance_that_stops_ends_as_an_error(kit: Hosts) -> None:
    dawdler = Dawdler()
    host = await kit.host(dawdler, drain_timeout=0.5)
    gateway = await kit.gateway("g1")
    client = await kit.client(gateway)
    # One handled to the end: its gateway forgets it (the instance said done).
    dawdler.go.set()
    client.send("dawdler.wait", None, id="r0")
    assert (await client.receive_until("dawdler.wait.reply", timeout=10))["reply_to"] == "r0"
    dawdler.go.clear()
    client.send("dawdler.wait", None, id="r1")
    async with asyncio.timeout(10):
        # r0's ack may come after its reply.
        while (await client.receive_until("wsbus.ack", timeout=10))["content"] != {"ref": "r1"}:
            pass  # until the instance holds r1
    await host.close()  # its handler does not finish within the drain
    error = await client.receive_until("wsbus.error", timeout=10)
    assert error["content"]["ref"] == "r1" and error["content"]["code"] == "service_error"
    assert gateway.stats().service_errors == 1  # r0 was not failed: its handler was done


# -- a clean stop drains ----------------------------------------------------------------------


class Quick(Service):
    """Answers ``quick.ask`` after a moment (another turn of the loop)."""

    name = "quick"

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.gate.set()
        self.took = 0

    @handles("quick.ask")
    async def ask(self, message: Envelope, ctx: Context) -> None:
        """Reply once :attr:`gate` is open."""
        self.took += 1
        await asyncio.sleep(0.002)
        await self.gate.wait()
        ctx.reply(message.content)


async def _both_listed(gateway: Any) -> None:
    """Wait until the gateway's directory lists both instances of ``quick``."""
    bus = gateway.bus
    assert isinstance(bus, NatsBus)
    async with asyncio.timeout(30):
        while bus.directory.services().get("quick", 0) < 2:
            await asyncio.sleep(0.02)


async def _outcomes(client: Any, ids: set[str]) -> dict[str, str]:
    """Read until each request id has ended: ``"reply"`` or the error's code."""
    ended: dict[str, str] = {}
    async with asyncio.timeout(60):
        while len(ended) < len(ids):
            frame = await client.receive(60)
            if frame["type"] == "quick.ask.reply" and frame["reply_to"] in ids:
                assert frame["reply_to"] not in ended, "a request ended twice"
                ended[frame["reply_to"]] = "reply"
            elif frame["type"] == "wsbus.error" and frame["content"].get("ref") in ids:
                ref = frame["content"]["ref"]
                assert ref not in ended, "a request ended twice"
                ended[ref] = frame["content"]["code"]
    return ended


async def test_a_clean_stop_of_one_of_two_instances_fails_no_request(kit: Hosts) -> None:
    first, second = Quick(), Quick()
    stopping = await kit.host(first)
    await kit.host(second)
    # No rate limit in the way: each request must end as a reply.
    gateway = await kit.gateway("g1", rate=1e6, burst=1_000_000)
    client = await kit.client(gateway)
    await _both_listed(gateway)
    ids: set[str] = set()

    async def traffic(start: int, n: int) -> None:
        for i in range(start, start + n):
            ids.add(f"r{i}")
            client.send("quick.ask", i, id=f"r{i}")
            await asyncio.sleep(0.001)

    sending = asyncio.create_task(traffic(0, 300))
    async with asyncio.timeout(30):
        while first.took < 20:  # mid-traffic, the first instance busy
            await asyncio.sleep(0.005)
    await stopping.close()
    await sending
    await traffic(300, 50)  # after the stop: all to the other instance
    ended = await _outcomes(client, ids)
    assert set(ended.values()) == {"reply"}, {k: v for k, v in ended.items() if v != "reply"}
    assert first.took and second.took


async def test_what_a_stopping_instance_cannot_finish_in_time_ends_as_an_error(
    kit: Hosts,
) -> None:
    first, second = Quick(), Quick()
    first.gate.clear()  # slower than the drain: never done
    second.gate.clear()
    stopping = await kit.host(first, drain_timeout=0.3)
    await kit.host(second)
    gateway = await kit.gateway("g1")
    client = await kit.client(gateway)
    await _both_listed(gateway)
    ids = {f"r{i}" for i in range(40)}
    for i in range(40):
        client.send("quick.ask", i, id=f"r{i}")
    acked: set[str] = set()
    async with asyncio.timeout(30):
        while len(acked) < len(ids):  # each held by one instance or the other
            frame = await client.receive_until("wsbus.ack", timeout=30)
            acked.add(frame["content"]["ref"])
    assert first.took and second.took
    await stopping.close()
    second.gate.set()
    ended = await _outcomes(client, ids)
    errors = {ref: code for ref, code in ended.items() if code != "reply"}
    # Every request ends: what the stopped instance held as service_error, nothing silent.
    assert errors and set(errors.values()) == {"service_error"}
