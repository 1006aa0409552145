"""The benchmark scripts still run (tiny sizes; no timing is asserted: that is bench's job)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _bench(*args: str) -> str:
    return _run("bench", *args, "--repeat", "1")


def _run(module: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_fanout_ingest_and_memory_run_against_every_anchor(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    out = _bench("fanout", "--clients", "4", "--messages", "5", "--json", str(results))
    assert "wsbus / raw" in out and "wsbus / socketio" in out
    assert "worst event-loop lag of each server" in out
    saved = json.loads(results.read_text())
    table = saved["fan-out: 5 messages to 4 clients"]
    assert set(table["values"]) == {"raw", "wsbus", "socketio"}
    assert set(table["worst_loop_lag_ms"]) == {"raw", "wsbus", "socketio"}
    out = _bench("ingest", "--clients", "2", "--frames", "200")
    assert "frames/s" in out and "wsbus / raw" in out
    out = _bench("memory", "--clients", "5")
    assert "KiB per connection" in out


def test_pyro_path_runs() -> None:
    out = _bench("pyro", "--messages", "300")
    assert "plain Pyro5 calls" in out and "wsbus over Pyro" in out
    assert "wsbus one-way" in out and "bare WebSocket" in out


def test_the_pyro_tracer_sees_every_point() -> None:
    # It patches wsbus internals to take its measurements: this keeps it in step with them.
    out = _run("bench.trace_pyro", "--rounds", "20")
    for point in (
        "to message bus: queued for the forwarder thread",
        "bus: Pyro message received",
        "gateway: method called",
        "gateway: on the event loop",
        "gateway: written to the client's socket",
    ):
        assert point in out, out


def test_nats_path_runs() -> None:
    out = _bench("nats", "--messages", "300")
    assert "anchor (nats-py publish" in out and "wsbus over NATS" in out
    assert "one-way p50" in out and "CPU per message" in out
