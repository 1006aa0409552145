"""The servers under test, each run in its own process: ``python -m bench.servers KIND PORT``.

Every server speaks the same tiny protocol to the load generator, so the numbers compare:

- ``fanout`` request ``{"n": N, "paced": P}``: send ``N`` small messages to every connected
  client. Paced, the producer yields to the event loop every 64 messages (so a server may
  gather a pass's frames into one write); unpaced, after every message (one message per
  loop pass, as a producer driven by outside events sends). The same for every server.
- ingest: count every message received; once ``target`` have arrived, send ``done`` to
  every client.
- echo: send the request back.

Kinds:

- ``raw``: plain ``websockets``: ``json.loads`` of every frame, ``websockets.broadcast``.
- ``raw-count``: the same server, but an ingest frame is only counted, not parsed (the
  least a server can do with a frame: the floor under every other figure).
- ``wsbus``: a gateway on the in-memory bus, on the ``websockets`` edge, with a service
  doing the work; ``wsbus-picows``: the same gateway on the picows edge. Default settings
  but one (:func:`wsbus_settings`).
- ``socketio``: python-socketio on aiohttp, rooms and events.

Each prints ``loop NAME`` (the event loop it runs on: ``asyncio``, or ``uvloop`` with
``--loop uvloop``), ``settings {JSON}`` (what it runs with, as it differs from its library's
defaults), then ``ready``; on SIGTERM, ``maxlag MS`` (its worst event-loop lag).
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
PACE = 64
"""A paced producer yields to the event loop after this many messages."""
INGEST_PREFIX = '{"type": "bench.ingest"'
"""How every ingest frame the load generator sends to the raw servers begins."""
RAISED_RATE: dict[str, Any] = {"rate": 1e9, "burst": 10**9}
"""The gateway settings the bench changes: the per-connection rate limit, raised out of the
way. A rate limit is a policy, not a speed: the load's clients send as fast as they can,
and at the default (100 a second, bursts of 200) the figure would be the limit's."""


def _yield_after(i: int, paced: bool) -> bool:
    return not paced or i % PACE == PACE - 1


def raw_settings() -> dict[str, Any]:
    """How the raw servers differ from ``websockets.serve``'s defaults.

    Compression off, as on wsbus's edges by default (the bench's clients offer no
    extension, so it would not be negotiated anyway).
    """
    return {"compression": None}


async def raw(port: int, *, parse: bool = True) -> None:
    """Plain websockets: decode with json, broadcast with websockets.broadcast.

    With ``parse`` False, an ingest frame is counted without being decoded.
    """
    from websockets.asyncio.server import ServerConnection, broadcast, serve

    clients: set[ServerConnection] = set()
    state = {"count": 0, "target": 0}

    async def handler(ws: ServerConnection) -> None:
        clients.add(ws)
        try:
            async for message in ws:
                if not parse and isinstance(message, str) and message.startswith(INGEST_PREFIX):
                    state["count"] += 1
                    if state["count"] == state["target"]:
                        broadcast(clients, json.dumps({"type": "bench.done"}))
                    continue
                frame = json.loads(message)
                kind = frame.get("type")
                if kind == "bench.fanout":
                    paced = frame["content"].get("paced", True)
                    for i in range(frame["content"]["n"]):
                        ITEM["content"]["i"] = i
                        broadcast(clients, json.dumps(ITEM))
                        if _yield_after(i, paced):
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

    _settings(raw_settings())
    async with serve(handler, "127.0.0.1", port, **raw_settings()):
        print("ready", flush=True)
        LAG["max"] = 0.0  # start-up is not under load
        await asyncio.Future()


def wsbus_settings(edge: str = "websockets") -> dict[str, dict[str, Any]]:
    """How the wsbus server's settings differ from the defaults, read off the objects it uses.

    Returns:
        ``{"gateway": {...}, "bus": {...}, "edge": {...}}``: each the fields of
        ``GatewayConfig``, the ``MemoryBus`` arguments and the edge's config that differ
        from their defaults. Only the rate limit (:data:`RAISED_RATE`) should.
    """
    import msgspec

    from wsbus import GatewayConfig

    gateway = msgspec.structs.asdict(_gateway_config())
    defaults = msgspec.structs.asdict(GatewayConfig())
    edge_config, edge_defaults = _edge_config(edge), type(_edge_config(edge))()
    return {
        "gateway": {k: v for k, v in gateway.items() if v != defaults[k]},
        "bus": dict(_bus_options()),
        "edge": {
            k: v
            for k, v in msgspec.structs.asdict(edge_config).items()
            if v != getattr(edge_defaults, k)
        },
    }


def _gateway_config() -> Any:
    from wsbus import GatewayConfig

    return GatewayConfig(**RAISED_RATE)


