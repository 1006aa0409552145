"""History and resume across gateways on the Pyro bus, with real name server, bus and services.

The message bus keeps each history group's messages (its ``MemoryHistory``, stamped as it
queues them for the gateways) and closed sessions: a client of one gateway that loses its
connection mid-stream resumes on another gateway (the same resume secret) and misses
nothing. History and sessions live in the message bus process: after it restarts, a new
epoch, and resuming clients are told to resync.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest_asyncio

from tests.conftest import assert_balanced
from wsbus import Codec, Envelope, Gateway, GatewayConfig, Service, memory_pair
from wsbus.edge import MemoryClient
from wsbus.envelope import ClientAddress, Recipients
from wsbus.gateway import ResumeSettings
from wsbus.history import HistoryConfig, Position
from wsbus.service import Context, handles
from wsbus_pyro import PyroBus, PyroConfig
from wsbus_pyro.transport import lookup
from wsbus_testing.children import Child

Spawn = Callable[[str], Child]

WAIT = 30.0
"""The bound on every wait here: generous, for a busy two-core machine."""

SECRET = "5eed" * 16
"""The resume secret every gateway of these tests shares."""


class Streamer(Service):
    """Streams numbered messages to a group, for these tests.

    ``stream.start`` ``{"group", "n", "start"}`` sends ``stream.item`` start..start+n-1
    (start 0 by default) to the group, a little at a time, and replies ``"done"`` once all
    are sent; ``stream.join`` ``{"group"}`` adds the sender to the group.
    """

    name = "streamer"

    @handles("stream.join")
    async def join(self, message: Envelope, ctx: Context) -> None:
        """Add the sender to the group."""
        assert isinstance(message.sender, ClientAddress)
        ctx.reply({"joined": await ctx.join(message.sender.conn_id, message.content["group"])})

    @handles("stream.start")
    async def start(self, message: Envelope, ctx: Context) -> None:
        """Send the numbered messages, pausing now and then (a stream, not one burst)."""
        recipients = Recipients(groups=(message.content["group"],))
        start = int(message.content.get("start", 0))
        for i in range(start, start + int(message.content["n"])):
            ctx.send(recipients, "stream.item", i)
            if i % 10 == 9:
                await asyncio.sleep(0.01)
        ctx.reply("done")


class Kit:
    """Gateways on the Pyro bus in this process, keeping history for ``feed.*``."""

    def __init__(self, config: PyroConfig) -> None:
        self.config = config
        self.gateways: list[Gateway] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def gateway(self, node: str) -> Gateway:
        config = GatewayConfig(
            node=node,
            history=HistoryConfig(groups=("feed.*",), size=1000, age=300.0),
            resume=ResumeSettings(window=60.0, secret=SECRET),
        )
        gateway = Gateway(PyroBus(self.config), config=config, entry_points=False)
        await gateway.start()
        self.gateways.append(gateway)
        return gateway

    async def client(self, gateway: Gateway) -> tuple[MemoryClient, dict[str, Any]]:
        """Connect a client; return it and its welcome's content."""
        conn, client = memory_pair(Codec.JSON)
        self.tasks.append(asyncio.create_task(gateway.serve(conn)))
        welcome = await client.receive(WAIT)
        assert welcome["type"] == "wsbus.welcome", welcome
        client.conn_id = welcome["content"]["conn_id"]
        return client, welcome["content"]

    async def close(self) -> None:
        for gateway in self.gateways:
            await gateway.close()
        self.gateways.clear()
        await asyncio.gather(*self.tasks)
        self.tasks.clear()


@pytest_asyncio.fixture
async def kit(wsbus_pyro_config: PyroConfig, wsbus_spawn_service: Spawn) -> AsyncIterator[Kit]:
    await asyncio.to_thread(wsbus_spawn_service, "tests.wsbus_pyro.test_history:Streamer")
    kit = Kit(wsbus_pyro_config)
    try:
        yield kit
    finally:
        await kit.close()


def _bus_info(config: PyroConfig) -> dict[str, Any]:
    with lookup(config.bus_name, config) as bus:
        info: dict[str, Any] = bus.info()
    return info


async def _join(client: MemoryClient, group: str) -> None:
    client.send("stream.join", {"group": group}, id=f"join-{group}")
    reply = await client.receive_until("stream.join.reply", WAIT)
    assert reply["content"] == {"joined": True}


async def _saved(gateway: Gateway) -> None:
    """Wait until the gateway has kept a closed session (in the message bus)."""
    async with asyncio.timeout(WAIT):
        while gateway.stats().sessions_saved < 1:
            await asyncio.sleep(0.02)


