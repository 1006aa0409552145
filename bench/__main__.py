"""Benchmarks: wsbus side by side with the anchors, in one run, with ratios.

    python -m bench fanout [--clients 1000] [--messages 100]
    python -m bench ingest [--clients 50] [--frames 2000]
    python -m bench memory [--clients 1000]
    python -m bench pyro [--messages 20000]
    python -m bench nats [--messages 20000]
    python -m bench all

Each server runs in its own process (``bench/servers.py``); this process is the load
generator. Its clients are minimal WebSocket clients (hand-written handshake, pre-built
masked frames, byte counting with a sentinel) so that the client side costs little and the
numbers measure the servers. Traffic stays on 127.0.0.1. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from wsbus_cli.supervisor import free_port

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("raw", "wsbus", "socketio")
BEFORE: dict[str, Path] = {}
"""With ``--before PATH``: {"before": PATH}, the checkout the kind ``wsbus@before`` runs."""
LAGS: dict[str, list[float]] = {}
CPU: dict[str, list[float]] = {}
"""Server CPU time (user + system) per message, in microseconds, of each run under way."""
"""Worst event-loop lag (ms) each server saw in each run of the benchmark under way."""


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


class RawClient:
    """A WebSocket connection that reads bytes without parsing frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

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


# What each kind needs: the path, the subprotocol, messages encoded for its protocol.
def _path(kind: str) -> str:
    kind = kind.partition("@")[0]
    return "/socket.io/?EIO=4&transport=websocket" if kind == "socketio" else "/"


def _message(kind: str, type: str, content: Any) -> bytes:
    kind = kind.partition("@")[0]
    if kind == "socketio":
        return b"42" + json.dumps([type, content]).encode()
    return json.dumps({"type": type, "content": content}).encode()


async def _connect(kind: str, port: int) -> RawClient:
    kind = kind.partition("@")[0]
    client = await RawClient.open(port, _path(kind), "wsbus.v1.json" if kind == "wsbus" else None)
    if kind == "socketio":
        await client.until(b"0{")  # engine.io open packet
        client.writer.write(frame(b"40"))
        await client.until(b"40{")  # joined the default namespace
    elif kind == "wsbus":
        await client.until(b"wsbus.welcome")
    return client


# -- servers ------------------------------------------------------------------------------


class Server:
    """A bench server in its own process."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.port = free_port()
        # "wsbus@before" is the wsbus server of another checkout (--before): run from its
        # folder, ``python -m`` imports that checkout's wsbus and bench.
        server, _, where = kind.partition("@")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.servers", server, str(self.port)],
            cwd=BEFORE.get(where, ROOT),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.process.stdout is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if "ready" in line:
                return
            if not line and self.process.poll() is not None:
                break
        self.stop()
        raise RuntimeError(f"bench server {kind} did not start")

    def cpu(self) -> float:
        """The server process's CPU time so far (user + system), in seconds."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

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


async def fanout(kind: str, clients: int, messages: int) -> float:
    """Deliveries per second from one broadcast loop to ``clients`` connections."""
    server = Server(kind)
    try:
        conns = [await _connect(kind, server.port) for _ in range(clients)]
        # The last item carries the sentinel: every client has everything once it is seen.
        marker = (b'"i": %d,' if kind == "raw" else b'"i":%d,') % (messages - 1)
        waiting = [asyncio.create_task(c.until(marker)) for c in conns]
        await asyncio.sleep(0.2)
        cpu = server.cpu()
        started = time.perf_counter()
        conns[0].writer.write(frame(_message(kind, "bench.fanout", {"n": messages})))
        finished = await asyncio.wait_for(asyncio.gather(*waiting), 300)
        elapsed = max(finished) - started
        CPU.setdefault(kind, []).append((server.cpu() - cpu) / (clients * messages) * 1e6)
        for c in conns:
            c.close()
        return clients * messages / elapsed
    finally:
        server.stop()


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

        async def send(c: RawClient) -> None:
            left = frames
            while left:
                chunk = min(100, left)
                c.writer.write(payload * chunk)
                await c.writer.drain()
                left -= chunk

        await asyncio.gather(*(send(c) for c in conns))
        finished = await asyncio.wait_for(asyncio.gather(*done), 300)
        elapsed = min(finished) - started
        CPU.setdefault(kind, []).append((server.cpu() - cpu) / target * 1e6)
        for c in conns:
            c.close()
        return target / elapsed
    finally:
        server.stop()


async def echo_latency(kind: str, rounds: int) -> tuple[float, float]:
    """Median and 99th-percentile round trip (ms) of one client's echo, one at a time."""
    server = Server(kind)
    try:
        client = await _connect(kind, server.port)
        times = []
        for i in range(rounds):
            request = frame(_message(kind, "bench.echo", {"n": i}))
            marker = (b'"n": %d}' if kind == "raw" else b'"n":%d}') % i
            started = time.perf_counter()
            client.writer.write(request)
            await client.until(marker)
            times.append(time.perf_counter() - started)
        client.close()
        times.sort()
        return statistics.median(times) * 1000, times[int(len(times) * 0.99)] * 1000
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


