"""The Pyro path: service-to-client messages through the bus, beside plain Pyro5 calls.

- plain Pyro5: synchronous calls of a one-argument method on a Pyro object in another
  process (what a service would do without batching), calls per second and the median
  round trip;
- a bare WebSocket echo round trip on the same machine;
- wsbus: a service process sends ``n`` messages to one client, straight to the gateway
  (another process) that owns the client's connection (the one-hop path: the message bus
  keeps routing by type and the directory of gateways); messages per second, order
  checked; and the median round trip of an echo request from a client to a service
  process (through the bus) and back (straight to the gateway).
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import time
from typing import Any

from wsbus_cli.supervisor import Child, free_port

from .__main__ import ROOT, Bar, RawClient, Server, frame, process_cpu


def _plain_server(port: int) -> subprocess.Popen[str]:
    code = (
        "import Pyro5.api as p\n"
        "from wsbus_pyro.config import PyroConfig, apply\n"
        "apply(PyroConfig())\n"
        "@p.expose\n"
        "class Sink:\n"
        "    def deliver(self, blob):\n"
        "        return None\n"
        f"d = p.Daemon(host='127.0.0.1', port={port})\n"
        "d.register(Sink, 'sink')\n"
        "print('ready', flush=True)\n"
        "d.requestLoop()\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    process.stdout.readline()
    return process


def plain_pyro(calls: int) -> tuple[float, float, float, float]:
    """Return plain synchronous Pyro5 calls' rate (calls/s), median round trip (ms) and CPU.

    The round trip is given twice: back to back, and one call at a time after a pause
    (the way the one-way samples below are taken, each on an otherwise idle system). The
    CPU is the server process's, per call, in microseconds.
    """
    import Pyro5.api

    port = free_port()
    server = _plain_server(port)
    try:
        payload = b"x" * 100
        with Pyro5.api.Proxy(f"PYRO:sink@127.0.0.1:{port}") as proxy:
            proxy.deliver(payload)
            times = []
            cpu = process_cpu(server.pid)
            started = time.perf_counter()
            for _ in range(calls):
                t0 = time.perf_counter()
                proxy.deliver(payload)
                times.append(time.perf_counter() - t0)
            elapsed = time.perf_counter() - started
            cpu = (process_cpu(server.pid) - cpu) / calls * 1e6
            paced = []
            for _ in range(300):
                time.sleep(0.001)
                t0 = time.perf_counter()
                proxy.deliver(payload)
                paced.append(time.perf_counter() - t0)
        return (
            calls / elapsed,
            statistics.median(times) * 1000,
            statistics.median(paced) * 1000,
            cpu,
        )
    finally:
        server.terminate()
        server.wait(10)
        if server.stdout is not None:
            server.stdout.close()


async def bare_websocket_rtt(rounds: int) -> float:
    """Median round trip, in ms, of a message to a websockets echo server."""
    from websockets.asyncio.client import connect
    from websockets.asyncio.server import ServerConnection, serve

    async def echo(ws: ServerConnection) -> None:
        async for message in ws:
            await ws.send(message)

    async with serve(echo, "127.0.0.1", 0, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}/", compression=None) as ws:
            times = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                await ws.send('{"type":"echo","content":1}')
                await ws.recv()
                times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


async def bare_websocket_send(rounds: int) -> float:
    """Median one-way latency, in ms, of a message a raw websockets server sends.

    The server (``bench/servers.py raw``, its own process) stamps each message with
    ``time.monotonic()`` just before ``send``; this process reads it and subtracts.
    """
    server = Server("raw")
    try:
        client = await RawClient.open(server.port)
        times = []
        for i in range(rounds):
            client.writer.write(frame(b'{"type":"bench.stamp","content":%d}' % i))
            times.append(await client.stamped(b'"n": %d,' % i))
        client.close()
        return statistics.median(times) * 1000
    finally:
        server.stop()


class _Deployment:
    """A name server, the bus, the bench service and a gateway, each its own process."""

    def __init__(self) -> None:
        self.ns_port = free_port()
        self.ws_port = free_port()
        args = ["--ns-port", str(self.ns_port)]
        self.children = [Child(["nameserver", *args]), Child(["bus", *args])]
        self.children.append(Child(["service", "bench.pyro_service:Bench", *args]))
        self.children.append(
            Child(
                [
                    "serve",
                    "--bus",
                    "pyro",
                    "--port",
                    str(self.ws_port),
                    # The rate limit is a policy, not a speed: raised out of the way.
                    "--rate",
                    "1000000",
                    *args,
                ],
                ready="listening",
            )
        )

    def cpu(self) -> dict[str, float]:
        """The CPU time so far (s) of the bus, the service and the gateway."""
        names = ("bus", "service", "gateway")
        return {name: process_cpu(c.pid) for name, c in zip(names, self.children[1:], strict=True)}

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()


async def wsbus_pyro(
    messages: int, rounds: int
) -> tuple[float, float, float, float, float, dict[str, float]]:
    """Return service-to-client messages/s, one-way and echo round trip p50 and p99 (ms).

    One-way: the client asks, the service process stamps a message with
    ``time.monotonic()`` just before ``ctx.send``, and the client subtracts on arrival;
    one at a time, so no message waits behind another. Last, the CPU per message (us) of
    the bus, the service and the gateway while the messages flowed.
    """
    deployment = await asyncio.to_thread(_Deployment)
    try:
        client = await RawClient.open(deployment.ws_port, "/", "wsbus.v1.json")
        await client.until(b"wsbus.welcome")
        marker = b'"i":%d}' % (messages - 1)
        waiting = asyncio.create_task(client.until(marker))
        cpu = deployment.cpu()
        started = time.perf_counter()
        client.writer.write(frame(b'{"type":"bench.send","content":{"n":%d}}' % messages))
        finished = await asyncio.wait_for(waiting, 300)
        rate = messages / (finished - started)
        cpu = {k: (v - cpu[k]) / messages * 1e6 for k, v in deployment.cpu().items()}
        times = []
        for i in range(rounds):
            request = b'{"type":"bench.echo","content":%d,"id":"r%d"}' % (i, i)
            t0 = time.perf_counter()
            client.writer.write(frame(request))
            await client.until(b'"reply_to":"r%d"' % i)
            times.append(time.perf_counter() - t0)
        one_way = []
        for i in range(rounds):
            client.writer.write(frame(b'{"type":"bench.stamp","content":%d}' % i))
            one_way.append(await client.stamped(b'"n":%d,' % i))
        client.close()
        return rate, *_p50_p99(one_way), *_p50_p99(times), cpu
    finally:
        await asyncio.to_thread(deployment.stop)


def _p50_p99(times: list[float]) -> tuple[float, float]:
    times = sorted(times)
    return statistics.median(times) * 1000, times[int(len(times) * 0.99)] * 1000


async def run(messages: int, repeat: int) -> dict[str, Any]:
    """Run the Pyro comparison, print it, and return the figures."""
    plain = [await asyncio.to_thread(plain_pyro, min(messages, 5000)) for _ in range(repeat)]
    calls_per_s = statistics.median(p[0] for p in plain)
    pyro_rtt = statistics.median(p[1] for p in plain)
    pyro_paced = statistics.median(p[2] for p in plain)
    plain_cpu = statistics.median(p[3] for p in plain)
    ws_rtt = await bare_websocket_rtt(500)
    ws_send = await bare_websocket_send(500)
    runs = [await wsbus_pyro(messages, 300) for _ in range(repeat)]
    figures = [r[:5] for r in runs]
    rate, way50, way99, p50, p99 = (statistics.median(f[i] for f in figures) for i in range(5))
    cpu = {name: statistics.median(r[5][name] for r in runs) for name in runs[0][5]}
    bare = pyro_paced + ws_send
    print(f"\nPyro path: a service process sends {messages} messages to one client, in order")
    print(
        f"  plain Pyro5 calls      {calls_per_s:>12,.0f} calls/s  (round trip {pyro_rtt:.3f} ms "
        f"back to back, {pyro_paced:.3f} ms one at a time)"
    )
    print(
        f"  wsbus over Pyro        {rate:>12,.0f} msgs/s   = {rate / calls_per_s:.1f}x plain calls"
    )
    print(
        f"  server CPU per message plain Pyro5 {plain_cpu:.2f} us; wsbus: "
        + ", ".join(f"{name} {us:.2f} us" for name, us in cpu.items())
    )
    print(
        f"  bare WebSocket         send one-way {ws_send:.3f} ms, echo round trip {ws_rtt:.3f} ms"
    )
    print(
        f"  wsbus one-way          p50 {way50:.3f} ms, p99 {way99:.3f} ms "
        f"(service -> gateway -> client, one Pyro hop) = {way50 / bare:.2f}x "
        f"(a bare Pyro call one at a time + a bare WebSocket send, {bare:.3f} ms)"
    )
    print(
        f"  wsbus echo round trip  p50 {p50:.3f} ms, p99 {p99:.3f} ms "
        f"(client -> gateway -> bus -> service -> gateway) = "
        f"{p50 / (pyro_rtt + ws_rtt):.2f}x (bare Pyro call + bare WebSocket round trip)"
    )
    return {
        "plain_calls_per_s": calls_per_s,
        "plain_server_cpu_us_per_call": plain_cpu,
        "wsbus_cpu_us_per_message": cpu,
        "plain_rtt_ms": pyro_rtt,
        "plain_rtt_one_at_a_time_ms": pyro_paced,
        "websocket_rtt_ms": ws_rtt,
        "websocket_send_ms": ws_send,
        "wsbus_one_way_p50_ms": way50,
        "wsbus_one_way_p99_ms": way99,
        "wsbus_msgs_per_s": rate,
        "wsbus_rtt_p50_ms": p50,
        "wsbus_rtt_p99_ms": p99,
    }


def bars(figures: dict[str, Any]) -> list[Bar]:
    """SPEC section 6's bars for the Pyro path, as ``run`` measured them."""
    bare = figures["plain_rtt_one_at_a_time_ms"] + figures["websocket_send_ms"]
    return [
        Bar(
            "Pyro path, wsbus messages/s / plain synchronous Pyro5 calls",
            figures["wsbus_msgs_per_s"] / figures["plain_calls_per_s"],
            10.0,
            True,
            "x",
        ),
        Bar(
            "Pyro one-way p50, wsbus / (a bare Pyro call + a bare WebSocket send)",
            figures["wsbus_one_way_p50_ms"] / bare,
            2.0,
            False,
            "x",
        ),
    ]