async def _resume(
    client: MemoryClient, token: str, positions: dict[str, str]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Send ``wsbus.resume``; return the ``wsbus.resumed`` content and the frames before it."""
    client.send("wsbus.resume", {"token": token, "positions": positions}, id="r1")
    before: list[dict[str, Any]] = []
    async with asyncio.timeout(WAIT):
        while True:
            frame = await client.receive(WAIT)
            if frame["type"] == "wsbus.resumed":
                assert frame["reply_to"] == "r1"
                return frame["content"], before
            assert frame["type"] != "wsbus.error", frame
            before.append(frame)


async def test_a_client_resumes_on_another_gateway_and_misses_nothing(kit: Kit) -> None:
    g1 = await kit.gateway("g1")
    g2 = await kit.gateway("g2")
    ann, welcome = await kit.client(g1)
    token = welcome["resume"]["token"]
    await _join(ann, "feed.1")
    ann.send("stream.start", {"group": "feed.1", "n": 150}, id="go")
    seen: list[int] = []
    positions: list[Position] = []

    def take(frame: dict[str, Any]) -> None:
        if frame["type"] == "stream.item":
            position = Position.parse(frame["pos"])
            assert position is not None and frame["group"] == "feed.1"
            seen.append(frame["content"])
            positions.append(position)
        else:
            assert frame["type"] in ("stream.start.reply", "wsbus.ack"), frame

    # Mid-stream: ann reads a third of it, and her connection is gone.
    async with asyncio.timeout(WAIT):
        while len(seen) < 50:
            take(await ann.receive(WAIT))
    ann.close(1006)
    await _saved(g1)
    # The rest of that stream is in the message bus's history before she is back.
    bus = g2.bus
    assert isinstance(bus, PyroBus)
    end = Position(positions[0].epoch, positions[0].offset + 149)
    async with asyncio.timeout(WAIT):
        while await bus.history("feed.1", end, 1) != []:
            await asyncio.sleep(0.02)

    again, _ = await kit.client(g2)
    resumed, before = await _resume(again, token, {"feed.1": positions[-1].encode()})
    assert before == []
    assert resumed["recovered"] == ["feed.1"] and resumed["resync"] == []
    assert resumed["groups"] == ["feed.1"]
    assert resumed["conn_id"] == again.conn_id and resumed["token"] != token
    # Replayed, then live: every item after the last one seen, once each, in order.
    async with asyncio.timeout(WAIT):
        while seen[-1] != 149:
            take(await again.receive(WAIT))
        again.send("stream.start", {"group": "feed.1", "n": 150, "start": 150}, id="more")
        while seen[-1] != 299:
            take(await again.receive(WAIT))
    assert seen == list(range(300))
    first = positions[0].offset
    assert [p.offset for p in positions] == list(range(first, first + 300))
    assert {p.epoch for p in positions} == {positions[0].epoch}
    stats = g2.stats()
    assert (stats.resumes, stats.replayed) == (1, 100)
    for gateway in (g1, g2):
        assert_balanced(gateway.stats())


async def test_a_restarted_bus_starts_history_again_and_clients_resync(
    kit: Kit, wsbus_message_bus: Child, wsbus_pyro_config: PyroConfig
) -> None:
    config = wsbus_pyro_config
    g1 = await kit.gateway("g1")
    ann, welcome = await kit.client(g1)
    await _join(ann, "feed.1")
    ann.send("stream.start", {"group": "feed.1", "n": 3}, id="go")
    frames = [await ann.receive_until("stream.item", WAIT) for _ in range(3)]
    old = Position.parse(frames[-1]["pos"])
    assert old is not None
    epoch = (await asyncio.to_thread(_bus_info, config))["history"]
    assert epoch == old.epoch

    await asyncio.to_thread(wsbus_message_bus.stop)
    bus = await asyncio.to_thread(
        Child, ["bus", "--ns-port", str(config.ns_port)], env={"WSBUS_SECRET": None}
    )
    try:
        # The gateway registers again, with its history settings: a new epoch.
        async with asyncio.timeout(WAIT):
            while (info := await asyncio.to_thread(_bus_info, config))["history"] is None:
                await asyncio.sleep(0.1)
        assert info["history"] != epoch
        async with asyncio.timeout(WAIT):
            while "streamer" not in (await asyncio.to_thread(_bus_info, config))["services"]:
                await asyncio.sleep(0.1)
        ann.close(1006)
        await _saved(g1)
        again, _ = await kit.client(g1)
        resumed, _ = await _resume(again, welcome["resume"]["token"], {"feed.1": frames[-1]["pos"]})
        assert resumed["groups"] == ["feed.1"]
        assert resumed["recovered"] == [] and resumed["resync"] == ["feed.1"]
        # Back in the group, it gets what is sent now, in the new epoch, from offset 1.
        again.send("stream.start", {"group": "feed.1", "n": 1}, id="go-again")
        frame = await again.receive_until("stream.item", WAIT)
        assert frame["pos"] == f"{info['history']}:1"
    finally:
        await kit.close()
        await asyncio.to_thread(bus.stop)
