"""An in-process service handles a message in its sender's turn of the event loop.

``ServiceRunner.offer(envelope, handle_now=True)`` on an eager runner whose service is idle
calls the async handler at once, as the runner's task; what the handler does after its
first await, the runner's task carries on, before anything queued after it.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from tests.conftest import assert_balanced
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
        self.inner_task: asyncio.Future[None] | None = None

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

    @handles("expired")
    async def expired(self, message: Envelope, ctx: Context) -> None:
        # A deadline already past (a client's budget spent): asyncio cancels the current
        # task in the loop's next turn, before the runner's task picked the handler up.
        try:
            async with asyncio.timeout(0):
                await asyncio.Event().wait()
        except TimeoutError:
            self.log.append("expired timed out")

    @handles("self_cancel")
    async def self_cancel(self, message: Envelope, ctx: Context) -> None:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().call_soon(task.cancel)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            task.uncancel()
            self.log.append("self_cancel cancel seen")

    @handles("inner")
    async def inner(self, message: Envelope, ctx: Context) -> None:
        inner = self.inner_task = asyncio.ensure_future(asyncio.sleep(3600))
        try:
            async with asyncio.timeout(0):
                await inner
        except TimeoutError:
            self.log.append("inner timed out")

    @handles("cancelled_future")
    async def cancelled_future(self, message: Envelope, ctx: Context) -> None:
        future = asyncio.get_running_loop().create_future()
        future.cancel()
        await future  # raises CancelledError at once: the handler's own, not a cancel

    @handles("stubborn")
    async def stubborn(self, message: Envelope, ctx: Context) -> None:
        try:
            await self.gate.wait()
        finally:
            await asyncio.sleep(0)  # a bug: it awaits when closed


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


@pytest.mark.parametrize("kind", ["expired", "self_cancel"])
async def test_a_cancel_meant_for_an_eager_handler_reaches_it_not_the_runner(
    runner: tuple[ServiceRunner, Eager, dict[str, str]], kind: str
) -> None:
    # The cancel lands before the runner's task picked the handler up: it killed the task,
    # and the service handled nothing more, silently.
    runner_, service, ended = runner
    task = runner_._task
    assert task is not None
    assert runner_.offer(client_message(kind, 1, 1), handle_now=True)
    async with asyncio.timeout(10):
        while "m1" not in ended and not task.done():
            await asyncio.sleep(0)
    assert not task.done(), "the runner's task ended: the service handles nothing more"
    assert ended == {"m1": "handled"} and service.log == [
        f"{kind} {'timed out' if kind == 'expired' else 'cancel seen'}"
    ]
    assert task.cancelling() == 0
    assert runner_.offer(client_message("now", 2, 2), handle_now=True)
    assert service.log[-1] == "now 2"


async def test_a_cancel_meant_for_an_eager_handler_cancels_what_it_awaits(
    runner: tuple[ServiceRunner, Eager, dict[str, str]],
) -> None:
    # As a task's cancel does: a task the handler awaits is cancelled too, not left running.
    runner_, service, ended = runner
    assert runner_.offer(client_message("inner", 1, 1), handle_now=True)
    async with asyncio.timeout(10):
        while "m1" not in ended:
            await asyncio.sleep(0)
    assert service.log == ["inner timed out"] and ended == {"m1": "handled"}
    assert service.inner_task is not None and service.inner_task.cancelled()


class Timed(Service):
    """Gives up on a wait with a timeout shorter than the turn it is started in."""

    name = "timed"

    def __init__(self) -> None:
        self.timed_out = 0

    @handles("timed")
    async def timed(self, message: Envelope, ctx: Context) -> None:
        try:
            async with asyncio.timeout(0.05):
                await asyncio.Event().wait()
        except TimeoutError:
            self.timed_out += 1


async def _a_long_turn_after_an_eager_start() -> tuple[bool, int]:
    """Start ``timed`` at once, keep the turn for longer than its timeout; did it end well?"""
    service = Timed()
    runner = ServiceRunner(service, lambda envelope: None, eager=True)
    await runner.start()
    await _settled()
    task = runner._task
    assert task is not None
    try:
        assert runner.offer(client_message("timed", 1, 1), handle_now=True)
        # The rest of the gateway reader's turn (a client's burst, other connections): on
        # uvloop, timers due run before the next turn's ready callbacks. A busy machine
        # only makes the turn longer.
        end = time.monotonic() + 0.1
        while time.monotonic() < end:
            pass
        async with asyncio.timeout(10):
            while service.timed_out == 0 and not task.done():
                await asyncio.sleep(0.01)
        return task.done(), service.timed_out
    finally:
        await runner.stop()


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_handlers_timeout_due_before_the_runner_picked_it_up_ends_the_wait_not_the_runner(
    loop_kind: str,
) -> None:
    if loop_kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    try:
        ended, timed_out = loop.run_until_complete(_a_long_turn_after_an_eager_start())
    finally:
        loop.close()
    assert not ended, "the runner's task ended: the service handles nothing more"
    assert timed_out == 1


@pytest.mark.parametrize("handle_now", [True, False], ids=["eager", "queued"])
async def test_a_handler_raising_cancelled_error_is_its_failure_not_the_end_of_the_service(
    runner: tuple[ServiceRunner, Eager, dict[str, str]],
    caplog: pytest.LogCaptureFixture,
    handle_now: bool,
) -> None:
    runner_, service, ended = runner
    task = runner_._task
    assert task is not None
    with caplog.at_level(logging.ERROR, logger="wsbus.service"):
        # Eager: it raised into the caller (the gateway's reader). Queued: it ended the task.
        assert runner_.offer(client_message("cancelled_future", 1, 1), handle_now=handle_now)
        await _settled()
    assert not task.done(), "the runner's task ended: the service handles nothing more"
    assert ended == {"m1": "failed"}
    assert "failed handling 'cancelled_future'" in caplog.text
    assert runner_.offer(client_message("now", 2, 2), handle_now=True)
    assert service.log[-1] == "now 2"


async def test_a_handler_raising_cancelled_error_at_once_leaves_its_client_connected() -> None:
    # It closed the client 1011 (the gateway's reader took it for its own cancel), the frame
    # counted read and never accounted for. It is the service's failure: counted, logged.
    gateway = Gateway(MemoryBus([Eager()]), config=GatewayConfig(node="t"), entry_points=False)
    await gateway.start()
    conn, client = memory_pair()
    task = asyncio.create_task(gateway.serve(conn))
    try:
        async with asyncio.timeout(10):
            assert (await client.receive())["type"] == "wsbus.welcome"
            client.send("cancelled_future", None)  # no id: started at once, in the reader
            client.send("now", 2, id="two")
            ack = await client.receive()
            assert ack["type"] == "wsbus.ack" and ack["content"] == {"ref": "two"}
        assert not task.done()
        stats = gateway.stats()
        assert stats.service_errors == 1
        assert_balanced(stats)
    finally:
        await gateway.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class BadSignature(Service):
    """A handler that takes no context: calling it raises."""

    name = "bad"

    @handles("bad")
    async def bad(self, message: Envelope) -> None:
        pass


async def test_a_handler_whose_call_raises_is_the_services_failure_on_the_eager_path_too() -> None:
    # Not an exception out of offer: the gateway took it for the bus's and told the client
    # to retry (unavailable) where the queued path says service_error.
    ended: dict[str, str] = {}
    runner = ServiceRunner(
        BadSignature(),
        lambda envelope: None,
        finished=lambda envelope, outcome: ended.__setitem__(envelope.id, outcome),
        eager=True,
    )
    await runner.start()
    try:
        await _settled()
        assert runner.offer(client_message("bad", 1, 1), handle_now=True)
        assert ended == {"m1": "failed"}
    finally:
        await runner.stop()


async def test_a_handler_that_awaits_when_closed_does_not_fail_the_stop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ended: dict[str, str] = {}
    service = Eager()
    runner = ServiceRunner(
        service,
        lambda envelope: None,
        finished=lambda envelope, outcome: ended.__setitem__(envelope.id, outcome),
        eager=True,
    )
    await runner.start()
    await _settled()
    assert runner.offer(client_message("stubborn", 1, 1), handle_now=True)
    with caplog.at_level(logging.WARNING, logger="wsbus.service"):
        await runner.stop()  # before its task got to carry it on: the handler is closed
    assert ended == {"m1": "stopped"}
    assert "did not stop when closed" in caplog.text
