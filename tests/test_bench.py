"""The benchmarks still run, say what they measure and record it (no timing is asserted).

The bench's own logic is tested here: wsbus runs at its default settings but the rate
limit, every run writes a complete JSON record, and SPEC section 6's bars are the ones
named. Tiny sizes: the figures mean nothing, only their presence is checked.
"""

from __future__ import annotations

import importlib.util
import json
import pstats
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.__main__ import (
    EDGE_KINDS,
    Bar,
    RawClient,
    _bars,
    _edges,
    frame,
    main,
    picows_installed,
)
from bench.report import render
from bench.servers import RAISED_RATE, wsbus_settings
from tests.loops import run_in_own_loop

ROOT = Path(__file__).parent.parent
EDGES = ["websockets", "picows"] if picows_installed() else ["websockets"]
OURS = [EDGE_KINDS[edge] for edge in EDGES]
HAS_UVLOOP = importlib.util.find_spec("uvloop") is not None


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


def test_wsbus_runs_at_its_defaults_but_the_rate_limit() -> None:
    # The one setting changed is a policy, not a speed; the bus and the edge are untouched.
    assert RAISED_RATE == {"rate": 1e9, "burst": 10**9}
    for edge in EDGES:
        assert wsbus_settings(edge) == {"gateway": RAISED_RATE, "bus": {}, "edge": {}}


def test_every_benchmark_runs_against_every_anchor_and_the_record_is_complete(
    tmp_path: Path,
) -> None:
    results = tmp_path / "results.json"
    out = _bench(
        "fanout",
        "ingest",
        "echo",
        "memory",
        "--clients",
        "3",
        "--messages",
        "5",
        "--frames",
        "90",
        "--rounds",
        "10",
        "--edge",
        ",".join(EDGES),
        "--json",
        str(results),
    )
    for text in ("wsbus / raw", "/ socketio", "/ raw-count", "server CPU", "worst loop lag"):
        assert text in out
    assert "SPEC section 6's bars measured in this run" in out
    assert f"results written to {results}" in out
    saved = json.loads(results.read_text())

    assert saved["command"].startswith("python -m bench fanout ingest echo memory")
    assert saved["complete"] is True and saved["started"] <= saved["finished"]
    machine = saved["machine"]
    assert machine["cores"] >= 1 and len(machine["load"]) == 3 and len(machine["load_after"]) == 3
    assert saved["versions"]["wsbus"] and saved["versions"]["websockets"]
    settings = saved["settings"]
    assert settings["repeat"] == 1 and settings["edges"] == EDGES
    # What the servers said they ran with: the defaults but the rate limit.
    servers = settings["servers"]
    for kind, edge in zip(OURS, EDGES, strict=True):
        assert servers[kind] == json.loads(json.dumps(wsbus_settings(edge)))
    assert servers["raw"] == servers["raw-count"] == {"compression": None}
    # Every server on asyncio's own event loop unless --loop says otherwise.
    assert settings["loop"] == "asyncio"
    assert settings["server_loops"] == dict.fromkeys(
        ["raw", "raw-count", *OURS, "socketio"], "asyncio"
    )

    tables = saved["tables"]
    by_benchmark: dict[str, list[dict[str, Any]]] = {}
    for table in tables.values():
        by_benchmark.setdefault(table["benchmark"], []).append(table)
    assert set(by_benchmark) == {
        "fan-out paced",
        "fan-out unpaced",
        "ingest",
        "echo p50",
        "echo p99",
        "memory",
    }
    assert by_benchmark["fan-out paced"][0]["params"]["paced"] is True
    assert by_benchmark["fan-out unpaced"][0]["params"]["paced"] is False
    for name, [table] in by_benchmark.items():
        kinds = {"raw", *OURS, "socketio"} | ({"raw-count"} if name == "ingest" else set())
        assert set(table["values"]) == set(table["runs"]) == kinds, name
        assert all(len(runs) == 1 for runs in table["runs"].values())
        assert set(table["worst_loop_lag_ms"]) == kinds or name == "echo p99"
        if name not in ("memory", "echo p99"):
            # Server CPU per message beside every rate (and every round trip).
            assert set(table["server_cpu_us_per_message"]) == kinds, name
        assert {f"{ours} / raw" for ours in OURS} <= set(table["ratios"])
        assert len(table["load_before"]) == 3
    # Each table's bars are in the run's list of bars, each with its verdict.
    bars = saved["bars"]
    assert bars == [bar for table in tables.values() for bar in table["bars"]]
    assert all(isinstance(bar["met"], bool) for bar in bars)
    names = " | ".join(bar["name"] for bar in bars)
    assert "fan-out unpaced to 3 clients, wsbus (websockets edge) / websockets.broadcast" in names
    assert "server CPU per frame above raw websockets (raw-count)" in names
    # The record as docs/performance.md shows it: a row per table, a row per bar.
    markdown = render(saved)
    assert all(f"| {title} |" in markdown for title in tables)
    assert all(f"| {bar['name']} |" in markdown for bar in bars)


