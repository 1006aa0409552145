"""One wsbus cluster on a real three-node NATS cluster on loopback (issue 12's "Show").

Gateway A (a real Gateway on NatsBus behind a real WebSocket server) is connected to node 1,
gateway B to node 2; each test starts the services it needs as ``wsbus service --bus nats``
processes on node 3 (the demo's chat, the Director, two instances of the demo's echo, a
Dawdler). The key-value buckets (directory and alias table) have three replicas, so they
survive a node. Clients are real :mod:`wsbus_websockets` clients on both gateways.

Every process is ended by its own pid; every wait is bounded; no duration is compared with a
constant.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from wsbus import Context, Envelope, Gateway, GatewayConfig, Service, handles
from wsbus.errors import ConnectionClosed, MessageRejected, RequestTimeout
from wsbus_cli.supervisor import Child
from wsbus_nats import NatsBus, NatsConfig
from wsbus_nats.servers import NatsCluster
from wsbus_websockets import Client, EdgeServer, connect, serve

ROOT = Path(__file__).resolve().parents[2]
ECHO = "wsbus_cli.demo_services:Echo"
CHAT = "wsbus_cli.demo_services:Chat"
DIRECTOR = "wsbus_testing.services:Director"
DAWDLER = "tests.wsbus_nats.test_cluster:Dawdler"

# Short heartbeats and reconnect waits, so that a death shows within seconds; three
# replicas of every key-value bucket, so that the alias table outlives a node.
BASE = NatsConfig(
    kv_replicas=3,
    heartbeat=0.5,
    request_timeout=3.0,
    reconnect_wait=0.05,
    reconnect_wait_max=0.5,
)
SERVICE_SETTINGS = "[nats]\n" + "".join(
    f"{name} = {getattr(BASE, name)}\n"
    for name in (
        "heartbeat",
        "kv_replicas",
        "request_timeout",
        "reconnect_wait",
        "reconnect_wait_max",
    )
)
"""The same settings for the service processes (``wsbus service --config``)."""
WAIT = 30.0
"""Seconds any one step may take on a busy two-core machine before the test fails."""
REPLY_WAIT = 10.0
"""Seconds an echo request may wait for its answer before it counts as unanswered (the
gateway itself gives up on a service after ``request_timeout``, 3 s, and says so)."""


@dataclass
class Side:
    """One gateway: its bus, its WebSocket server and the clients connected to it."""

    node: str
    bus: NatsBus
    gateway: Gateway
    server: EdgeServer
    clients: list[Client] = field(default_factory=list)

    async def client(self) -> Client:
        """Connect one more real WebSocket client (no reconnecting: a drop must show)."""
        client = await connect(self.server.url, reconnect=False)
        self.clients.append(client)
        return client


@dataclass
class Deployment:
    """The whole cluster of the test: NATS nodes, two gateways, service processes."""

    cluster: NatsCluster
    a: Side
    b: Side
    services: dict[str, list[Child]]


async def _side(node: str, url: str) -> Side:
    bus = NatsBus(msgspec.structs.replace(BASE, servers=(url,)))
    # No rate limit: the test's clients send as fast as they can.
    config = GatewayConfig(node=node, rate=1e9, burst=10**9)
    gateway = Gateway(bus, config=config, entry_points=False)
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
    """``wsbus service SPEC --bus nats --nats-url URL`` as its own process, once ready."""
    command = ["service", spec, "--bus", "nats", "--nats-url", url]
    return Child([*command, "--config", str(settings), "--app-dir", str(ROOT)], timeout=WAIT)


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
        # The gateways first: they make the buckets, with three replicas.
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
        by_spec: dict[str, list[Child]] = {}
        for spec, child in zip(services, children, strict=True):
            by_spec.setdefault(spec, []).append(child)
        # Each gateway routes to an instance once its directory lists it.
        # (Each of these services is named after its class.)
        wanted = collections.Counter(spec.rsplit(":", 1)[1].lower() for spec in services)
        async with asyncio.timeout(WAIT):
            for side in sides:
                while any(
                    side.bus.directory.services().get(name, 0) < count
                    for name, count in wanted.items()
                ):
                    await asyncio.sleep(0.05)
        yield Deployment(cluster, sides[0], sides[1], by_spec)
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


# -- chat, aliases and clients() across two gateways ------------------------------------------


async def test_clients_of_two_gateways_chat_claim_aliases_and_are_listed(
    wsbus_nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    async with deployment(wsbus_nats_cluster, tmp_path, [CHAT, DIRECTOR]) as cluster:
        a1, a2 = await cluster.a.client(), await cluster.a.client()
        b1, b2 = await cluster.b.client(), await cluster.b.client()
        everyone = [a1, a2, b1, b2]
        for client in everyone:
            reply = await client.request("chat.join", {"room": "lobby"}, timeout=WAIT)
            assert reply["content"] == {"ok": True, "room": "lobby"}

        # Each says one thing; each sees all four, its own included, from both gateways.
        for n, client in enumerate(everyone):
            await client.send("chat.say", {"room": "lobby", "text": f"hello {n}"})
        for client in everyone:
            heard = {(await _next(client, "chat.message"))["content"]["text"] for _ in range(4)}
            assert heard == {f"hello {n}" for n in range(4)}

        # One alias, claimed from both gateways at once: exactly one wins.
        replies = await asyncio.gather(
            a1.request("chat.nick", {"nick": "sam"}, timeout=WAIT),
            b1.request("chat.nick", {"nick": "sam"}, timeout=WAIT),
        )
        contents = sorted((r["content"] for r in replies), key=lambda c: not c["ok"])
        assert contents == [
            {"ok": True, "nick": "sam"},
            {"ok": False, "error": "that nickname is taken"},
        ]
        winner, loser = (a1, b1) if replies[0]["content"]["ok"] else (b1, a1)
        # Taken while its holder lives, from either gateway; free once it leaves.
        for other in (a2, b2):
            again = await other.request("chat.nick", {"nick": "sam"}, timeout=WAIT)
            assert again["content"] == {"ok": False, "error": "that nickname is taken"}
        await winner.close()
        async with asyncio.timeout(WAIT):
            while not (await loser.request("chat.nick", {"nick": "sam"}, timeout=WAIT))["content"][
                "ok"
            ]:
                await asyncio.sleep(0.05)

        # clients() lists the clients of both gateways, from a client of either.
        alive = [c for c in everyone if c is not winner]
        for asker in (a2, b2):
            listed = await asker.request("director.clients", timeout=WAIT)
            assert sorted(listed["content"]["clients"]) == sorted(str(c.conn_id) for c in alive)


# -- a service instance killed mid-traffic -------------------------------------------------------


@dataclass
class Outcomes:
    """How each request sent with an id ended."""

    replied: list[int] = field(default_factory=list)
    refused: list[tuple[int, str]] = field(default_factory=list)
    unanswered: list[int] = field(default_factory=list)


async def _echo_traffic(
    client: Client, numbers: Sequence[int], outcomes: Outcomes, in_flight: int
) -> None:
    """Send an echo request for each number, ``in_flight`` at a time; record each ending."""
    numbers_left = iter(numbers)

    async def worker() -> None:
        for n in numbers_left:
            try:
                reply = await client.request("echo", n, timeout=REPLY_WAIT)
            except MessageRejected as exc:
                outcomes.refused.append((n, exc.code))
            except (RequestTimeout, ConnectionClosed):
                outcomes.unanswered.append(n)
            else:
                assert reply["content"]["content"] == n
                outcomes.replied.append(n)

    await asyncio.gather(*(worker() for _ in range(in_flight)))


async def test_a_killed_service_instance_leaves_its_traffic_to_the_other(
    wsbus_nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    async with deployment(wsbus_nats_cluster, tmp_path, [ECHO, ECHO]) as cluster:
        clients = [await cluster.a.client(), await cluster.b.client()]
        clients += [await cluster.a.client(), await cluster.b.client()]
        victim, survivor = cluster.services[ECHO]
        outcomes = Outcomes()
        numbers = itertools.count()
        batches = [[next(numbers) for _ in range(150)] for _ in clients]
        traffic = asyncio.gather(
            *(
                _echo_traffic(c, batch, outcomes, 8)
                for c, batch in zip(clients, batches, strict=True)
            )
        )
        # Mid-traffic: a quarter of the requests answered, most still to come.
        async with asyncio.timeout(WAIT):
            while len(outcomes.replied) < 150:
                await asyncio.sleep(0.005)
        await asyncio.to_thread(victim.kill)
        async with asyncio.timeout(WAIT * 3):
            await traffic

        sent = sum(len(batch) for batch in batches)
        # Every request ended as a reply or an error frame: none was left unanswered.
        assert outcomes.unanswered == []
        assert len(outcomes.replied) + len(outcomes.refused) == sent
        assert {code for _, code in outcomes.refused} <= {"unavailable", "service_error"}
        # The survivor carried the rest: after the kill, requests are answered.
        assert survivor.process.poll() is None
        for client in clients:
            reply = await client.request("echo", "after", timeout=WAIT)
            assert reply["content"]["content"] == "after"


class Dawdler(Service):
    """Takes ``dawdler.wait`` and never answers it (a handler busy for an hour)."""

    name = "dawdler"

    @handles("dawdler.wait")
    async def wait(self, message: Envelope, ctx: Context) -> None:
        """Reply after an hour."""
        await asyncio.sleep(3600)
        ctx.reply("done")


async def test_a_request_held_by_an_instance_that_dies_ends_as_an_error(
    wsbus_nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    async with deployment(wsbus_nats_cluster, tmp_path, [DAWDLER]) as cluster:
        client = await cluster.a.client()
        await client.send("dawdler.wait", None, id="r1")
        ack = await _next(client, "wsbus.ack")
        assert ack["content"]["ref"] == "r1"  # the instance's runner holds it
        [instance] = cluster.services[DAWDLER]
        await asyncio.to_thread(instance.kill)
        async with asyncio.timeout(REPLY_WAIT):
            while True:
                frame = await client.receive()
                content = frame.get("content")
                if frame.get("reply_to") == "r1" or (
                    frame.get("type") == "wsbus.error"
                    and isinstance(content, dict)
                    and content.get("ref") == "r1"
                ):
                    break
        assert frame.get("type") == "wsbus.error"


# -- a NATS node killed under a gateway ------------------------------------------------------------


def _gap_covers(stream: list[tuple[str, int]], missing: int) -> bool:
    """Whether a gap notice in ``stream`` came after message ``missing`` would have.

    ``stream`` is what one client received, in order: ("message", n) or ("gap", -1). A
    gap notice covers ``missing`` when the first message after it is a later one (or none
    came after it): the loss was announced before anything newer arrived.
    """
    for index, (kind, _) in enumerate(stream):
        if kind != "gap":
            continue
        later = [n for k, n in stream[index + 1 :] if k == "message"]
        if not later or later[0] > missing:
            return True
    return False


async def _answer(client: Client, type: str, content: Any) -> dict[str, Any]:
    """The reply to a request, asked again while the gateway says to retry later.

    Right after a node's death the directory may be stale for a few heartbeats: a refusal
    (``no_route``, ``unavailable``) is an answer, not a loss, and asking again is what a
    client does.
    """
    async with asyncio.timeout(WAIT):
        while True:
            try:
                reply = await client.request(type, content, timeout=WAIT)
            except MessageRejected as exc:
                if exc.code not in ("no_route", "unavailable"):
                    raise
            else:
                if reply["content"].get("error") != "nickname not accepted":
                    return reply
            await asyncio.sleep(0.1)


async def test_a_gateway_moves_to_another_node_and_its_clients_hear_of_any_loss(
    wsbus_nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    async with deployment(wsbus_nats_cluster, tmp_path, [CHAT, ECHO]) as cluster:
        speaker = await cluster.a.client()
        listeners = [await cluster.b.client(), await cluster.b.client()]
        for client in [speaker, *listeners]:
            reply = await client.request("chat.join", {"room": "lobby"}, timeout=WAIT)
            assert reply["content"]["ok"]

        streams: list[list[tuple[str, int]]] = [[] for _ in listeners]

        async def listen(client: Client, stream: list[tuple[str, int]]) -> None:
            while True:
                frame = await client.receive()
                if frame.get("type") == "wsbus.gap":
                    stream.append(("gap", -1))
                elif frame.get("type") == "chat.message":
                    stream.append(("message", int(frame["content"]["text"])))

        listening = [
            asyncio.create_task(listen(c, s)) for c, s in zip(listeners, streams, strict=True)
        ]
        published: list[int] = []  # acked by gateway A: the chat service holds them
        numbers = itertools.count()

        async def speak(count: int) -> None:
            for n in itertools.islice(numbers, count):
                try:
                    await speaker.request(
                        "chat.say", {"room": "lobby", "text": str(n)}, wait="ack", timeout=WAIT
                    )
                except MessageRejected:
                    continue  # refused, so not sent: nothing to lose
                published.append(n)
                await asyncio.sleep(0.01)

        speaking = asyncio.create_task(speak(400))
        async with asyncio.timeout(WAIT):
            while len(published) < 50:
                await asyncio.sleep(0.01)
        await asyncio.to_thread(wsbus_nats_cluster.kill, 1)
        # B finds another node: its bus is available again and counts the reconnection.
        async with asyncio.timeout(WAIT):
            while not (cluster.b.bus.available and cluster.b.bus.counters.reconnects >= 1):
                await asyncio.sleep(0.02)
        async with asyncio.timeout(WAIT * 3):
            await speaking
        # Messages reach B's clients again, through their gateway's new node: the chat
        # goes on until the newest has reached both.
        async with asyncio.timeout(WAIT):
            while not published or not all(
                ("message", published[-1]) in stream for stream in streams
            ):
                await speak(1)
        for task in listening:
            task.cancel()
        await asyncio.gather(*listening, return_exceptions=True)

        assert not wsbus_nats_cluster[1].running
        for stream in streams:
            received = {n for kind, n in stream if kind == "message"}
            missing = [n for n in published if n not in received]
            # Nothing lost silently: each message missing was announced by a gap notice.
            uncovered = [n for n in missing if not _gap_covers(stream, n)]
            assert uncovered == [], (uncovered, stream)
            # And what arrived arrived in order.
            order = [n for kind, n in stream if kind == "message"]
            assert order == sorted(order)
        # B serves requests again, through the new node.
        reply = await _answer(listeners[1], "echo", "after")
        assert reply["content"]["content"] == "after"


async def test_an_alias_held_on_a_gateway_whose_node_dies_stays_its_holders(
    wsbus_nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    async with deployment(wsbus_nats_cluster, tmp_path, [CHAT]) as cluster:
        rival = await cluster.a.client()
        holder = await cluster.b.client()
        for client in (rival, holder):
            await client.request("chat.join", {"room": "lobby"}, timeout=WAIT)
        assert (await holder.request("chat.nick", {"nick": "bee"}, timeout=WAIT))["content"]["ok"]

        async def chatter() -> None:
            # Traffic through both gateways meanwhile, as in a live room.
            while True:
                with contextlib.suppress(MessageRejected):
                    await rival.request("chat.say", {"room": "lobby", "text": "hi"}, wait="ack")
                await asyncio.sleep(0.01)

        chatting = asyncio.create_task(chatter())
        await asyncio.sleep(0.5)
        await asyncio.to_thread(wsbus_nats_cluster.kill, 1)
        # Through the election and B's move to another node, A's client asks for the alias
        # again and again: never given (refused as taken, or unavailable meanwhile).
        answers = []
        for _ in range(40):
            try:
                reply = await rival.request("chat.nick", {"nick": "bee"}, timeout=WAIT)
            except MessageRejected as exc:
                answers.append(exc.code)
            else:
                answers.append(reply["content"].get("error", "given"))
            await asyncio.sleep(BASE.heartbeat / 4)
        chatting.cancel()
        await asyncio.gather(chatting, return_exceptions=True)
        assert "given" not in answers, answers
        assert cluster.b.bus.counters.reconnects >= 1
        # And the alias table outlived the node: B's client holds "bee" still.
        refused = await _answer(rival, "chat.nick", {"nick": "bee"})
        assert refused["content"] == {"ok": False, "error": "that nickname is taken"}
