"""The gateway's own CPU per client frame, without a socket: ``python -m bench.gateway_cost``.

    python -m bench.gateway_cost [--clients 10] [--frames 10000] [--chunk 100] [--repeat 6]
                                 [--tracing off|api|sdk]

A gateway runs in this process as ``python -m bench``'s wsbus server runs it (the in-memory
bus with the service that counts, the default settings but the raised rate limit). Its
connections are in-process stand-ins that hand it ``--chunk`` frames per client per turn
of the event loop, as reads from a socket would: what is measured is wsbus's own work per
frame, from the gateway's reader to the service's handler, with no edge and no load
generator sharing the process. The figure is this thread's CPU time per frame (not the
wall clock), the median of ``--repeat`` runs; each run is made twice, the reader taking
the frames of a turn together (``ReceivesBatch``, as both edges do) and one at a time, in
alternating order. docs/performance.md ("Why the ingest bar is not met") uses it.

``--tracing`` turns tracing on in the gateway and the service (docs/tracing.md): ``api``
with OpenTelemetry's API alone (no SDK: every span is a no-op one, what wsbus itself adds),
``sdk`` with the SDK recording every span and handing it to an exporter that drops it (what
a traced deployment pays before its exporter's own work). Off, OpenTelemetry is not imported.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import msgspec

from bench.servers import _bus_options, _gateway_config, bench_service
from wsbus import Codec, ConnectionClosed, Gateway, MemoryBus
from wsbus.hooks import HandshakeRequest

FRAME = '{"type":"bench.ingest","content":{"i":1,"text":"the quick brown fox"}}'
"""The frame every client sends: the bench's ingest frame."""


class OneAtATime:
    """A connection that hands the gateway one frame per ``receive``."""

    def __init__(self) -> None:
        self.frames: deque[str] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.closed: ConnectionClosed | None = None
        self._request = HandshakeRequest(remote="bench")

    @property
    def codec(self) -> Codec:
        """JSON."""
        return Codec.JSON

    @property
    def request(self) -> HandshakeRequest:
        """A handshake with nothing in it."""
        return self._request

    async def receive(self) -> str | bytes:
        """The next frame, once there is one."""
        frames = self.frames
        while not frames:
            if self.closed is not None:
                raise self.closed
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        return frames.popleft()

    async def send(self, data: bytes) -> None:
        """Take a frame for the client (dropped: nobody reads)."""

    def send_nowait(self, data: bytes) -> bool:
        """Take a frame for the client at once (dropped: nobody reads)."""
        return True

    async def close(self, code: int, reason: str = "") -> None:
        """End the connection."""
        self.shut(code)

    def shut(self, code: int) -> None:
        """End the connection: the reader's next receive raises ConnectionClosed."""
        self.closed = ConnectionClosed(code, "")
        self._wake()

    def feed(self, items: Sequence[str]) -> None:
        """Make ``items`` readable, as one read from a socket would."""
        self.frames.extend(items)
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


class Together(OneAtATime):
    """A connection that hands the gateway every frame it holds at once (ReceivesBatch)."""

    async def receive_batch(self) -> list[str | bytes]:
        """Every frame held, or the next one once there is one."""
        frames = self.frames
        if not frames:
            return [await self.receive()]
        batch: list[str | bytes] = list(frames)
        frames.clear()
        return batch


async def one_run(
    gateway: Gateway, service: Any, kind: type[OneAtATime], clients: int, frames: int, chunk: int
) -> float:
    """This thread's CPU per frame (us) for ``clients`` x ``frames`` frames."""
    conns = [kind() for _ in range(clients)]
    tasks = [asyncio.create_task(gateway.serve(conn)) for conn in conns]
    await asyncio.sleep(0.05)
    service.count = 0
    service.target = clients * frames
    service.reached.clear()
    started = time.thread_time()
    left = frames
    while left:
        k = min(chunk, left)
        for conn in conns:
            conn.feed([FRAME] * k)
        left -= k
        await asyncio.sleep(0)
    await asyncio.wait_for(service.reached.wait(), 300)
    spent = time.thread_time() - started
    for conn in conns:
        conn.shut(1000)
    await asyncio.gather(*tasks, return_exceptions=True)
    return spent / (clients * frames) * 1e6


def _install_sdk() -> None:
    """Record every span with OpenTelemetry's SDK, and drop it at export."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        SimpleSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class Drop(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(Drop()))
    trace.set_tracer_provider(provider)


async def measure(
    clients: int, frames: int, chunk: int, repeat: int, tracing: str = "off"
) -> dict[str, list[float]]:
    """Run both kinds of connection ``repeat`` times each, alternating which goes first."""
    service = bench_service()
    config = _gateway_config()
    if tracing != "off":
        if tracing == "sdk":
            _install_sdk()
        service.tracing = True
        config = msgspec.structs.replace(config, tracing=True)
    gateway = Gateway(MemoryBus([service], **_bus_options()), config=config, entry_points=False)
    await gateway.start()
    runs: dict[str, list[float]] = {"together": [], "one at a time": []}
    kinds: list[tuple[str, type[OneAtATime]]] = [
        ("together", Together),
        ("one at a time", OneAtATime),
    ]
    try:
        for index in range(repeat):
            for name, kind in kinds if index % 2 == 0 else kinds[::-1]:
                runs[name].append(await one_run(gateway, service, kind, clients, frames, chunk))
    finally:
        await gateway.close()
    return runs


def main(argv: Sequence[str] | None = None) -> None:
    """Print the gateway's own CPU per frame, with each kind of connection."""
    parser = argparse.ArgumentParser(prog="python -m bench.gateway_cost", description=__doc__)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--frames", type=int, default=10000, help="frames per client")
    parser.add_argument("--chunk", type=int, default=100, help="frames per client per turn")
    parser.add_argument("--repeat", type=int, default=6)
    parser.add_argument(
        "--tracing",
        choices=("off", "api", "sdk"),
        default="off",
        help="tracing in the gateway and the service: off, on with the API alone, on with the SDK",
    )
    args = parser.parse_args(argv)
    runs = asyncio.run(measure(args.clients, args.frames, args.chunk, args.repeat, args.tracing))
    print(
        f"{args.clients} clients x {args.frames} frames, {args.chunk} a turn, tracing "
        f"{args.tracing}: the gateway's CPU per frame (us), median and runs"
    )
    for name, values in runs.items():
        shown = ", ".join(f"{v:.2f}" for v in sorted(values))
        print(f"  {name:14} {statistics.median(values):.2f}   [{shown}]")


if __name__ == "__main__":
    main()