def test_without_json_the_record_goes_to_bench_results() -> None:
    before = set((ROOT / "bench" / "results").glob("*.json"))
    out = _bench("echo", "--kinds", "raw", "--rounds", "1")
    written = set((ROOT / "bench" / "results").glob("*.json")) - before
    try:
        assert len(written) == 1
        [path] = written
        assert f"results written to {path}" in out
        tables = json.loads(path.read_text())["tables"].values()
        assert [set(table["values"]) for table in tables] == [{"raw"}, {"raw"}]  # p50, p99
    finally:
        for path in written:
            path.unlink()


@pytest.mark.parametrize(
    ("option", "said"),
    [
        (["--edge", "carrier-pigeon"], "unknown edge 'carrier-pigeon'"),
        (["--kinds", "raw,carrier-pigeon"], "unknown kind carrier-pigeon"),
    ],
)
def test_an_unknown_edge_or_kind_is_refused_by_name(option: list[str], said: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench", "echo", *option],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert said in result.stderr
    assert "Traceback" not in result.stderr


def test_all_runs_every_installed_edge_a_single_benchmark_the_default_one() -> None:
    assert _edges(None, everything=True) == EDGES
    assert _edges(None, everything=False) == ["websockets"]
    assert _edges("websockets", everything=True) == ["websockets"]


def test_a_bar_is_met_on_its_side_of_the_limit() -> None:
    assert Bar("ratio", 3.0, 3.0, True, "x").met
    assert not Bar("ratio", 2.99, 3.0, True, "x").met
    assert Bar("cpu", 1.5, 1.5, False, "us").met
    assert not Bar("cpu", 1.51, 1.5, False, "us").met
    assert "NOT MET" in Bar("cpu", 1.51, 1.5, False, "us").line()


def _limits(bars: list[Bar]) -> dict[str, tuple[float, bool]]:
    return {bar.name: (bar.limit, bar.at_least) for bar in bars}


def test_the_bars_are_spec_section_6s() -> None:
    # Each kind's figure in each of three repetitions.
    values = {
        "raw": [10.0, 1.0, 10.0],
        "raw-count": [20.0, 2.0, 20.0],
        "wsbus": [30.0, 3.0, 60.0],
        "wsbus-picows": [40.0, 4.0, 40.0],
        "socketio": [5.0, 0.5, 5.0],
    }
    cpu = {
        "raw": [4.0, 4.0, 4.0],
        "raw-count": [3.0, 1.0, 3.0],
        "wsbus": [5.0, 9.0, 5.0],
        "wsbus-picows": [2.0, 2.0, 2.0],
        "socketio": [9.0, 9.0, 9.0],
    }
    ws, pi = "wsbus (websockets edge)", "wsbus (picows edge)"
    assert _limits(_bars("fan-out unpaced", "to 9 clients", values, cpu)) == {
        f"fan-out unpaced to 9 clients, {ws} / websockets.broadcast": (1.0, True),
        f"fan-out unpaced to 9 clients, {ws} / python-socketio rooms": (3.0, True),
        f"fan-out unpaced to 9 clients, {pi} / websockets.broadcast": (1.5, True),
        f"fan-out unpaced to 9 clients, {pi} / python-socketio rooms": (3.0, True),
    }
    paced = _limits(_bars("fan-out paced", "to 9 clients", values, cpu))
    assert paced[f"fan-out paced to 9 clients, {ws} / websockets.broadcast"] == (3.0, True)
    assert paced[f"fan-out paced to 9 clients, {pi} / websockets.broadcast"] == (3.0, True)
    ingest = _bars("ingest", "from 9 clients", values, cpu)
    assert _limits(ingest) == {
        f"ingest from 9 clients, {ws}: server CPU per frame above raw websockets (raw-count)": (
            1.5,
            False,
        ),
        f"ingest from 9 clients, {ws} / python-socketio": (3.0, True),
        f"ingest from 9 clients, {pi} / raw websockets (raw-count)": (2.0, True),
    }
    # Against the anchor that only counts; medians of each repetition's own difference or
    # ratio (a slow spell, the second repetition, falls on every kind of it alike).
    assert [bar.measured for bar in ingest] == [2.0, 6.0, 2.0]
    echo = _bars("echo p50", "", values, cpu)
    assert {bar.limit for bar in echo} == {1.1} and not any(bar.at_least for bar in echo)
    memory = _bars("memory", "at 9", values, cpu)
    assert {bar.limit for bar in memory} == {1.2} and not any(bar.at_least for bar in memory)


def test_pyro_path_runs(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    out = _bench("pyro", "--messages", "300", "--json", str(results))
    assert "plain Pyro5 calls" in out and "wsbus over Pyro" in out
    assert "wsbus one-way" in out and "bare WebSocket" in out
    assert "server CPU per message plain Pyro5" in out
    saved = json.loads(results.read_text())
    assert set(saved["pyro"]["wsbus_cpu_us_per_message"]) == {"bus", "service", "gateway"}
    assert [bar["limit"] for bar in saved["bars"]] == [10.0, 2.0]
    assert "- Pyro path: wsbus" in render(saved)


def test_the_pyro_tracer_sees_every_point() -> None:
    # It patches wsbus internals to take its measurements: this keeps it in step with them.
    out = _run("bench.trace_pyro", "--rounds", "20")
    # A service's message to a client goes straight to the gateway (the one-hop path).
    for point in (
        "service: queued for the forwarder thread",
        "directly: the forwarder thread calls Pyro",
        "gateway (direct): Pyro message received",
        "gateway (direct): method called",
        "gateway (direct): on the event loop",
        "gateway (direct): written to the client's socket",
    ):
        assert point in out, out


def test_nats_path_runs(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    out = _bench("nats", "--messages", "300", "--json", str(results))
    assert "anchor (nats-py publish" in out and "wsbus over NATS" in out
    assert "one-way p50" in out and "CPU per message" in out
    saved = json.loads(results.read_text())
    assert [bar["limit"] for bar in saved["bars"]] == [100_000, 2.0]
    assert "- NATS path: wsbus" in render(saved)


@pytest.mark.parametrize("benchmark", ["fanout", "ingest"])
def test_one_benchmark_on_the_picows_edge_alone(benchmark: str, tmp_path: Path) -> None:
    if not picows_installed():
        pytest.skip("the picows extra is not installed")
    results = tmp_path / "results.json"
    _bench(
        benchmark,
        "--clients",
        "2",
        "--messages",
        "3",
        "--frames",
        "20",
        "--edge",
        "picows",
        "--kinds",
        "raw,wsbus-picows",
        "--json",
        str(results),
    )
    tables = json.loads(results.read_text())["tables"]
    assert all(set(table["values"]) == {"raw", "wsbus-picows"} for table in tables.values())


def test_every_server_runs_on_uvloop_when_asked(tmp_path: Path) -> None:
    if not HAS_UVLOOP:
        pytest.skip("uvloop is not installed (pip install 'wsbus[uvloop]')")
    results = tmp_path / "results.json"
    out = _bench(
        "echo",
        "--rounds",
        "5",
        "--edge",
        ",".join(EDGES),
        "--loop",
        "uvloop",
        "--json",
        str(results),
    )
    assert "servers on the uvloop event loop" in out
    saved = json.loads(results.read_text())
    assert saved["settings"]["loop"] == "uvloop"
    # As each server's own running loop said: wsbus's and the anchors' alike.
    kinds = ["raw", *OURS, "socketio"]
    assert saved["settings"]["server_loops"] == dict.fromkeys(kinds, "uvloop")
    assert all(set(table["values"]) == set(kinds) for table in saved["tables"].values())
    assert "servers on the uvloop event loop" in render(saved)


def test_asking_for_uvloop_without_it_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # Python's own way to block an import
    with pytest.raises(SystemExit, match=r"pip install 'wsbus\[uvloop\]'"):
        run_in_own_loop(main(["echo", "--loop", "uvloop", "--json", "/nonexistent/x.json"]))


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_the_profile_names_the_ingest_paths_top_frames(loop: str, tmp_path: Path) -> None:
    if loop == "uvloop" and not HAS_UVLOOP:
        pytest.skip("uvloop is not installed (pip install 'wsbus[uvloop]')")
    stats = tmp_path / "ingest.pstats"
    out = _run(
        "bench.profile",
        "ingest",
        "--clients",
        "2",
        "--frames",
        "300",
        "--top",
        "8",
        "--loop",
        loop,
        "--stats",
        str(stats),
    )
    assert f"2 clients x 150 frames (300 frames), edge websockets, loop {loop}" in out
    assert "300 frames counted" in out
    for heading in (
        "top 8 by self time",
        "top 8 by cumulative time",
        "wsbus's own functions, top 8 by cumulative time",
    ):
        assert heading in out
    ours = out.partition("wsbus's own functions")[2]
    assert "wsbus/gateway.py" in ours and " _read" in ours, out
    # The raw statistics, for other viewers.
    assert pstats.Stats(str(stats)).total_calls > 0  # type: ignore[attr-defined]


@pytest.mark.parametrize("tracing", ["off", "api", "sdk"])
def test_the_gateway_cost_harness_measures_both_ways_of_reading(tracing: str) -> None:
    out = _run(
        "bench.gateway_cost",
        *("--clients", "2", "--frames", "200", "--chunk", "50", "--repeat", "2"),
        *("--tracing", tracing),
    )
    assert f"2 clients x 200 frames, 50 a turn, tracing {tracing}" in out, out
    for name in ("together", "one at a time"):
        line = next(line for line in out.splitlines() if line.strip().startswith(name))
        median = line.strip()[len(name) :].split("[")[0]  # "<name>  <median>   [<runs>]"
        assert float(median) > 0, line


def test_both_loops_interleaved_compare_each_server_with_itself(tmp_path: Path) -> None:
    if not HAS_UVLOOP:
        pytest.skip("uvloop is not installed (pip install 'wsbus[uvloop]')")
    results = tmp_path / "results.json"
    out = _bench(
        "echo",
        "--kinds",
        "raw,wsbus",
        "--rounds",
        "5",
        "--loop",
        "asyncio,uvloop",
        "--json",
        str(results),
    )
    assert "wsbus~uvloop / wsbus:" in out
    saved = json.loads(results.read_text())
    assert saved["settings"]["server_loops"] == {
        "raw": "asyncio",
        "raw~uvloop": "uvloop",
        "wsbus": "asyncio",
        "wsbus~uvloop": "uvloop",
    }
    p50 = next(t for t in saved["tables"].values() if t["benchmark"] == "echo p50")
    # Against the anchors on the same loop only; each server on uvloop against itself.
    assert set(p50["ratios"]) == {"wsbus / raw", "wsbus~uvloop / raw~uvloop"}
    assert set(p50["loop_ratios"]) == {"raw~uvloop / raw", "wsbus~uvloop / wsbus"}
    assert all(each["server_cpu"] > 0 for each in p50["loop_ratios"].values())
    # The bars are the first loop's: one echo bar, wsbus against raw.
    assert [bar["name"] for bar in p50["bars"]] == [
        "echo round trip p50, wsbus (websockets edge) / raw websockets"
    ]
    markdown = render(saved)
    assert "wsbus, `websockets` edge on uvloop" in markdown
    assert "Each server on uvloop against itself on asyncio" in markdown


async def test_the_load_generators_clients_outlive_the_servers_keepalive() -> None:
    # A server that pings every 0.1 s and closes with 1011 a connection that has not
    # answered within 0.1 s: the client must still be there for the sentinel a second later.
    import asyncio

    from websockets.asyncio.server import ServerConnection, serve

    async def handler(ws: ServerConnection) -> None:
        await asyncio.sleep(1.0)
        await ws.send('{"type": "bench.done"}')
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0, ping_interval=0.1, ping_timeout=0.1) as server:
        port = server.sockets[0].getsockname()[1]
        client = await RawClient.open(port)
        try:
            async with asyncio.timeout(30):
                await client.until(b"bench.done")
        finally:
            client.close()


class _Writes:
    """What a client wrote (a stand-in for its stream writer: only ``write`` is used)."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.frames.append(data)


def test_a_ping_cut_by_a_read_is_answered_once() -> None:
    writes = _Writes()
    client = RawClient(None, writes)  # type: ignore[arg-type]
    item = b"\x81\x05hello"
    client.answer_pings(item + b"\x89\x04ab")
    assert writes.frames == []
    client.answer_pings(b"cd" + item + b"\x89\x04wsbp" + item)
    assert writes.frames == [frame(b"abcd", opcode=0xA), frame(b"wsbp", opcode=0xA)]
    client.answer_pings(item + b"\x89")
    client.answer_pings(b"\x04wxyz")
    assert writes.frames[2:] == [frame(b"wxyz", opcode=0xA)]
    # engine.io's heartbeat, for python-socketio only.
    client.answer_pings(b"\x81\x012")
    assert len(writes.frames) == 3
    client.socketio = True
    client.answer_pings(b"\x81\x012" + item)
    assert writes.frames[3:] == [frame(b"3")]
