"""The NATS path: service-to-client messages through NATS and the gateway, beside an anchor.

    python -m bench nats [--messages 20000] [--repeat 3]

- wsbus over NATS: a service process (``wsbus service bench.pyro_service:Bench --bus
  nats``) sends ``n`` messages to one WebSocket client through a nats-server and a gateway
  process (``wsbus serve --bus nats``); messages per second at the client, order checked by
  the last one's number; and the one-way latency of a message the service stamps with
  ``time.monotonic()`` just before ``ctx.send``, p50 and p99, one at a time.
- the anchor, the same hops with nothing of wsbus: a publisher process publishes with plain
  nats-py to a subject; a relay process subscribes to it and, in the subscription's
  callback, sends each message on a plain ``websockets`` connection to the same client.
  The client asks both the same way (a WebSocket message the relay or the gateway passes on
  over NATS to the publisher or the service).
- nats-py alone: the publisher's items counted by a subscription callback in this process,
  no WebSocket: the ceiling nats-py's receive path puts on any Python subscriber.

Each figure is the median of ``repeat`` runs, the two kinds interleaved. The processes' CPU
time per message (user + system, from /proc) is printed beside: robust to a busy machine in
a way a rate is not.

Run as ``python -m bench.nats relay PORT NATS_URL`` or ``python -m bench.nats publisher
NATS_URL``, it is one of the anchor's processes.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from wsbus_cli.supervisor import Child, free_port

from .__main__ import ROOT, Bar, RawClient, frame, process_cpu

CONTROL = "anchor.control"
"""The subject the relay passes the client's requests on to the publisher."""
ITEMS = "anchor.items"
"""The subject the publisher publishes to and the relay subscribes to."""
KINDS = ("anchor", "wsbus")


cpu_seconds = process_cpu
"""The CPU time process ``pid``'s threads have used so far, in seconds (``schedstat``)."""


# -- the anchor's processes ---------------------------------------------------------------


async def relay(port: int, url: str) -> None:
    """Pass each client's request to the publisher; send every item to the client.

    One subscription, one WebSocket connection: the callback awaits the send, as a bare
    relay would.
    """
    import nats
    from nats.aio.msg import Msg
    from websockets.asyncio.server import ServerConnection, serve

    nc = await nats.connect(url)

    async def handler(ws: ServerConnection) -> None:
        async def forward(msg: Msg) -> None:
            await ws.send(msg.data.decode())

        sub = await nc.subscribe(ITEMS, cb=forward, pending_msgs_limit=1_000_000)
        try:
            async for message in ws:
                await nc.publish(
                    CONTROL, message if isinstance(message, bytes) else message.encode()
                )
        finally:
            await sub.unsubscribe()

    async with serve(handler, "127.0.0.1", port, compression=None):
        print("ready", flush=True)
        await asyncio.Future()


async def publisher(url: str) -> None:
    """Publish what the client asks: ``{"n": N}`` N items, ``{"stamp": i}`` one stamped."""
    import json

    import nats
    from nats.aio.msg import Msg

    nc = await nats.connect(url)

    async def on_request(msg: Msg) -> None:
        request = json.loads(msg.data)
        if "stamp" in request:
            stamp = b'{"type":"bench.stamp","content":{"n":%d,"t":%r}}' % (
                request["stamp"],
                time.monotonic(),
            )
            await nc.publish(ITEMS, stamp)
            return
        for i in range(int(request["n"])):
            await nc.publish(ITEMS, b'{"type":"bench.item","content":{"i":%d}}' % i)
            if i % 256 == 255:
                await asyncio.sleep(0)  # as the wsbus bench service yields

    await nc.subscribe(CONTROL, cb=on_request)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Future()