def _bus_options() -> dict[str, Any]:
    # The in-memory bus at its defaults: serialize=True (each envelope encoded and decoded,
    # as a bus between processes does) and a 1,000-envelope inbox per service.
    return {}


def _edge_config(edge: str) -> Any:
    if edge == "picows":
        from wsbus_picows import PicowsConfig

        return PicowsConfig()
    from wsbus_websockets import EdgeConfig

    return EdgeConfig()


def bench_service() -> Any:
    """The service behind the wsbus servers: it does the fan-out, the echo and the counting.

    Its ``target`` is the number of ingest frames to count (set by a ``bench.target``
    message, or directly in-process); once it is reached the service sends ``bench.done``
    to everyone and sets its ``reached`` event.
    """
    from wsbus import Context, Envelope, Recipients, Service, handles

    class Bench(Service):
        name = "bench"
        count = 0
        target = 0

        def __init__(self) -> None:
            super().__init__()
            self.reached = asyncio.Event()

        @handles("bench.fanout")
        async def fanout(self, message: Envelope, ctx: Context) -> None:
            everyone = Recipients(everyone=True)
            paced = message.content.get("paced", True)
            for i in range(message.content["n"]):
                ctx.send(everyone, "bench.item", {"i": i, "text": "the quick brown fox"})
                if _yield_after(i, paced):
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
                self.reached.set()

    return Bench()


async def start_wsbus(port: int, *, edge: str = "websockets") -> tuple[Any, Any]:
    """Start a wsbus gateway on the in-memory bus at the bench's settings, on ``port``.

    Returns:
        The started gateway and its service (:func:`bench_service`). The caller closes the
        gateway; the edge's server lives as long as the event loop.
    """
    from wsbus import Gateway, MemoryBus

    service = bench_service()
    gateway = Gateway(
        MemoryBus([service], **_bus_options()), config=_gateway_config(), entry_points=False
    )
    await gateway.start()
    if edge == "picows":
        from wsbus_picows import serve as serve_picows

        await serve_picows(gateway, "127.0.0.1", port, config=_edge_config(edge))
    else:
        from wsbus_websockets import serve

        await serve(gateway, "127.0.0.1", port, config=_edge_config(edge))
    return gateway, service


async def wsbus(port: int, *, edge: str = "websockets") -> None:
    """A wsbus gateway on the in-memory bus; a service does the fan-out and the counting."""
    _settings(wsbus_settings(edge))
    await start_wsbus(port, edge=edge)
    print("ready", flush=True)
    LAG["max"] = 0.0  # start-up is not under load
    await asyncio.Future()


def _settings(settings: dict[str, Any]) -> None:
    """Tell the load generator what this server runs with."""
    print("settings " + json.dumps(settings, default=repr), flush=True)


async def socketio(port: int) -> None:
    """python-socketio on aiohttp: a room for fan-out, an event handler for ingest."""
    import socketio as sio_module
    from aiohttp import web

    _settings({"async_mode": "aiohttp"})
    sio = sio_module.AsyncServer(async_mode="aiohttp", logger=False, engineio_logger=False)
    app = web.Application()
    sio.attach(app)
    state = {"count": 0, "target": 0}

    @sio.event  # type: ignore[untyped-decorator]
    async def connect(sid: str, environ: Any) -> None:
        await sio.enter_room(sid, "all")

    @sio.on("bench.fanout")  # type: ignore[untyped-decorator]
    async def fanout(sid: str, data: Any) -> None:
        paced = data.get("paced", True)
        for i in range(data["n"]):
            await sio.emit("bench.item", {"i": i, "text": "the quick brown fox"}, room="all")
            if _yield_after(i, paced):
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
    # Which event loop this server runs on, as the loop itself says (``asyncio``, ``uvloop``).
    print(f"loop {type(asyncio.get_running_loop()).__module__.partition('.')[0]}", flush=True)
    watcher = asyncio.create_task(_watch_lag())
    servers = {
        "raw": lambda: raw(port),
        "raw-count": lambda: raw(port, parse=False),
        "wsbus": lambda: wsbus(port),
        "wsbus-picows": lambda: wsbus(port, edge="picows"),
        "socketio": lambda: socketio(port),
    }
    server = asyncio.create_task(servers[kind]())

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
    """Run the server named on the command line; print the worst loop lag when it ends.

    ``python -m bench.servers KIND PORT [--loop asyncio|uvloop]``: with uvloop, the server
    runs on ``asyncio.Runner(loop_factory=uvloop.new_event_loop)``, as ``wsbus serve --loop
    uvloop`` does.
    """
    kind, port = sys.argv[1], int(sys.argv[2])
    loop = sys.argv[4] if sys.argv[3:4] == ["--loop"] else "asyncio"
    factory = None
    if loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    print(f"pid {os.getpid()}", flush=True)
    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_serve(kind, port))


if __name__ == "__main__":
    main()
