"""The in-memory bus passes the bus conformance suite, and its own specifics."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from wsbus import BusUnavailable, ConfigError, MemoryBus, NoRoute, Service
from wsbus.bus import Bus
from wsbus_testing.conformance import BusConformance, MakeBus, RecordingSink, client_message
from wsbus_testing.services import Probe


class TestMemoryBus(BusConformance):
    @pytest_asyncio.fixture
    async def wsbus_make_bus(self) -> AsyncIterator[MakeBus]:
        buses: list[MemoryBus] = []

        async def make(services: list[type[Service]]) -> Bus:
            bus = MemoryBus([cls() for cls in services])
            buses.append(bus)
            return bus

        yield make
        for bus in buses:
            await bus.close()


async def test_a_full_inbox_refuses_with_unavailable() -> None:
    bus = MemoryBus([Probe()], inbox_size=2)
    sink = RecordingSink(bus)
    await bus.start(sink)
    runner = bus._runners["probe"]
    await runner.stop()  # nobody takes from the inbox now
    await bus.publish(client_message("probe.echo", 1))
    await bus.publish(client_message("probe.echo", 2))
    with pytest.raises(BusUnavailable):
        await bus.publish(client_message("probe.echo", 3))
    await bus.close()


async def test_removed_service_means_no_route() -> None:
    bus = MemoryBus([Probe()])
    await bus.start(RecordingSink(bus))
    await bus.remove_service("probe")
    with pytest.raises(NoRoute):
        await bus.publish(client_message("probe.echo", 1))
    await bus.close()


async def test_two_services_with_one_name_are_refused() -> None:
    bus = MemoryBus([Probe()])
    await bus.start(RecordingSink(bus))
    with pytest.raises(ConfigError):
        await bus.add_service(Probe())
    await bus.close()
