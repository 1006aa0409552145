"""wsbus.ready: /readyz's probe round the bus, on the in-memory bus (the edges and the real
buses are tested in tests/wsbus_websockets/test_ops.py, tests/wsbus_pyro and tests/wsbus_nats)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import pytest

from wsbus import Gateway, GatewayConfig
from wsbus.envelope import Envelope, EnvelopeId, GatewayAddress, NodeId
from wsbus.memory import MemoryBus
from wsbus.ready import IDLE_STOP, Readiness
from wsbus_cli.demo_services import Echo

pytestmark = pytest.mark.asyncio


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _DeafBus(MemoryBus):
    """Takes the gateway's probes and publishes, and never delivers a probe back."""

    def __init__(self) -> None:
        super().__init__()
        self.deaf = False
        self.probes = 0

    async def probe(self, envelope: Envelope) -> None:
        self.probes += 1
        if not self.deaf:
            await super().probe(envelope)


@contextlib.asynccontextmanager
async def _gateway(bus: MemoryBus) -> AsyncIterator[Gateway]:
    await bus.add_service(Echo())
    gateway = Gateway(bus, config=GatewayConfig(node="ready"), entry_points=False)
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.close()


async def test_a_gateway_whose_probe_comes_back_is_ready_and_lists_its_services() -> None:
    async with _gateway(MemoryBus()) as gateway:
        readiness = Readiness(gateway, services=("echo",))
        report = await readiness.check()
        assert report.ready, report
        assert report.bus.status == "ok"
        assert report.bus.round_trip_ms is not None and report.bus.round_trip_ms >= 0
        assert report.services == {"echo": 1}
        assert report.missing == []
        assert report.edge.status == "ok"
        status, body = report.http()
        assert status == 200 and b'"ready":true' in body
        stats = gateway.stats()
        # The probe is a control envelope: the counters' identities still hold.
        assert stats.control_requests == stats.bus_envelopes == 1
        await readiness.close()


async def test_a_deaf_bus_makes_the_gateway_not_ready_within_the_deadline() -> None:
    bus = _DeafBus()
    async with _gateway(bus) as gateway:
        readiness = Readiness(gateway, timeout=0.2, reuse=0.0)
        assert (await readiness.check()).ready
        bus.deaf = True
        report = await readiness.check()
        assert not report.ready
        assert report.bus.status == "timeout"
        assert "did not come back" in (report.bus.detail or "")
        assert report.http()[0] == 503
        bus.deaf = False
        assert (await readiness.check()).ready
        await readiness.close()


async def test_a_bus_that_refuses_makes_the_gateway_not_ready() -> None:
    bus = MemoryBus()
    async with _gateway(bus) as gateway:
        readiness = Readiness(gateway, reuse=0.0)
        bus.down = True
        report = await readiness.check()
        assert not report.ready and report.bus.status == "unavailable"
        assert report.services is None
        bus.down = False
        assert (await readiness.check()).ready
        await readiness.close()


async def test_a_missing_required_service_or_a_closing_edge_is_not_ready() -> None:
    async with _gateway(MemoryBus()) as gateway:
        readiness = Readiness(gateway, services=("echo", "chat"))
        report = await readiness.check()
        assert not report.ready and report.missing == ["chat"]
        assert report.bus.status == "ok"
        report = await Readiness(gateway).check(closing=True)
        assert not report.ready and report.edge.status == "closing"
        await readiness.close()


async def test_many_asking_at_once_cost_one_probe_and_a_fresh_report_is_reused() -> None:
    bus = _DeafBus()
    clock = _Clock()
    async with _gateway(bus) as gateway:
        readiness = Readiness(gateway, reuse=1.0, clock=clock)
        reports = await asyncio.gather(*(readiness.check() for _ in range(200)))
        assert all(report.ready for report in reports)
        assert bus.probes == 1
        clock.now += 0.5
        await readiness.check()
        assert bus.probes == 1  # younger than reuse: given again
        clock.now += 0.6
        await readiness.check()
        assert bus.probes == 2
        await readiness.close()


async def test_current_answers_at_once_and_keeps_probing_while_asked() -> None:
    bus = _DeafBus()
    clock = _Clock()
    async with _gateway(bus) as gateway:
        readiness = Readiness(gateway, reuse=0.01, clock=clock)
        first = readiness.current()
        assert not first.ready and first.bus.status == "checking"
        async with asyncio.timeout(10):
            while not readiness.current().ready:
                await asyncio.sleep(0.01)
            seen = bus.probes
            while bus.probes < seen + 3:  # probes go on in the background
                await asyncio.sleep(0.01)
        clock.now += IDLE_STOP + 1  # nobody asked for a minute: the probes stop
        async with asyncio.timeout(10):
            while readiness._watcher is not None and not readiness._watcher.done():
                await asyncio.sleep(0.01)
        await readiness.close()


async def test_a_probe_from_someone_else_is_ignored() -> None:
    async with _gateway(MemoryBus()) as gateway:
        readiness = Readiness(gateway)
        forged = Envelope(
            id=EnvelopeId("x-1"),
            type="wsbus.probe",
            sender=GatewayAddress(NodeId("other")),
            to=GatewayAddress(gateway.node),
        )
        gateway.deliver(forged)  # no answer, no error; counted as a control envelope
        assert gateway.stats().control_requests == 1
        assert (await readiness.check()).ready
        await readiness.close()


class _BrokenBus(MemoryBus):
    """A bus whose probe raises what no contract names (an older Pyro bus: AttributeError)."""

    async def probe(self, envelope: Envelope) -> None:
        raise AttributeError("remote object has no attribute 'probe'")


async def test_a_probe_that_raises_anything_is_not_ready_and_never_kills_the_checks() -> None:
    async with _gateway(_BrokenBus()) as gateway:
        readiness = Readiness(gateway, reuse=0.01)
        report = await readiness.check()
        assert not report.ready and report.bus.status == "unavailable"
        assert "AttributeError" in (report.bus.detail or "")
        # The background checks (an edge that cannot wait) go on after such a failure.
        readiness.current()
        async with asyncio.timeout(10):
            while readiness._running is None or not readiness._running.done():
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
        assert readiness._watcher is not None and not readiness._watcher.done()
        assert not readiness.current().ready
        await readiness.close()


async def test_current_never_answers_from_a_check_too_old_to_go_by() -> None:
    clock = _Clock()
    async with _gateway(MemoryBus()) as gateway:
        readiness = Readiness(gateway, reuse=1.0, timeout=2.0, clock=clock)
        assert (await readiness.check()).ready
        clock.now += 3.5  # nobody asked for longer than reuse + timeout
        report = readiness.current()
        assert not report.ready and report.bus.status == "checking"
        await readiness.close()


async def test_the_public_report_names_nothing_of_the_deployment() -> None:
    bus = MemoryBus()
    async with _gateway(bus) as gateway:
        readiness = Readiness(gateway, reuse=0.0, services=("echo", "chat"))
        bus.down = True
        report = await readiness.check()
        full = json.loads(report.http(full=True)[1])
        public = json.loads(report.http(full=False)[1])
        assert full["bus"]["detail"] and full["missing"] == ["echo", "chat"]
        assert "detail" not in public["bus"] and public["services"] is None
        assert public["missing"] == [] and public["ready"] is False
        assert public["bus"]["status"] == "unavailable"
        assert report.http(full=False)[0] == 503
        await readiness.close()
