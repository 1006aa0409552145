"""``wsbus demo`` as real processes: /metrics moves as clients chat, /readyz follows the bus.

The demo's Pyro message bus is killed by its own process id (found among the demo's
children); /readyz turns not ready, and ready again once a new bus runs with the same
command line and secret.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from wsbus_cli.supervisor import Child, free_port

pytest.importorskip("Pyro5")
pytest.importorskip("websockets")
pytest.importorskip("prometheus_client")

from prometheus_client.parser import text_string_to_metric_families

from tests.wsbus_cli.test_demo import _children, _cmdline, _environ, _without_secret
from wsbus_websockets import connect


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = _get(url)
    assert status == 200, body
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


@pytest.fixture
def demo_port() -> Iterator[tuple[Child, int]]:
    port = free_port()
    with _without_secret():
        child = Child(["demo", "--no-browser", "--port", str(port)], ready="running at", timeout=60)
    try:
        yield child, port
    finally:
        assert child.stop() == 0, child.text


async def _ready(base: str, want: bool, timeout: float = 60.0) -> dict[str, object]:  # noqa: ASYNC109
    async with asyncio.timeout(timeout):
        while True:
            status, body = await asyncio.to_thread(_get, f"{base}readyz")
            report = json.loads(body)
            assert status == (200 if report["ready"] else 503)
            if report["ready"] is want:
                return report  # type: ignore[no-any-return]
            await asyncio.sleep(0.1)


@pytest.mark.asyncio
async def test_the_demo_serves_metrics_that_move_and_readiness_that_follows_its_bus(
    demo_port: tuple[Child, int],
) -> None:
    child, port = demo_port
    base = f"http://127.0.0.1:{port}/"
    async with asyncio.timeout(30):
        while f"metrics {base}metrics" not in child.text:  # the line after "running at"
            await asyncio.sleep(0.05)
    report = await _ready(base, True)
    assert report["services"] == {"echo": 1, "chat": 1}, report

    before = await asyncio.to_thread(_samples, f"{base}metrics")
    async with asyncio.timeout(30), connect(f"ws://127.0.0.1:{port}/") as client:
        await client.request("chat.join", {"room": "lobby"})
        await client.send("chat.say", {"room": "lobby", "text": "hello"})
        while (frame := await client.receive())["type"] != "chat.message":
            pass
        assert frame["content"]["text"] == "hello"
        during = await asyncio.to_thread(_samples, f"{base}metrics")
    assert (
        during[("wsbus_frames_received_total", ())]
        >= before[("wsbus_frames_received_total", ())] + 2
    )
    assert (
        during[("wsbus_deliveries_written_total", ())]
        > before[("wsbus_deliveries_written_total", ())]
    )
    assert during[("wsbus_connections", (("codec", "wsbus.v1.json"), ("edge", "websockets")))] == 1
    assert during[("wsbus_bus_available", ())] == 1
    assert ("process_cpu_seconds_total", ()) in during

    # The message bus, killed by its own pid: not ready within the probe's deadline.
    (bus_pid,) = [pid for pid in _children(child.pid) if "bus" in _cmdline(pid)[3:5]]
    argv = [arg for arg in _cmdline(bus_pid) if arg]
    env = _environ(bus_pid)
    os.kill(bus_pid, signal.SIGKILL)
    report = await _ready(base, False)
    assert report["bus"]["status"] in ("unavailable", "timeout"), report  # type: ignore[index]

    bus = await asyncio.to_thread(
        subprocess.Popen, argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        await _ready(base, True)
    finally:
        await asyncio.to_thread(_end, bus)


def _end(process: subprocess.Popen[bytes]) -> None:
    """End a process this test started, by its own pid: politely, then for sure."""
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
