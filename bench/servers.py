"""The servers under test, each run in its own process: ``python -m bench.servers KIND PORT``.

Every server speaks the same tiny protocol to the load generator, so the numbers compare:

- ``fanout`` request: broadcast ``n`` small messages to every connected client, yielding to
  the event loop every 64 messages (the same pacing for everyone).
- ingest: count every message received; once ``target`` have arrived, send ``done`` to
  every client.

Kinds: ``raw`` (plain ``websockets``, ``websockets.broadcast`` and ``json.loads``),
``wsbus`` (a gateway on the in-memory bus with a service doing the work), ``socketio``
(python-socketio on aiohttp, rooms and events).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from typing import Any

ITEM: dict[str, Any] = {"type": "bench.item", "content": {"i": 0, "text": "the quick brown fox"}}


async def raw(port: int) -> None:
    """Plain websockets: decode with json, broadcast with websockets.broadcast."""
    from websockets.asyncio.server import ServerConnection, broadcast, serve

    clients: set[ServerConnection] = set()
    state = {"count": 0, "target": 0}

    async def handler(ws: ServerConnection) -> None:
        clients.add(ws)
        try:
            async for message in ws:
                frame = json.loads(message)
                kind = frame.get("type")
                if kind == "bench.fanout":
                    n = frame["content"]["n"]
                    for i in range(n):
                        ITEM["content"]["i"] = i
                        broadcast(clients, json.dumps(ITEM))
                        if i % 64 == 63:
                            await asyncio.sleep(0)
                elif kind == "bench.echo":
                    await ws.send(message)
                elif kind == "bench.stamp":
                    stamp = {"n": frame["content"], "t": time.monotonic()}
                    await ws.send(json.dumps({"type": "bench.stamp", "content": stamp}))
                elif kind == "bench.target":
                    state["target"] = frame["content"]["n"]
                    state["count"] = 0
                else:
                    state["count"] += 1
                    if state["count"] == state["target"]:
                        broadcast(clients, json.dumps({"type": "bench.done"}))
        finally:
            clients.discard(ws)

    async with serve(handler, "127.0.0.1", port, compression=None, max_queue=64):
        print("ready", flush=True)
        LAG["max"] = 0.0  # start-up is not under load
        await asyncio.Future()


async def wsbus(port: int) -> None:
    """A wsbus gateway on the in-memory bus; a service does the fan-out and the counting."""
    from wsbus import (
        Context,
        Envelope,
        Gateway,
        GatewayConfig,
        MemoryBus,
        Recipients,
        Service,
        handles,
    )
    from wsbus_websockets import EdgeConfig, serve

    class Bench(Service):
        name = "bench"
        count = 0
        target = 0

        @handles("bench.fanout")
        async def fanout(self, message: Envelope, ctx: Context) -> None:
            everyone = Recipients(everyone=True)
            for i in range(message.content["n"]):
                ctx.send(everyone, "bench.item", {"i": i, "text": "the quick brown fox"})
                if i % 64 == 63:
                    await asyncio.sleep(0)

        @handles("bench.echo")
        async def echo(self, message: Envelope, ctx: Context) -> None:
            ctx.reply(message.content)

        @handles("bench.target")
        async def set_target(self, message: Envelope, ctx: Context) -> None:
            self.target = message.content["n"]
            self.count = 0

        @handles("bench.ingest")
        async def ingest(self, message: Envelope, ctx: Context) -> None:
            self.count += 1
            if self.count == self.target:
                ctx.send(Recipients(everyone=True), "bench.done")

    config = GatewayConfig(rate=1e9, burst=10**9, outbound_queue=100_000, max_connections=100_000)
    # serialize=False: in one process the envelopes need no copy; the Pyro bench covers that.
    gateway = Gateway(
        MemoryBus([Bench()], serialize=False, inbox_size=1_000_000),
        config=config,
        entry_points=False,
    )
    await gateway.start()
    await serve(gateway, "127.0.0.1", port, config=EdgeConfig(inbound_queue=64))
    print("ready", flush=True)
    LAG["max"] = 0.0  # start-up is not under load
    await asyncio.Future()


async def socketio(port: int) -> None:
    """python-socketio on aiohttp: a room for fan-out, an event handler for ingest."""
    import socketio as sio_module
    from aiohttp import web

    sio = sio_module.AsyncServer(async_mode="aiohttp", logger=False, engineio_logger=False)
    app = web.Application()
    sio.attach(app)
    state = {"count": 0, "target": 0}

    @sio.event  # type: ignore[untyped-decorator]
    async def connect(sid: str, environ: Any) -> None:
        await sio.enter_room(sid, "all")

    @sio.on("bench.fanout")  # type: ignore[untyped-decorator]
    async def fanout(sid: str, data: Any) -> None:
        for i in range(data["n"]):
            await sio.emit("bench.item", {"i": i, "text": "the quick brown fox"}, room="all")
            if i % 64 == 63:
                await asyncio.sleep(0)

    @sio.on("bench.echo")  # type: ignore[untyped-decorator]
    async def echo(sid: str, data: Any) -> None:
        await sio.emit("bench.echo", data, to=sid)

    @sio.on("bench.target")  # type: ignore[untyped-decorator]
    async def set_target(sid: str, data: Any) -> None:
        state["target"] = data["n"]
        state["count"] = 0

    @sio.on("bench.ingest")  # type: ignore[untyped-decorator]
    async def ingest(sid: str, data: Any) -> None:
        state["count"] += 1
        if state["count"] == state["target"]:
            await sio.emit("bench.done", {}, room="all")

    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    LAG["max"] = 0.0  # start-up is not under load
    await asyncio.Future()


LAG = {"max": 0.0}


async def _watch_lag() -> None:
    """Record the event loop's worst lateness (a 10 ms sleep that wakes late)."""
    loop = asyncio.get_running_loop()
    while True:
        before = loop.time()
        await asyncio.sleep(0.01)
        LAG["max"] = max(LAG["max"], loop.time() - before - 0.01)


async def _serve(kind: str, port: int) -> None:
    watcher = asyncio.create_task(_watch_lag())
    server = asyncio.create_task({"raw": raw, "wsbus": wsbus, "socketio": socketio}[kind](port))

    def stop() -> None:
        # Said first: the load generator may not wait for a graceful close.
        print(f"maxlag {LAG['max'] * 1000:.1f}", flush=True)
        server.cancel()

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop)
    try:
        await server
    except asyncio.CancelledError:
        pass
    finally:
        watcher.cancel()


def main() -> None:
    """Run the server named on the command line; print the worst loop lag when it ends."""
    kind, port = sys.argv[1], int(sys.argv[2])
    print(f"pid {os.getpid()}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(kind, port))


if __name__ == "__main__":
    main()
