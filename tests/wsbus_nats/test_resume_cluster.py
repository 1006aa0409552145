"""History, resume and presence across gateways on a real three-node NATS cluster (issue 13).

Gateways A and B are real Gateways on NatsBus behind real WebSocket servers, connected to NATS
nodes 1 and 2, keeping history for the groups ``room.*`` (members get presence frames) and
sharing one resume secret; a third gateway C, when a test needs one to die, is a ``wsbus
serve`` process. Services are ``wsbus service --bus nats`` processes on node 3. Clients are
real :mod:`wsbus_websockets` clients. The buckets and the history stream have three
replicas.

Every process is ended by its own pid; every wait is bounded; no duration is compared with a
constant.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import secrets
import time
import urllib.request
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import nats
import nats.errors

from tests.wsbus_nats.test_cluster import BASE, ROOT, SERVICE_SETTINGS, WAIT
from wsbus import Context, Envelope, Gateway, GatewayConfig, Recipients, Service, handles
from wsbus.envelope import ClientAddress
from wsbus.errors import ConnectionClosed
from wsbus.gateway import ResumeSettings
from wsbus.history import HistoryConfig, Position
from wsbus_cli.supervisor import Child
from wsbus_nats import NatsBus
from wsbus_nats.servers import NatsCluster
from wsbus_websockets import Client, EdgeServer, connect, serve

STREAMER = "tests.wsbus_nats.test_resume_cluster:Streamer"
OTHER_STREAMER = "tests.wsbus_nats.test_resume_cluster:OtherStreamer"
CHAT = "wsbus_cli.demo_services:Chat"
WATCHER = "wsbus_testing.services:Watcher"
ROOMS = HistoryConfig(groups=("room.*",), size=1000, age=300.0)
SECRET = secrets.token_hex(32)
"""The resume secret every gateway of the test shares (a client resumes on any of them)."""


class Streamer(Service):
    """Joins clients to groups and streams numbered items to a group.

    ``stream.join`` ``{"group"}``: the sender joins it (reply ``{"joined"}``).
    ``stream.run`` ``{"group", "n", "pause"}``: sends ``stream.item`` ``{"i", "by"}`` for i in
    0..n-1 to the group, pausing ``pause`` seconds between them.
    """

    name = "streamer"

    @handles("stream.join")
    async def join(self, message: Envelope, ctx: Context) -> None:
        """Add the sender to the group."""
        assert isinstance(message.sender, ClientAddress)
        ctx.reply({"joined": await ctx.join(message.sender.conn_id, message.content["group"])})

    @handles("stream.run")
    async def run(self, message: Envelope, ctx: Context) -> None:
        """Stream the items."""
        content = message.content
        group = Recipients(groups=(content["group"],))
        for i in range(content["n"]):
            ctx.send(group, "stream.item", {"i": i, "by": self.name})
            if content.get("pause"):
                await asyncio.sleep(content["pause"])


class OtherStreamer(Streamer):
    """The same, as another service (a second sender to one group)."""

    name = "otherstreamer"

    @handles("stream.join")
    async def join(self, message: Envelope, ctx: Context) -> None:
        """Only the first streamer joins (one join answer per request)."""


@dataclass
class Side:
    """One gateway: its bus, its WebSocket server and the clients connected to it."""

    node: str
    bus: NatsBus
    gateway: Gateway
    server: EdgeServer
    clients: list[Client] = field(default_factory=list)

    async def client(self, **options: Any) -> Client:
        """Connect one more real WebSocket client (no reconnecting: a drop must show)."""
        client = await connect(self.server.url, reconnect=False, **options)
        self.clients.append(client)
        return client


@dataclass
class Deployment:
    """Gateways A and B, service processes on node 3."""

    cluster: NatsCluster
    a: Side
    b: Side
    settings: Path


def gateway_config(node: str) -> GatewayConfig:
    """What every gateway of the test runs with: history, presence frames, one secret."""
    return GatewayConfig(
        node=node,
        rate=1e9,
        burst=10**9,
        history=ROOMS,
        presence_frames=("room.*",),
        resume=ResumeSettings(window=60.0, secret=SECRET),
    )


async def _side(node: str, url: str) -> Side:
    bus = NatsBus(msgspec.structs.replace(BASE, servers=(url,)))
    gateway = Gateway(bus, config=gateway_config(node), entry_points=False)
    await gateway.start()
    server = await serve(gateway, "127.0.0.1", 0)
    return Side(node, bus, gateway, server)


async def _close_side(side: Side) -> None:
    for client in side.clients:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await client.close()
    await side.gateway.close()
    await side.server.close()


def _service(spec: str, url: str, settings: Path) -> Child:
    command = ["service", spec, "--bus", "nats", "--nats-url", url, "--config", str(settings)]
    return Child([*command, "--app-dir", str(ROOT)], timeout=WAIT)


@contextlib.asynccontextmanager
async def deployment(
    cluster: NatsCluster, tmp_path: Path, services: Sequence[str]
) -> AsyncIterator[Deployment]:
    """Gateways A (node 1) and B (node 2), and ``services`` as processes on node 3."""
    urls = cluster.urls
    settings = tmp_path / "service.toml"
    settings.write_text(SERVICE_SETTINGS)
    sides: list[Side] = []
    children: list[Child] = []
    try:
        # The gateways first: they make the buckets and the history stream.
        sides.append(await _side("ga", urls[0]))
        sides.append(await _side("gb", urls[1]))
        started = await asyncio.gather(
            *(asyncio.to_thread(_service, spec, urls[2], settings) for spec in services),
            return_exceptions=True,
        )
        children.extend(c for c in started if isinstance(c, Child))
        for result in started:
            if isinstance(result, BaseException):
                raise result
        wanted = collections.Counter(spec.rsplit(":", 1)[1].lower() for spec in services)
        async with asyncio.timeout(WAIT):
            for side in sides:
                while any(
                    side.bus.directory.services().get(name, 0) < count
                    for name, count in wanted.items()
                ):
                    await asyncio.sleep(0.05)
        yield Deployment(cluster, sides[0], sides[1], settings)
    finally:
        for side in sides:
            await _close_side(side)
        for child in children:
            await asyncio.to_thread(child.stop)


async def _next(client: Client, type: str) -> dict[str, Any]:
    """The next message of ``type`` this client receives (others are skipped)."""
    async with asyncio.timeout(WAIT):
        while True:
            frame = await client.receive()
            if frame.get("type") == type:
                return frame


def _offset(frame: dict[str, Any]) -> Position:
    position = Position.parse(frame.get("pos"))
    assert position is not None, frame
    return position


# -- resume on another gateway, mid-stream -----------------------------------------------------


async def test_a_client_dropped_mid_stream_resumes_on_another_gateway_and_misses_nothing(
    wsbus_nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    n = 300
    async with deployment(wsbus_nats_cluster, tmp_path, [STREAMER]) as cluster:
        first = await cluster.a.client()
        watcher = await cluster.b.client()
        for client in (first, watcher):
            reply = await client.request("stream.join", {"group": "room.r"}, timeout=WAIT)
            assert reply["content"] == {"joined": True}
        await watcher.send("stream.run", {"group": "room.r", "n": n, "pause": 0.004})

        got: list[dict[str, Any]] = []
        while len(got) < n // 5:
            got.append(await _next(first, "stream.item"))
        # The connection drops, as in a network failure (no closing handshake) ...
        assert first._ws is not None
        first._ws.transport.abort()
        with contextlib.suppress(ConnectionClosed):
            async with asyncio.timeout(WAIT):
                while True:  # what had arrived before the drop counts as seen
                    frame = await first.receive()
                    if frame.get("type") == "stream.item":
                        got.append(frame)
        dropped_at = len(got)
        assert dropped_at < n, "the stream ended before the drop: make it longer"

        # ... and the client comes back on the other gateway, with its token and positions.
        token, positions = first.resume_token, first.positions
        assert token is not None and "room.r" in positions
        second = await cluster.b.client(resume_token=token, positions=positions)
        resumed = second.resumed
        assert resumed.get("recovered") == ["room.r"] and resumed.get("resync") == [], resumed
        assert resumed.get("groups") == ["room.r"]
        while not got or got[-1]["content"]["i"] < n - 1:
            got.append(await _next(second, "stream.item"))

        # Every item exactly once, in order, positions strictly increasing.
        assert [f["content"]["i"] for f in got] == list(range(n))
        offsets = [_offset(f) for f in got]
        assert len({p.epoch for p in offsets}) == 1
        assert [p.offset for p in offsets] == sorted({p.offset for p in offsets})
        # The other member saw the whole stream live.
        seen = [await _next(watcher, "stream.item") for _ in range(n)]
        assert [f["content"]["i"] for f in seen] == list(range(n))
        # The session was taken: the old token resumes nothing any more.
        again = await cluster.a.client(resume_token=token, positions=positions)
        assert again.resumed.get("groups") in (None, [])


# -- two senders to one history group -----------------------------------------------------------


async def test_two_services_sending_to_one_history_group_reach_every_gateway_in_offset_order(
    wsbus_nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    n = 150
    async with deployment(wsbus_nats_cluster, tmp_path, [STREAMER, OTHER_STREAMER]) as cluster:
        members = [await cluster.a.client(), await cluster.b.client(), await cluster.b.client()]
        for client in members:
            reply = await client.request("stream.join", {"group": "room.two"}, timeout=WAIT)
            assert reply["content"] == {"joined": True}
        # Both services handle stream.run: both stream to the group at once.
        await members[0].send("stream.run", {"group": "room.two", "n": n})
        for client in members:
            items = [await _next(client, "stream.item") for _ in range(2 * n)]
            offsets = [_offset(f) for f in items]
            # Dense and in offset order on every gateway, whoever sent each.
            assert [p.offset for p in offsets] == list(
                range(offsets[0].offset, offsets[0].offset + 2 * n)
            )
            for name in ("streamer", "otherstreamer"):
                own = [f["content"]["i"] for f in items if f["content"]["by"] == name]
                assert own == list(range(n))  # each sender's order


# -- presence when a gateway dies -----------------------------------------------------------------


def _gateway_settings(tmp_path: Path) -> Path:
    path = tmp_path / "gc.toml"
    path.write_text(
        '[serve]\nbus = "nats"\n\n'
        '[gateway]\nnode = "gc"\npresence_frames = ["room.*"]\n\n'
        '[gateway.history]\ngroups = ["room.*"]\nsize = 1000\nage = 300.0\n\n'
        f'[gateway.resume]\nwindow = 60.0\nsecret = "{SECRET}"\n\n' + SERVICE_SETTINGS
    )
    return path


async def test_presence_stays_right_when_a_gateway_is_killed(
    wsbus_nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    async with deployment(wsbus_nats_cluster, tmp_path, [CHAT, WATCHER]) as cluster:
        url = wsbus_nats_cluster.urls[2]
        command = ["serve", "--config", str(_gateway_settings(tmp_path)), "--port", "0"]
        gc = await asyncio.to_thread(
            Child,
            [*command, "--nats-url", url],
            ready="listening on",
            timeout=WAIT,
        )
        try:
            here = await cluster.a.client()
            reply = await here.request("chat.join", {"room": "r"}, timeout=WAIT)
            assert reply["content"]["ok"] is True
            address = gc.text.split("listening on ", 1)[1].split()[0]
            doomed = []
            for _ in range(2):
                client = await connect(address, reconnect=False)
                doomed.append(client)
                reply = await client.request("chat.join", {"room": "r"}, timeout=WAIT)
                assert reply["content"]["ok"] is True
            doomed_ids = {c.conn_id for c in doomed}
            joined: set[str] = set()
            while joined != doomed_ids:
                frame = await _next(here, "wsbus.presence")
                if frame["content"]["event"] == "join":
                    joined.add(frame["content"]["conn_id"])
            members = await here.request("chat.members", {"room": "r"}, timeout=WAIT)
            assert {m["conn_id"] for m in members["content"]["members"]} == {
                here.conn_id,
                *doomed_ids,
            }

            killed = time.monotonic()
            await asyncio.to_thread(gc.kill)
            left: set[str] = set()
            while left != doomed_ids:
                frame = await _next(here, "wsbus.presence")
                if frame["content"]["event"] == "leave":
                    left.add(frame["content"]["conn_id"])
            took = time.monotonic() - killed
            print(f"gateway gc killed: its members' leave frames within {took:.2f} s")
            # The room's list is right again: only the live member.
            async with asyncio.timeout(WAIT):
                while True:
                    members = await here.request("chat.members", {"room": "r"}, timeout=WAIT)
                    content = members["content"]
                    if content["ok"]:
                        break
                    await asyncio.sleep(0.1)  # gc not yet found dead: it does not answer
            assert {m["conn_id"] for m in content["members"]} == {here.conn_id}
            # Services heard gateway_lost for gc once (from the lowest live gateway, ga).
            async with asyncio.timeout(WAIT):
                while True:
                    seen = await here.request("watcher.seen", None, timeout=WAIT)
                    lost = [
                        e
                        for e in seen["content"]["events"]
                        if e["content"].get("event") == "gateway_lost"
                    ]
                    if lost:
                        break
                    await asyncio.sleep(0.1)
            assert [(e["sender"]["node"], e["content"]["node"]) for e in lost] == [("ga", "gc")]
        finally:
            await asyncio.to_thread(gc.stop)


async def test_history_outlives_a_nats_node(
    wsbus_nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    n = 100
    async with deployment(wsbus_nats_cluster, tmp_path, [STREAMER]) as cluster:
        first, watcher = await cluster.a.client(), await cluster.b.client()
        for client in (first, watcher):
            reply = await client.request("stream.join", {"group": "room.kept"}, timeout=WAIT)
            assert reply["content"] == {"joined": True}
        await first.send("stream.run", {"group": "room.kept", "n": n, "pause": 0.002})
        got = [await _next(first, "stream.item") for _ in range(10)]
        assert first._ws is not None
        first._ws.transport.abort()  # gone after ten items
        with contextlib.suppress(ConnectionClosed):
            async with asyncio.timeout(WAIT):
                while True:
                    frame = await first.receive()
                    if frame.get("type") == "stream.item":
                        got.append(frame)
        token, positions = first.resume_token, first.positions
        # The whole stream is in the history (the other member has it all) ...
        assert [(await _next(watcher, "stream.item"))["content"]["i"] for _ in range(n)] == list(
            range(n)
        )
        # ... when the NATS node the services were on dies; the stream has replicas on the
        # others, which elect a new leader.
        await asyncio.to_thread(wsbus_nats_cluster.kill, 2)
        # Until JetStream's meta group has a leader again (a long history read makes a
        # consumer, which needs it), and the history stream and the sessions bucket have
        # theirs (each elects its own): a resume started earlier waits for them, but only
        # so long (wsbus_nats.history.LEADER_WAIT), and a busy machine may elect slower.
        async with asyncio.timeout(WAIT):
            while not await asyncio.to_thread(_meta_leader, wsbus_nats_cluster, 2):
                await asyncio.sleep(0.1)
        nc = await nats.connect(wsbus_nats_cluster.urls[1])
        try:
            for stream in ("wsbus_history", "KV_wsbus_sessions"):
                async with asyncio.timeout(WAIT):
                    while True:
                        try:
                            info = await nc.jetstream(timeout=1).stream_info(stream)
                        except nats.errors.Error:
                            await asyncio.sleep(0.1)
                            continue
                        if info.cluster is not None and info.cluster.leader:
                            break
                        await asyncio.sleep(0.1)
        finally:
            await nc.close()
        second = await cluster.b.client(resume_token=token, positions=positions, open_timeout=WAIT)
        assert second.resumed.get("recovered") == ["room.kept"], second.resumed
        while got[-1]["content"]["i"] < n - 1:
            got.append(await _next(second, "stream.item"))
        assert [f["content"]["i"] for f in got] == list(range(n))


def _meta_leader(cluster: NatsCluster, lost: int) -> bool:
    """True when a live node says JetStream's meta group has a leader, not node ``lost``.

    From the node's monitoring endpoint (``/jsz``); a node that does not answer says no.
    """
    dead = cluster[lost].name
    for index, server in enumerate(cluster):
        if index == lost or server.monitor_url is None:
            continue
        try:
            with urllib.request.urlopen(f"{server.monitor_url}/jsz", timeout=2.0) as answer:
                meta = json.load(answer).get("meta_cluster") or {}
        except (OSError, ValueError):
            continue
        leader = meta.get("leader")
        return bool(leader) and leader != dead
    return False
