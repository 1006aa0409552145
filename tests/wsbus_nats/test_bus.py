"""The NATS bus (gateway side) with real nats-server processes and real service instances."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from wsbus import Service
from wsbus.bus import Bus, ClaimsAliases, ReportsAvailability
from wsbus_nats import NatsBus, NatsConfig, ServiceHost
from wsbus_nats.servers import NatsServer
from wsbus_testing.conformance import BusConformance, MakeBus, MakeUnavailable


class TestNatsBusConformance(BusConformance):
    """The conformance suite every bus passes, with service instances on the same NATS."""

    capabilities = frozenset({ReportsAvailability, ClaimsAliases})

    @pytest.fixture
    def wsbus_make_unavailable(self, wsbus_nats_server: NatsServer) -> MakeUnavailable:
        """Stop the nats-server (by its own pid)."""

        async def make_unavailable(bus: Bus) -> None:
            await asyncio.to_thread(wsbus_nats_server.stop)

        return make_unavailable

    @pytest_asyncio.fixture
    async def wsbus_make_bus(self, nats_config: NatsConfig) -> AsyncIterator[MakeBus]:
        hosts: list[ServiceHost] = []
        buses: list[NatsBus] = []

        async def make(services: list[type[Service]]) -> Bus:
            for cls in services:
                host = ServiceHost(cls(), nats_config)
                await host.start()
                hosts.append(host)
            bus = NatsBus(nats_config)
            buses.append(bus)
            return bus

        yield make
        for bus in buses:
            await bus.close()
        for host in hosts:
            await host.close()