class _Process:
    """A ``python -m bench.nats`` process of the anchor, ended by its own pid."""

    def __init__(self, args: Sequence[str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.nats", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if "ready" not in line:
            self.stop()
            raise RuntimeError(f"bench.nats {' '.join(args)} did not start: {line.strip()}")

    @property
    def pid(self) -> int:
        """The process id."""
        return self.process.pid

    def stop(self) -> None:
        """End it by its pid: SIGTERM, then SIGKILL after a bound."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self.process.stdout is not None:
            self.process.stdout.close()


# -- the deployments ----------------------------------------------------------------------


class _Deployment:
    """A nats-server, a sending process and a forwarding process, each its own process.

    ``kind`` ``wsbus``: the bench service and a gateway; ``anchor``: the publisher and the
    relay. ``pids`` names them for the CPU figures.
    """

    def __init__(self, kind: str, directory: Path) -> None:
        from wsbus_nats.servers import NatsServer

        self.kind = kind
        self.port = free_port()
        self.server = NatsServer(directory / "nats", monitor=False).start()
        self.stoppers: list[Any] = [self.server]
        try:
            url = self.server.url
            if kind == "wsbus":
                nats = ["--bus", "nats", "--nats-url", url]
                sender = Child(["service", "bench.pyro_service:Bench", *nats], cwd=ROOT)
                self.stoppers.append(sender)
                # The rate limit is a policy, not a speed: raised out of the way.
                gateway = Child(
                    ["serve", *nats, "--port", str(self.port), "--rate", "1000000"],
                    ready="listening",
                    cwd=ROOT,
                )
                self.stoppers.append(gateway)
                self.pids = {"service": sender.pid, "gateway": gateway.pid}
            else:
                publishing = _Process(["publisher", url])
                self.stoppers.append(publishing)
                relaying = _Process(["relay", str(self.port), url])
                self.stoppers.append(relaying)
                self.pids = {"service": publishing.pid, "gateway": relaying.pid}
            assert self.server.pid is not None
            self.pids["nats-server"] = self.server.pid
        except BaseException:
            self.stop()
            raise

    def cpu(self) -> dict[str, float]:
        """Each process's CPU time so far, in seconds."""
        return {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def stop(self) -> None:
        """End every process by its pid, the last started first."""
        for stopper in reversed(self.stoppers):
            stopper.stop()


async def _client(kind: str, port: int) -> RawClient:
    if kind == "wsbus":
        client = await RawClient.open(port, "/", "wsbus.v1.json")
        await client.until(b"wsbus.welcome")
        # The gateway routes bench.* once its directory lists the service: ask until so.
        for attempt in range(100):
            client.writer.write(frame(b'{"type":"bench.stamp","content":-1,"id":"w%d"}' % attempt))
            answer = await _read_some(client, (b'"n":-1,', b"wsbus.error"))
            if b'"n":-1,' in answer:
                return client
            await asyncio.sleep(0.1)
        raise RuntimeError("the gateway never routed to the bench service")
    return await RawClient.open(port)


async def _read_some(client: RawClient, markers: Sequence[bytes]) -> bytes:
    data = b""
    while not any(marker in data for marker in markers):
        chunk = await client.reader.read(1 << 16)
        if not chunk:
            raise RuntimeError("connection closed")
        data += chunk
    return data


async def one_run(kind: str, messages: int, rounds: int) -> dict[str, Any]:
    """Messages/s, one-way p50/p99 (ms) and CPU per message (us) of one deployment."""
    with tempfile.TemporaryDirectory(prefix="wsbus-bench-nats-") as directory:
        deployment = await asyncio.to_thread(_Deployment, kind, Path(directory))
        try:
            client = await asyncio.wait_for(_client(kind, deployment.port), 60)
            marker = b'"i":%d}' % (messages - 1)
            waiting = asyncio.create_task(client.until(marker))
            before = {**deployment.cpu(), "client": time.process_time()}
            started = time.perf_counter()
            if kind == "wsbus":
                client.writer.write(frame(b'{"type":"bench.send","content":{"n":%d}}' % messages))
            else:
                client.writer.write(frame(b'{"n":%d}' % messages))
            finished = await asyncio.wait_for(waiting, 300)
            after = {**deployment.cpu(), "client": time.process_time()}
            rate = messages / (finished - started)
            cpu = {name: (after[name] - before[name]) / messages * 1e6 for name in after}
            one_way = []
            for i in range(rounds):
                if kind == "wsbus":
                    client.writer.write(frame(b'{"type":"bench.stamp","content":%d}' % i))
                else:
                    client.writer.write(frame(b'{"stamp":%d}' % i))
                one_way.append(await asyncio.wait_for(client.stamped(b'"n":%d,' % i), 60))
            client.close()
        finally:
            await asyncio.to_thread(deployment.stop)
    one_way.sort()
    return {
        "msgs_per_s": rate,
        "one_way_p50_ms": statistics.median(one_way) * 1000,
        "one_way_p99_ms": one_way[int(len(one_way) * 0.99)] * 1000,
        "cpu_us_per_message": cpu,
    }


async def nats_alone(messages: int) -> tuple[float, float]:
    """nats-py alone: the publisher process's items counted by a subscription callback here.

    Returns messages/s and this process's CPU per message (us): the ceiling nats-py's own
    receive path puts on any subscriber in Python, wsbus's gateway and the relay alike.
    """
    import json

    import nats
    from nats.aio.msg import Msg

    from wsbus_nats.servers import NatsServer

    with tempfile.TemporaryDirectory(prefix="wsbus-bench-nats-") as directory:
        server = await asyncio.to_thread(NatsServer(Path(directory), monitor=False).start)
        publishing: _Process | None = None
        try:
            publishing = await asyncio.to_thread(_Process, ["publisher", server.url])
            nc = await nats.connect(server.url)
            count = 0
            done = asyncio.Event()

            async def counted(msg: Msg) -> None:
                nonlocal count
                count += 1
                if count == messages:
                    done.set()

            await nc.subscribe(ITEMS, cb=counted, pending_msgs_limit=10 * messages)
            await nc.flush()
            cpu = time.process_time()
            started = time.perf_counter()
            await nc.publish(CONTROL, json.dumps({"n": messages}).encode())
            await asyncio.wait_for(done.wait(), 300)
            elapsed = time.perf_counter() - started
            cpu = time.process_time() - cpu
            await nc.close()
        finally:
            if publishing is not None:
                await asyncio.to_thread(publishing.stop)
            await asyncio.to_thread(server.stop)
    return messages / elapsed, cpu / messages * 1e6


async def run(messages: int, repeat: int) -> dict[str, Any]:
    """Run the NATS comparison, print it, and return the figures."""
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
    alone = []
    for _ in range(repeat):
        for kind in KINDS:
            runs[kind].append(await one_run(kind, messages, 300))
        alone.append(await nats_alone(messages))
    figures: dict[str, Any] = {}
    for kind, results in runs.items():
        figures[kind] = {
            key: statistics.median(r[key] for r in results)
            for key in ("msgs_per_s", "one_way_p50_ms", "one_way_p99_ms")
        }
        figures[kind]["cpu_us_per_message"] = {
            name: statistics.median(r["cpu_us_per_message"][name] for r in results)
            for name in results[0]["cpu_us_per_message"]
        }
    figures["nats_alone"] = {
        "msgs_per_s": statistics.median(a[0] for a in alone),
        "cpu_us_per_message": statistics.median(a[1] for a in alone),
    }
    wsbus, anchor = figures["wsbus"], figures["anchor"]
    alone_figures = figures["nats_alone"]
    rows = [
        (
            "nats-py alone (publisher -> a callback that counts)",
            f"{alone_figures['msgs_per_s']:>10,.0f} msgs/s (subscriber CPU "
            f"{alone_figures['cpu_us_per_message']:.2f} us per message)",
        ),
        (
            "anchor (nats-py publisher -> callback -> websockets send)",
            f"{anchor['msgs_per_s']:>10,.0f} msgs/s",
        ),
        (
            "wsbus over NATS (service -> NATS -> gateway -> client)",
            f"{wsbus['msgs_per_s']:>10,.0f} msgs/s = "
            f"{wsbus['msgs_per_s'] / anchor['msgs_per_s']:.2f}x the anchor (aim: 100,000)",
        ),
    ]
    print(f"\nNATS path: a service process sends {messages} messages to one client, in order")
    for label, value in rows:
        print(f"  {label:<58} {value}")
    print(
        f"  one-way p50  anchor {anchor['one_way_p50_ms']:.3f} ms, wsbus "
        f"{wsbus['one_way_p50_ms']:.3f} ms = "
        f"{wsbus['one_way_p50_ms'] / anchor['one_way_p50_ms']:.2f}x (aim: within 2x)"
    )
    print(
        f"  one-way p99  anchor {anchor['one_way_p99_ms']:.3f} ms, wsbus "
        f"{wsbus['one_way_p99_ms']:.3f} ms = "
        f"{wsbus['one_way_p99_ms'] / anchor['one_way_p99_ms']:.2f}x"
    )
    names = {
        "gateway": "gateway/relay",
        "service": "service/publisher",
        "client": "client (this process)",
    }
    for name in ("gateway", "service", "nats-server", "client"):
        ours = wsbus["cpu_us_per_message"][name]
        theirs = anchor["cpu_us_per_message"][name]
        ratio = f" = {ours / theirs:.2f}x" if theirs else ""
        print(
            f"  CPU per message, {names.get(name, name):<21} wsbus {ours:6.2f} us, "
            f"anchor {theirs:6.2f} us{ratio}"
        )
    # Every process shares this machine's cores: the sum bounds the rate.
    total = {kind: sum(figures[kind]["cpu_us_per_message"].values()) for kind in KINDS}
    cores = os.cpu_count() or 1
    print(
        f"  CPU per message, all processes         wsbus {total['wsbus']:6.2f} us, anchor "
        f"{total['anchor']:6.2f} us (on {cores} cores: at most "
        f"{cores * 1e6 / total['wsbus']:,.0f} and {cores * 1e6 / total['anchor']:,.0f} msgs/s)"
    )
    return figures


def bars(figures: dict[str, Any]) -> list[Bar]:
    """SPEC section 6's bars for the NATS path, as ``run`` measured them."""
    wsbus, anchor = figures["wsbus"], figures["anchor"]
    return [
        Bar(
            "NATS path, wsbus messages/s service to client",
            wsbus["msgs_per_s"],
            100_000,
            True,
            "msgs/s",
        ),
        Bar(
            "NATS one-way p50, wsbus / (nats-py publish-to-subscribe + a bare WebSocket send)",
            wsbus["one_way_p50_ms"] / anchor["one_way_p50_ms"],
            2.0,
            False,
            "x",
        ),
    ]


def main(argv: list[str] | None = None) -> None:
    """Run one of the anchor's processes (``relay PORT URL`` or ``publisher URL``)."""
    args = sys.argv[1:] if argv is None else argv
    if args[0] == "relay":
        asyncio.run(relay(int(args[1]), args[2]))
    elif args[0] == "publisher":
        asyncio.run(publisher(args[1]))
    else:
        raise SystemExit("usage: python -m bench.nats relay PORT NATS_URL | publisher NATS_URL")


if __name__ == "__main__":
    import contextlib

    with contextlib.suppress(KeyboardInterrupt):
        main()
