"""An in-process service handles a message in its sender's turn of the event loop.

``ServiceRunner.offer(envelope, handle_now=True)`` on an eager runner whose service is idle
calls the async handler at once, as the runner's task; what the handler does after its
first await, the runner's task carries on, before anything queued after it.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from wsbus import Context, Envelope, Gateway, GatewayConfig, MemoryBus, Service, handles
from wsbus.edge import memory_pair
from wsbus.service import ServiceRunner
from wsbus_testing.conformance import client_message

SEEN: contextvars.ContextVar[list[str]] = contextvars.ContextVar("SEEN")


class Eager(Service):
    """Records what it handles, and how; ``wait`` messages wait for :attr:`gate`."""

    name = "eager"

    def __init__(self) -> None:
        self.log: list[str] = []
        self.tasks: list[asyncio.Task[object] | None] = []
        self.gate = asyncio.Event()
        self.timed_out = asyncio.Event()

    @handles("now")
    async def now(self, message: Envelope, ctx: Context) -> None:
        self.tasks.append(asyncio.current_task())
        self.log.append(f"now {message.content}")

    @handles("wait")
    async def wait(self, message: Envelope, ctx: Context) -> None:
        self.log.append(f"start {message.content}")
        await self.gate.wait()
        self.log.append(f"end {message.content}")

    @handles("raise")
    async def boom(self, message: Envelope, ctx: Context) -> None:
        raise RuntimeError("planned")

    @handles("remember")
    async def remember(self, message: Envelope, ctx: Context) -> None:
        seen = SEEN.get(None)
        if seen is None:
            seen = []
            SEEN.set(seen)
        seen.append(str(message.content))
        self.log.append(f"remembers {seen}")

    @handles("timeout")
    async def timeout(self, message: Envelope, ctx: Context) -> None:
        try:
            async with asyncio.timeout(0.01):
                await asyncio.Event().wait()
        except TimeoutError:
            self.timed_out.set()


@pytest_asyncio.fixture
async def runner() -> AsyncIterator[tuple[ServiceRunner, Eager, dict[str, str]]]:
    ended: dict[str, str] = {}

    def finished(envelope: Envelope, outcome: str) -> None:
        assert envelope.id not in ended, "called once per envelope"
        ended[envelope.id] = outcome

    service = Eager()
    runner = ServiceRunner(service, lambda envelope: None, finished=finished, eager=True)
    await runner.start()
    await _settled()
    yield runner, service, ended
    await runner.stop()


async def _settled() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_an_idle_service_handles_the_message_before_offer_returns(
    runner: tuple[ServiceRunner, Eager, dict[str, str]],
) -> None:
    runner_, service, ended = runner
    assert runner_.offer(client_message("now", 1, 1), handle_now=True)
    assert service.log == ["now 1"]
    # As the runner's own task, not the caller's.
    assert service.tasks == [runner_._task] and asyncio.current_task() is not runner_._task
    assert ended == {"m1": "handled"}


async def test_of_a_burst_the_first_is_handled_at_once_the_rest_as_a_batch(
    runner: tuple[ServiceRunner, Eager, dict[str, str]],
) -> None:
    runner_, service, ended = runner
    for n in (1, 2, 3):
        assert runner_.offer(client_message("now", n, n), handle_now=True)
    assert service.log == ["now 1"]
    await _settled()
    assert service.log == ["now 1", "now 2", "now 3"]
    # Idle again: the next is handled at once.
    assert runner_.offer(client_message("now", 4, 4), handle_now=True)
    assert service.log[-1] == "now 4"
    assert ended == dict.fromkeys(("m1", "m2", "m3", "m4"), "handled")


async def test_without_handle_now_the_message_waits_for_the_runners_task(
    runner: tuple[ServiceRunner, Eager, dict[str, str]],
) -> None:
    runner_, service, ended = runner
    assert runner_.offer(client_message("now", 1, 1))
    assert service.log == []
    await _settled()
    assert service.log == ["now 1"] and ended == {"m1": "handled"}


async def test_a_handler_that_awaits_is_carried_on_before_what_came_after_it(
    runner: tuple[ServiceRunner, Eager, dict[str, str]],
) -> None:
    runner_, service, ended = runner
    assert runner_.offer(client_message("wait", 1, 1), handle_now=True)
    assert service.log == ["start 1"]
    # Busy now: the next is queued, even with handle_now.
    assert runner_.offer(client_message("now", 2, 2), handle_now=True)
    await _settled()
    assert service.log == ["start 1"]
    service.gate.set()
    await _settled()
    assert service.log == ["start 1", "end 1", "now 2"]
    assert ended == {"m1": "handled", "m2": "handled"}


async def test_a_handler_failing_at_once_is_logged_and_the_service_goes_on(
    runner: tuple[ServiceRunner, Eager, dict[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    runner_, service, ended = runner
    with caplog.at_level(logging.ERROR, logger="wsbus.service"):
        assert runner_.offer(client_message("raise", 1, 1), handle_now=True)
    assert ended == {"m1": "failed"}
    assert "RuntimeError: planned" in caplog.text
    await _settled()
    assert runner_.offer(client_message("now", 2, 2), handle_now=True)
    assert service.log == ["now 2"] and ended["m2"] == "handled"


async def test_context_variables_are_the_services_whichever_way_a_handler_starts(
    runner: tuple[ServiceRunner, Eager, dict[str, str]],
) -> None:
    runner_, service, _ = runner
    assert runner_.offer(client_message("remember", "a", 1), handle_now=True)
    assert runner_.offer(client_message("remember", "b", 2))
    await _settled()
    assert runner_.offer(client_message("remember", "c", 3), handle_now=True)
    assert service.log[-1] == "remembers ['a', 'b', 'c']"
    assert SEEN.get(None) is None  # the caller's context is untouched


async def test_a_timeout_a_handler_starts_at_once_cancels_the_handler_not_the_caller(
    runner: tuple[ServiceRunner, Eager, dict[str, str]],
) -> None:
    runner_, service, ended = runner
    assert runner_.offer(client_message("timeout", 1, 1), handle_now=True)
    async with asyncio.timeout(10):
        await service.timed_out.wait()
        await _settled()
    assert ended == {"m1": "handled"}


async def test_a_handler_started_at_once_and_not_carried_on_is_stopped_once() -> None:
    ended: dict[str, str] = {}

    def finished(envelope: Envelope, outcome: str) -> None:
        assert envelope.id not in ended, "called once per envelope"
        ended[envelope.id] = outcome

    service = Eager()
    runner = ServiceRunner(service, lambda envelope: None, finished=finished, eager=True)
    await runner.start()
    await _settled()
    assert runner.offer(client_message("wait", 1, 1), handle_now=True)
    await runner.stop()  # before its task got to carry it on
    assert ended == {"m1": "stopped"} and service.log == ["start 1"]


async def test_a_client_gets_the_ack_before_the_reply_and_the_reply_without_an_id() -> None:
    class Echo(Service):
        name = "echo"

        @handles("echo")
        async def echo(self, message: Envelope, ctx: Context) -> None:
            ctx.reply(message.content)

    gateway = Gateway(MemoryBus([Echo()]), config=GatewayConfig(node="t"), entry_points=False)
    await gateway.start()
    conn, client = memory_pair()
    task = asyncio.create_task(gateway.serve(conn))
    try:
        async with asyncio.timeout(10):
            assert (await client.receive())["type"] == "wsbus.welcome"
            client.send("echo", 1, id="one")
            ack, reply = await client.receive(), await client.receive()
            assert ack["type"] == "wsbus.ack" and ack["content"] == {"ref": "one"}
            assert reply["type"] == "echo.reply" and reply["reply_to"] == "one"
            client.send("echo", 2)
            reply = await client.receive()
            assert reply["type"] == "echo.reply" and reply["content"] == 2
    finally:
        await gateway.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_asyncio_internals_we_rely_on_are_there() -> None:
    """The two private asyncio functions eager dispatch uses exist and swap current_task().

    If this fails on a new Python (or event loop): ``asyncio.tasks._enter_task`` and
    ``_leave_task`` are gone or no longer set what ``asyncio.current_task()`` returns.
    Runners then queue every message (``eager_dispatch_available()`` is False when they
    are missing); find the new way to start a coroutine as another task (Python 3.12's
    eager tasks swap the current task in C), or leave eager dispatch off on that Python,
    and say so in wsbus/service.py and docs/architecture.md.
    """
    import wsbus.service

    for name in ("_enter_task", "_leave_task"):
        assert callable(getattr(asyncio.tasks, name, None)), (
            f"asyncio.tasks.{name} is missing on this Python: eager dispatch is off "
            "(see this test's docstring)"
        )
    assert wsbus.service.eager_dispatch_available()
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    assert me is not None
    other = asyncio.ensure_future(asyncio.sleep(60))
    try:
        asyncio.tasks._leave_task(loop, me)
        asyncio.tasks._enter_task(loop, other)
        seen = asyncio.current_task()
        asyncio.tasks._leave_task(loop, other)
        asyncio.tasks._enter_task(loop, me)
    finally:
        other.cancel()
        await asyncio.gather(other, return_exceptions=True)
    assert seen is other, "asyncio.tasks._enter_task no longer sets asyncio.current_task()"
    assert asyncio.current_task() is me


async def test_without_the_internals_an_eager_runner_queues_every_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import wsbus.service

    monkeypatch.setattr(wsbus.service, "_enter_task", None)
    assert not wsbus.service.eager_dispatch_available()
    service = Eager()
    runner = ServiceRunner(service, lambda envelope: None, eager=True)
    await runner.start()
    try:
        await _settled()
        assert runner.offer(client_message("now", 1, 1), handle_now=True)
        assert service.log == []  # queued, not handled at once
        await _settled()
        assert service.log == ["now 1"]
    finally:
        await runner.stop()


def test_eager_dispatch_works_on_uvloop() -> None:
    uvloop = pytest.importorskip("uvloop")

    async def handled_at_once() -> tuple[list[str], bool, bool]:
        service = Eager()
        runner = ServiceRunner(service, lambda envelope: None, eager=True)
        await runner.start()
        try:
            await _settled()
            assert runner.offer(client_message("now", 1, 1), handle_now=True)
            at_once = list(service.log)
            assert runner.offer(client_message("timeout", 2, 2), handle_now=False)
            await _settled()
            assert runner.offer(client_message("wait", 3, 3), handle_now=True)
            service.gate.set()
            async with asyncio.timeout(10):
                await service.timed_out.wait()
                while service.log[-1] != "end 3":
                    await asyncio.sleep(0)
            return at_once, service.tasks == [runner._task], service.timed_out.is_set()
        finally:
            await runner.stop()

    loop = uvloop.new_event_loop()
    try:
        at_once, as_runner, timed_out = loop.run_until_complete(handled_at_once())
    finally:
        loop.close()
    assert at_once == ["now 1"] and as_runner and timed_out
