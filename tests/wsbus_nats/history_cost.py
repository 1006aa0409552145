"""The cost of a history append on NATS: ``python -m tests.wsbus_nats.history_cost [N]``.

One service instance sends N messages to a group without history, then to one that keeps
history, timed until a stand-in gateway has them all (twice each); then two services send N
each to one history group at once (offsets raced for and retried). A real nats-server on
loopback, ended by its own pid. Not a test: figures for docs/nats.md.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import tempfile
import time
from pathlib import Path

import msgspec

from tests.wsbus_nats.test_history import Caster, OtherCaster, Sink
from wsbus.envelope import ClientAddress, ConnId
from wsbus.history import HistoryConfig
from wsbus_nats import NatsBus, NatsConfig, ServiceHost
from wsbus_nats.servers import NatsServer
from wsbus_testing.conformance import client_message


async def measure(url: str, n: int) -> None:
    """Print the figures, on the server at ``url``."""
    config = NatsConfig(servers=(url,), heartbeat=0.5)
    bus = NatsBus(config)
    bus.keep_history(HistoryConfig(groups=("room.*",), size=n * 2))
    sink = Sink("ga")
    await bus.start(sink)
    hosts = [ServiceHost(Caster(), config), ServiceHost(OtherCaster(), config)]
    counter = itertools.count(1)

    async def burst(group: str, expect: int) -> float:
        before = len(sink.of("cast.item"))
        message = client_message("cast.burst", {"group": group, "n": n}, next(counter))
        began = time.perf_counter()
        await bus.publish(msgspec.structs.replace(message, sender=ClientAddress(ConnId("ga.1"))))
        async with asyncio.timeout(600):
            while len(sink.of("cast.item")) < before + expect:
                await asyncio.sleep(0.001)
        return time.perf_counter() - began

    try:
        await hosts[0].start()
        async with asyncio.timeout(30):
            while not bus.directory.service_live("caster"):
                await asyncio.sleep(0.02)
        for label, group in (
            ("no history", "lobby"),
            ("history", "room.1"),
            ("no history", "lobby"),
            ("history", "room.2"),
        ):
            took = await burst(group, n)
            print(f"{label} ({group}): {n} sends in {took:.3f} s = {n / took:,.0f}/s")
        await hosts[1].start()
        async with asyncio.timeout(30):
            while not bus.directory.service_live("othercaster"):
                await asyncio.sleep(0.02)
        took = await burst("room.3", 2 * n)
        conflicts = sum(host.history_counters.conflicts for host in hosts)
        failures = sum(host.history_counters.append_failures for host in hosts)
        print(
            f"two services at once to one history group: {2 * n} sends in {took:.3f} s = "
            f"{2 * n / took:,.0f}/s, {conflicts} lost offsets retried, {failures} failed"
        )
    finally:
        for host in hosts:
            await host.close()
        await bus.close()


def main() -> None:
    """Start a server, measure, stop it."""
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    with tempfile.TemporaryDirectory() as directory, NatsServer(Path(directory)) as server:
        asyncio.run(measure(server.url, n))


if __name__ == "__main__":
    main()