RESULTS: dict[str, Any] = {}


def _table(title: str, unit: str, results: dict[str, float], higher_is_better: bool) -> None:
    """Print one benchmark's figures with their ratios, and each server's worst loop lag."""
    lags = {kind: max(values) for kind, values in LAGS.items()}
    LAGS.clear()
    cpu = {kind: statistics.median(values) for kind, values in CPU.items()}
    CPU.clear()
    RESULTS[title] = {
        "unit": unit,
        "values": results,
        "worst_loop_lag_ms": lags,
        "server_cpu_us_per_message": cpu,
    }
    base = results.get("wsbus")
    print(f"\n{title} ({unit})")
    for kind, value in results.items():
        ratio = ""
        if base and kind != "wsbus" and value:
            ratio = f"   wsbus / {kind} = {base / value:.2f}x"
        print(f"  {kind:<12} {value:>14,.{3 if unit == 'ms' else 1}f}{ratio}")
    if not higher_is_better:
        print("  (lower is better)")
    if cpu:
        # CPU per message is robust to a busy machine in a way a rate is not.
        each = ", ".join(f"{kind} {us:.2f}" for kind, us in cpu.items())
        print(f"  server CPU per message (us, median): {each}")
    if lags:
        worst = ", ".join(f"{kind} {lag:.0f} ms" for kind, lag in lags.items())
        print(f"  worst event-loop lag of each server: {worst}")


Runner = Callable[[str], Coroutine[Any, Any, float]]


async def _medians(runner: Runner, kinds: list[str], repeat: int) -> dict[str, float]:
    """Run every kind ``repeat`` times, interleaved (a, b, a, b...), and return medians.

    Interleaving spreads a slow spell of a shared machine over every kind alike.
    """
    values: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(repeat):
        for k in kinds:
            values[k].append(await runner(k))
    return {k: statistics.median(v) for k, v in values.items()}


def _sizes(text: str | None, default: str) -> list[int]:
    return [int(n) for n in (text or default).split(",")]


async def main(argv: list[str] | None = None) -> None:
    """Run the benchmarks named on the command line."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "which",
        nargs="+",
        choices=("fanout", "ingest", "echo", "memory", "pyro", "nats", "all"),
        help="benchmarks to run, in this order",
    )
    parser.add_argument("--clients", default=None, help="client counts, comma-separated")
    parser.add_argument("--messages", type=int, default=None)
    parser.add_argument("--frames", type=int, default=100_000, help="ingest: frames in all")
    parser.add_argument("--repeat", type=int, default=3, help="runs per server; the median")
    parser.add_argument("--kinds", default=",".join(KINDS), help="servers to compare")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument(
        "--before",
        default=None,
        metavar="PATH",
        help="also run the wsbus server of the checkout at PATH (kind wsbus@before), "
        "interleaved with this one's: a before/after comparison in one run",
    )
    args = parser.parse_args(argv)
    kinds = args.kinds.split(",")
    if args.before:
        BEFORE["before"] = Path(args.before)
        kinds.append("wsbus@before")
    which = set(args.which)
    if "all" in which:
        which = {"fanout", "ingest", "echo", "memory", "pyro", "nats"}
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores; median of {args.repeat}")
    if "fanout" in which:
        m = args.messages or 100
        for n in _sizes(args.clients, "1000"):
            results = await _medians(
                functools.partial(fanout, clients=n, messages=m), kinds, args.repeat
            )
            _table(f"fan-out: {m} messages to {n} clients", "deliveries/s", results, True)
    if "ingest" in which:
        for n in _sizes(args.clients, "10,100,1000"):
            each = max(1, args.frames // n)
            results = await _medians(
                functools.partial(ingest, clients=n, frames=each), kinds, args.repeat
            )
            _table(f"ingest: {n} clients x {each} frames", "frames/s", results, True)
    if "echo" in which:
        latencies = {k: await echo_latency(k, 1000) for k in kinds}
        _table(
            "echo round trip, one client, p50", "ms", {k: v[0] for k, v in latencies.items()}, False
        )
        _table(
            "echo round trip, one client, p99", "ms", {k: v[1] for k, v in latencies.items()}, False
        )
    if "memory" in which:
        for n in _sizes(args.clients, "1000,5000"):
            results = await _medians(functools.partial(memory, clients=n), kinds, args.repeat)
            _table(f"memory: {n} idle connections", "KiB per connection", results, False)
    if "pyro" in which:
        from bench import pyro

        RESULTS["pyro"] = await pyro.run(args.messages or 20000, args.repeat)
    if "nats" in which:
        from bench import nats

        RESULTS["nats"] = await nats.run(args.messages or 20000, args.repeat)
    if args.json:
        text = json.dumps(RESULTS, indent=2, default=str)
        await asyncio.to_thread(Path(args.json).write_text, text)
        print(f"\nresults written to {args.json}")


if __name__ == "__main__":
    asyncio.run(main())
