"""A wsbus gateway on a WebSocket port, in its own process, for the edge attack benchmark.

    python bench/edge_server.py [--nofile N] [--close-timeout S] [--backlog N]

It imports ``wsbus`` and ``wsbus_websockets`` from wherever ``PYTHONPATH`` points, so the
same attacks run against an older checkout (``PYTHONPATH=/work/before``); it uses only
what every version has. It prints ``{"port": P}`` on its first line, then answers lines
on stdin:

- ``stats``: one JSON line: ``rss`` and ``peak_rss`` (bytes), ``max_lag`` (seconds, the
  event loop's worst lateness since the last ``reset``), ``connections``, ``closes``
  (the gateway's closes by code) and ``fds`` (open file descriptors).
- ``reset``: forget the worst lag so far.
- ``quit``: shut down and exit.

``--nofile N`` sets the open-file limit (soft and hard) to N before anything starts, as a
machine with a low limit would have. Logs go to stderr at WARNING.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource
import sys
import threading
import time
from typing import Any

TICK = 0.005
"""Seconds between two looks of the lag monitor."""


def _memory() -> tuple[int, int]:
    rss = peak = 0
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    return rss, peak


async def main(args: argparse.Namespace) -> None:
    """Serve until ``quit`` on stdin (or its end)."""
    from wsbus import Context, Envelope, Gateway, GatewayConfig, MemoryBus, Service, handles
    from wsbus_cli.demo_services import Echo
    from wsbus_websockets import EdgeConfig, serve

    class Flood(Service):
        """Sends ``content["n"]`` numbered messages (``pad`` bytes each) to the sender."""

        name = "flood"

        @handles("flood")
        async def flood(self, message: Envelope, ctx: Context) -> None:
            n = int(message.content["n"])
            pad = "x" * int(message.content.get("pad", 0))
            for i in range(n):
                ctx.reply({"i": i, "pad": pad})
                if i % 64 == 63:
                    await asyncio.sleep(0)

    loop = asyncio.get_running_loop()
    worst = [0.0]

    async def monitor() -> None:
        while True:
            before = loop.time()
            await asyncio.sleep(TICK)
            late = loop.time() - before - TICK
            worst[0] = max(worst[0], late)

    gateway = Gateway(MemoryBus([Echo(), Flood()]), config=GatewayConfig(node="b"))
    await gateway.start()
    config = EdgeConfig(close_timeout=args.close_timeout)
    extra = {"backlog": args.backlog} if args.backlog else {}
    server = await serve(gateway, "127.0.0.1", 0, config=config, **extra)
    lag_task = asyncio.create_task(monitor())
    print(json.dumps({"port": server.port}), flush=True)

    commands: asyncio.Queue[str] = asyncio.Queue()

    def read_stdin() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(commands.put_nowait, line.strip())
        loop.call_soon_threadsafe(commands.put_nowait, "quit")

    threading.Thread(target=read_stdin, daemon=True).start()
    while True:
        command = await commands.get()
        if command == "quit":
            break
        if command == "reset":
            worst[0] = 0.0
            print("{}", flush=True)
        elif command == "stats":
            rss, peak = _memory()
            stats = gateway.stats()
            report: dict[str, Any] = {
                "rss": rss,
                "peak_rss": peak,
                "max_lag": worst[0],
                "connections": stats.connections,
                "closes": {str(k): v for k, v in stats.closes_by_code.items()},
                "fds": len(os.listdir("/proc/self/fd")),
                "time": time.monotonic(),
            }
            print(json.dumps(report), flush=True)
    lag_task.cancel()
    # The gateway first: it drains and closes the connections; then the port.
    await gateway.close()
    await server.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nofile", type=int, default=0)
    parser.add_argument("--close-timeout", type=float, default=5.0)
    parser.add_argument("--backlog", type=int, default=0, help="listen backlog (default 100)")
    arguments = parser.parse_args()
    if arguments.nofile:
        resource.setrlimit(resource.RLIMIT_NOFILE, (arguments.nofile, arguments.nofile))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    asyncio.run(main(arguments))
