"""``wsbus bus --metrics`` and ``wsbus service --metrics``: real processes, scraped over HTTP."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from wsbus import Gateway, GatewayConfig, memory_pair
from wsbus.wire import Codec
from wsbus_cli.supervisor import Child, free_port
from wsbus_pyro import PyroBus, PyroConfig

pytest.importorskip("prometheus_client")

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        body = answer.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


async def _until(port: int, key: tuple[str, tuple[tuple[str, str], ...]], least: float) -> Samples:
    async with asyncio.timeout(30):
        while True:
            try:
                samples = await asyncio.to_thread(_scrape, port)
            except (urllib.error.URLError, ConnectionError):
                samples = {}
            if samples.get(key, -1) >= least:
                return samples
            await asyncio.sleep(0.05)


@pytest.mark.asyncio
async def test_the_bus_and_a_service_process_serve_metrics_that_follow_the_traffic(
    wsbus_nameserver: Child, wsbus_pyro_config: PyroConfig
) -> None:
    args = ["--ns-host", wsbus_pyro_config.ns_host, "--ns-port", str(wsbus_pyro_config.ns_port)]
    bus_port, service_port = free_port(), free_port()
    bus = await asyncio.to_thread(Child, ["bus", *args, "--metrics", str(bus_port)])
    service: Child | None = None
    gateway: Gateway | None = None
    try:
        service = await asyncio.to_thread(
            Child,
            [
                "service",
                "wsbus_cli.demo_services:Echo",
                *args,
                "--metrics",
                f"127.0.0.1:{service_port}",
            ],
        )
        gateway = Gateway(
            PyroBus(wsbus_pyro_config), config=GatewayConfig(node="m1"), entry_points=False
        )
        await gateway.start()
        up = ("wsbus_pyro_bus_endpoint_up", (("kind", "gateway"), ("name", "m1")))
        samples = await _until(bus_port, up, 1)
        assert samples[("wsbus_pyro_bus_endpoint_up", (("kind", "service"), ("name", "echo")))] == 1
        assert ("process_cpu_seconds_total", ()) in samples

        conn, client = memory_pair(Codec.JSON)
        task = asyncio.create_task(gateway.serve(conn))
        await client.receive_until("wsbus.welcome")
        for n in range(3):
            client.send("echo", {"n": n}, id=f"e{n}")
        for _ in range(3):
            await client.receive_until("echo.reply")
        samples = await asyncio.to_thread(_scrape, service_port)
        echo = (("service", "echo"),)
        assert samples[("wsbus_service_inbox", echo)] == 0
        assert samples[("wsbus_service_inbox_size", echo)] > 0
        assert samples[("wsbus_service_failures_total", echo)] == 0
        assert samples[("wsbus_service_bus_available", echo)] == 1
        assert samples[("wsbus_service_send_calls_total", echo)] >= 1
        await conn.close(1000)
        await asyncio.wait_for(task, 10)
    finally:
        if gateway is not None:
            await gateway.close()
        if service is not None:
            await asyncio.to_thread(service.stop)
        await asyncio.to_thread(bus.stop)


def test_a_metrics_address_that_is_not_one_is_refused_by_name(
    wsbus_nameserver: Child, wsbus_pyro_config: PyroConfig
) -> None:
    args = ["--ns-host", wsbus_pyro_config.ns_host, "--ns-port", str(wsbus_pyro_config.ns_port)]
    done = subprocess.run(
        [sys.executable, "-m", "wsbus_cli", "bus", *args, "--metrics", "nowhere"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "--metrics 'nowhere'" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
