"""One cluster on the Pyro bus: several gateways on one message bus act as one.

Real name server, message bus and service processes; gateways in this process (and one as
its own ``wsbus serve`` process, to be killed). Aliases are unique across gateways,
``clients()`` lists every gateway's clients, a user's connections on every gateway are
addressed as one, and a service name has one process.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio

from tests.conftest import assert_balanced
from wsbus import Codec, Envelope, Gateway, GatewayConfig, Service, hookimpl, memory_pair
from wsbus.edge import MemoryClient
from wsbus.envelope import (
    ClientAddress,
    ConnId,
    EnvelopeId,
    GatewayAddress,
    NodeId,
    Recipients,
    ServiceAddress,
)
from wsbus.errors import ConfigError
from wsbus.hooks import HandshakeRequest, Identity
from wsbus.service import Context, handles
from wsbus_pyro import MessageBus, PyroBus, PyroConfig
from wsbus_pyro.bus import _chunks
from wsbus_pyro.transport import (
    NO_ROUTE,
    OK,
    REREGISTERING,
    TAKEN,
    UNAVAILABLE,
    encode_batch,
    lookup,
    name_server,
)
from wsbus_testing.children import Child, free_port
from wsbus_websockets import connect

Spawn = Callable[[str], Child]

WAIT = 30.0
"""The bound on every wait here: generous, for a busy two-core machine."""
NICK_TAKEN = "that nickname is taken"


class Roster(Service):
    """Groups and client lists across gateways, for these tests.

    ``roster.join`` ``{"group"}`` adds the sender to a group; ``roster.list`` ``{"group"}``
    (or no group) replies ``{"clients": [conn_id, ...]}`` from ``ctx.clients()``.
    """

    name = "roster"

    @handles("roster.join")
    async def join(self, message: Envelope, ctx: Context) -> None:
        """Add the sender to the group named in the content."""
        assert isinstance(message.sender, ClientAddress)
        ctx.reply({"joined": await ctx.join(message.sender.conn_id, message.content["group"])})

    @handles("roster.list")
    async def list(self, message: Envelope, ctx: Context) -> None:
        """Reply with the connection ids of every gateway's clients (or a group's)."""
        group = message.content.get("group") if isinstance(message.content, dict) else None
        ctx.reply({"clients": [c.conn_id for c in await ctx.clients(group)]})


class UserFromQuery:
    """Authenticates a client as the ``user`` in its query string (anonymous without one)."""

    @hookimpl
    def wsbus_authenticate(self, request: HandshakeRequest) -> Identity | None:
        """Accept the client as its ``?user=``."""
        user = request.query.get("user")
        return Identity(user=user) if user else None


class Cluster:
    """Gateways on one Pyro message bus in this process, with in-memory clients."""

    def __init__(self, config: PyroConfig) -> None:
        self.config = config
        self.gateways: list[Gateway] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def gateway(self, node: str) -> Gateway:
        gateway = Gateway(
            PyroBus(self.config),
            config=GatewayConfig(node=node),
            plugins=[UserFromQuery()],
            entry_points=False,
        )
        await gateway.start()
        self.gateways.append(gateway)
        return gateway

    async def client(self, gateway: Gateway, user: str | None = None) -> MemoryClient:
        request = HandshakeRequest(query={"user": user} if user else {})
        conn, client = memory_pair(Codec.JSON, request)
        self.tasks.append(asyncio.create_task(gateway.serve(conn)))
        welcome = await client.receive(WAIT)
        client.conn_id = welcome["content"]["conn_id"]
        return client

    async def close(self) -> None:
        for gateway in self.gateways:
            await gateway.close()
        await asyncio.gather(*self.tasks)


@pytest_asyncio.fixture
async def cluster(
    wsbus_pyro_config: PyroConfig, wsbus_spawn_service: Spawn
) -> AsyncIterator[Cluster]:
    for spec in (
        "wsbus_cli.demo_services:Chat",
        "wsbus_testing.services:Director",
        "tests.wsbus_pyro.test_cluster:Roster",
    ):
        await asyncio.to_thread(wsbus_spawn_service, spec)
    kit = Cluster(wsbus_pyro_config)
    try:
        yield kit
    finally:
        await kit.close()


async def _until(client: MemoryClient, type: str) -> dict[str, Any]:
    return await client.receive_until(type, timeout=WAIT)


async def _nick(client: MemoryClient, nick: str) -> dict[str, Any]:
    """Ask the chat service for a nickname; return its answer (or the gateway's error)."""
    client.send("chat.nick", {"nick": nick}, id=f"nick-{nick}")
    async with asyncio.timeout(WAIT):
        while True:
            frame = await client.receive(WAIT)
            if frame["type"] == "chat.nick.reply":
                reply: dict[str, Any] = frame["content"]
                return reply
            if frame["type"] == "wsbus.error":  # the chat service is re-registering
                return {"ok": False, "error": frame["content"]["code"]}


async def _nick_when_settled(client: MemoryClient, nick: str) -> dict[str, Any]:
    """Ask for a nickname until the answer is not "try again" (bounded by ``WAIT``)."""
    async with asyncio.timeout(WAIT):
        while True:
            reply = await _nick(client, nick)
            if reply["ok"] or reply["error"] == NICK_TAKEN:
                return reply
            await asyncio.sleep(0.1)


async def _next_item(client: MemoryClient) -> Any:
    return (await _until(client, "director.item"))["content"]


def _bus_info(config: PyroConfig) -> dict[str, Any]:
    with lookup(config.bus_name, config) as bus:
        info: dict[str, Any] = bus.info()
    return info


# -- aliases ---------------------------------------------------------------------------------


async def test_an_alias_is_unique_across_gateways(cluster: Cluster) -> None:
    g1 = await cluster.gateway("g1")
    g2 = await cluster.gateway("g2")
    ann = await cluster.client(g1)
    bob = await cluster.client(g2)
    assert await _nick(ann, "sam") == {"ok": True, "nick": "sam"}
    assert await _nick(bob, "sam") == {"ok": False, "error": NICK_TAKEN}
    assert [c.alias for c in g2.clients()] == [None]

    # One message to sam reaches exactly one client: bob's next item is the marker after it.
    ann.send("director.send", {"recipients": {"aliases": ["sam"]}, "body": "to sam"})
    assert await _next_item(ann) == "to sam"
    ann.send("director.send", {"recipients": {"conn_ids": [bob.conn_id]}, "body": "marker"})
    assert await _next_item(bob) == "marker"

    # Given up (ann takes another nickname), sam is bob's to take.
    assert await _nick(ann, "ann") == {"ok": True, "nick": "ann"}
    assert await _nick(bob, "sam") == {"ok": True, "nick": "sam"}
    ann.send("director.send", {"recipients": {"aliases": ["sam"]}, "body": "to sam again"})
    assert await _next_item(bob) == "to sam again"
    # A connection that ends frees its alias for a client of another gateway.
    bob.close()
    carol = await cluster.client(g1)
    async with asyncio.timeout(WAIT):
        while (await _nick(carol, "sam"))["ok"] is not True:
            await asyncio.sleep(0.05)
    for gateway in (g1, g2):
        assert_balanced(gateway.stats())


async def test_the_bus_claims_aliases_for_connections_of_registered_gateways(
    cluster: Cluster,
) -> None:
    g1 = await cluster.gateway("g1")
    g2 = await cluster.gateway("g2")
    bus1, bus2 = g1.bus, g2.bus
    assert isinstance(bus1, PyroBus) and isinstance(bus2, PyroBus)
    ann, bob = ConnId("g1.1"), ConnId("g2.1")
    assert await bus1.claim_alias("kim", ann) is True
    assert await bus1.claim_alias("kim", ann) is True  # held already: still true
    assert await bus2.claim_alias("kim", bob) is False
    await bus2.release_alias("kim", bob)  # not bob's: nothing happens
    assert await bus2.claim_alias("kim", bob) is False
    await bus1.release_alias("kim", ann)
    assert await bus2.claim_alias("kim", bob) is True


async def test_a_killed_gateway_frees_its_aliases(
    cluster: Cluster, wsbus_pyro_config: PyroConfig
) -> None:
    config = wsbus_pyro_config
    args = ["serve", "--bus", "pyro", "--port", "0", "--node", "gk"]
    doomed = await asyncio.to_thread(
        Child,
        [*args, "--ns-port", str(config.ns_port)],
        ready="listening on",
        env={"WSBUS_SECRET": None},
    )
    try:
        match = re.search(r"listening on (\S+)", doomed.text)
        assert match is not None, doomed.text
        async with asyncio.timeout(WAIT), connect(match.group(1)) as sam:
            reply = await sam.request("chat.nick", {"nick": "sam"})
            assert reply["content"] == {"ok": True, "nick": "sam"}
            g2 = await cluster.gateway("g2")
            bob = await cluster.client(g2)
            assert await _nick(bob, "sam") == {"ok": False, "error": NICK_TAKEN}
            await asyncio.to_thread(doomed.kill)
            # The bus drops a gateway that stops checking in (3 x reregister_interval):
            # then sam is free.
            while (await _nick(bob, "sam"))["ok"] is not True:
                await asyncio.sleep(0.1)
        assert "gk" not in (await asyncio.to_thread(_bus_info, config))["gateways"]
    finally:
        await asyncio.to_thread(doomed.stop)


async def test_a_restarted_bus_gets_every_alias_back(
    cluster: Cluster, wsbus_message_bus: Child, wsbus_pyro_config: PyroConfig
) -> None:
    g1 = await cluster.gateway("g1")
    g2 = await cluster.gateway("g2")
    ann = await cluster.client(g1)
    bob = await cluster.client(g2)
    assert await _nick(ann, "sam") == {"ok": True, "nick": "sam"}
    config = wsbus_pyro_config
    await asyncio.to_thread(wsbus_message_bus.stop)
    bus = await asyncio.to_thread(
        Child, ["bus", "--ns-port", str(config.ns_port)], env={"WSBUS_SECRET": None}
    )
    try:
        # Until g1 claimed sam again, a claim is "try again", never a second sam.
        assert await _nick_when_settled(bob, "sam") == {"ok": False, "error": NICK_TAKEN}
        # Each service registers again on its own time: the director may come after chat.
        async with asyncio.timeout(WAIT):
            while "director" not in (await asyncio.to_thread(_bus_info, config))["services"]:
                await asyncio.sleep(0.1)
        bob.send("director.send", {"recipients": {"aliases": ["sam"]}, "body": "still ann"})
        assert await _next_item(ann) == "still ann"
    finally:
        await cluster.close()
        cluster.gateways.clear()
        cluster.tasks.clear()
        await asyncio.to_thread(bus.stop)


async def test_a_gateway_cut_off_gives_up_an_alias_taken_meanwhile(cluster: Cluster) -> None:
    g1 = await cluster.gateway("g1")
    g2 = await cluster.gateway("g2")
    ann = await cluster.client(g1)
    bob = await cluster.client(g2)
    assert await _nick(ann, "sam") == {"ok": True, "nick": "sam"}
    bus1 = g1.bus
    assert isinstance(bus1, PyroBus) and bus1._watchdog is not None
    # g1 stops checking in, as if cut off from the bus: the bus drops it, frees sam.
    bus1._stop.set()
    await asyncio.to_thread(bus1._watchdog.join, WAIT)
    async with asyncio.timeout(WAIT):
        while (await _nick(bob, "sam"))["ok"] is not True:
            await asyncio.sleep(0.1)
    # A send to everyone while g1 is away: the bus settles it for g2 alone, so g1 missed it.
    # (Replies to bob's requests go straight to g2, past the bus: they tell it nothing.)
    bob.send("director.send", {"recipients": {"everyone": True}, "body": "while g1 was away"})
    assert await _next_item(bob) == "while g1 was away"
    # g1's next check (what its watchdog does each interval) registers it again, claiming
    # sam: bob holds it now, so g1 clears it from ann.
    await asyncio.to_thread(bus1._check_bus, None)
    # Its clients are told they may have missed messages while it was away.
    gap = await _until(ann, "wsbus.gap")
    assert gap["content"]["reason"] == "bus_disconnected"
    async with asyncio.timeout(WAIT):
        while [c.alias for c in g1.clients()] != [None]:
            await asyncio.sleep(0.05)
    ann.send("director.send", {"recipients": {"aliases": ["sam"]}, "body": "to sam"})
    assert await _next_item(bob) == "to sam"
    ann.send("director.send", {"recipients": {"conn_ids": [ann.conn_id]}, "body": "marker"})
    assert await _next_item(ann) == "marker"


# -- clients, groups and users across gateways ----------------------------------------------


async def test_clients_and_groups_span_every_gateway(cluster: Cluster) -> None:
    g1 = await cluster.gateway("g1")
    g2 = await cluster.gateway("g2")
    ann = await cluster.client(g1)
    bob = await cluster.client(g2)
    cid = await cluster.client(g2)
    ann.send("roster.list", None)
    listed = (await _until(ann, "roster.list.reply"))["content"]["clients"]
    assert len(listed) == 3 and set(listed) == {ann.conn_id, bob.conn_id, cid.conn_id}
    for client in (ann, bob):
        client.send("roster.join", {"group": "both"})
        assert (await _until(client, "roster.join.reply"))["content"] == {"joined": True}
    cid.send("roster.list", {"group": "both"})
    members = (await _until(cid, "roster.list.reply"))["content"]["clients"]
    assert len(members) == 2 and set(members) == {ann.conn_id, bob.conn_id}


async def test_a_users_connections_on_every_gateway_are_addressed_as_one(
    cluster: Cluster,
) -> None:
    g1 = await cluster.gateway("g1")
    g2 = await cluster.gateway("g2")
    on_g1 = await cluster.client(g1, user="ann")
    on_g2 = await cluster.client(g2, user="ann")
    other = await cluster.client(g2, user="bob")
    other.send("director.send", {"recipients": {"users": ["ann"]}, "body": "to ann"})
    for client in (on_g1, on_g2):
        assert await _next_item(client) == "to ann"
    # Once each: the next item each of her connections gets is the marker.
    for client in (on_g1, on_g2):
        other.send("director.send", {"recipients": {"conn_ids": [client.conn_id]}, "body": "m"})
        assert await _next_item(client) == "m"
    other.send("director.missed", None)
    assert (await _until(other, "director.missed.reply"))["content"] == {"missed": []}


# -- one process per service name ------------------------------------------------------------


async def test_a_second_process_of_a_service_is_refused_and_a_dead_ones_place_taken(
    cluster: Cluster, wsbus_spawn_service: Spawn, wsbus_pyro_config: PyroConfig
) -> None:
    first = await asyncio.to_thread(wsbus_spawn_service, "wsbus_cli.demo_services:Echo")
    config = wsbus_pyro_config
    command = [sys.executable, "-m", "wsbus_cli", "service", "wsbus_cli.demo_services:Echo"]
    second = await asyncio.to_thread(
        subprocess.run,
        [*command, "--ns-port", str(config.ns_port)],
        capture_output=True,
        text=True,
        timeout=WAIT,
        env={k: v for k, v in os.environ.items() if k != "WSBUS_SECRET"},
    )
    assert second.returncode == 2, second.stderr
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and not second.stdout, second.stderr
    assert "'echo'" in lines[0] and "single-machine" in lines[0] and "--bus nats" in lines[0]

    gateway = await cluster.gateway("g1")
    client = await cluster.client(gateway)
    # The first process kept the name: it still serves.
    client.send("echo", "one", id="1")
    assert (await _until(client, "echo.reply"))["content"]["content"] == "one"

    # A process that died gives its place to the next one at once: no wait for it to
    # be forgotten.
    await asyncio.to_thread(first.kill)
    await asyncio.to_thread(wsbus_spawn_service, "wsbus_cli.demo_services:Echo")
    client.send("echo", "two", id="2")
    assert (await _until(client, "echo.reply"))["content"]["content"] == "two"


async def test_a_second_gateway_with_a_node_id_on_the_bus_is_refused(cluster: Cluster) -> None:
    # Both would number their connections g1.1, g1.2, ...: the same ids, the same claims.
    g1 = await cluster.gateway("g1")
    ann = await cluster.client(g1)
    twin = Gateway(PyroBus(cluster.config), config=GatewayConfig(node="g1"), entry_points=False)
    with pytest.raises(ConfigError, match=r"node id 'g1'.*--node"):
        await twin.start()
    await twin.close()
    assert await _nick(ann, "sam") == {"ok": True, "nick": "sam"}


# -- the message bus's tables, in this process ------------------------------------------------


def test_the_message_bus_alias_table(
    wsbus_nameserver: Child, wsbus_pyro_config: PyroConfig
) -> None:
    config = wsbus_pyro_config
    bus = MessageBus(config)
    first, second = "PYRO:gw@127.0.0.1:1", "PYRO:gw@127.0.0.1:2"
    try:
        # Right after the bus started, a claim waits for every gateway in the name server.
        with name_server(config) as ns:
            ns.register(f"{config.gateway_prefix}g3", first)
        assert bus.register_gateway("g1", first) == {"refused": [], "missed": False}
        assert bus.claim_alias("sam", "g1.1") == REREGISTERING
        bus.register_gateway("g3", first)
        assert bus.claim_alias("sam", "g1.1") == OK
        assert bus.claim_alias("sam", "g1.1") == OK
        # A connection of a gateway the bus does not know: that gateway is re-registering.
        assert bus.claim_alias("kim", "g9.1") == UNAVAILABLE
        bus.register_gateway("g2", first)
        assert bus.claim_alias("sam", "g2.1") == TAKEN
        # Claims made again at registration: one held by another gateway's connection is
        # refused (that gateway clears it), as is one of a connection of another node.
        answer = bus.register_gateway("g2", first, [["sam", "g2.1"], ["kim", "g1.7"]], True)
        assert answer == {"refused": [["sam", "g2.1"], ["kim", "g1.7"]], "missed": False}
        assert bus.register_gateway("g2", first, [["lee", "g2.1"]])["refused"] == []
        assert bus.claim_alias("lee", "g1.1") == TAKEN
        bus.release_alias("lee", "g1.1")  # not its: nothing happens
        assert bus.claim_alias("lee", "g1.1") == TAKEN
        bus.release_alias("lee", "g2.1")
        assert bus.claim_alias("lee", "g1.1") == OK
        # A new process of g1 (a new address) starts with none of the old one's aliases.
        assert bus.register_gateway("g1", second)["refused"] == []
        assert bus.claim_alias("sam", "g2.1") == OK
        # So does one restarted at the same address (a fixed port): it says it is fresh.
        assert bus.claim_alias("max", "g1.5") == OK
        bus.register_gateway("g1", second, [], False, True)
        assert bus.claim_alias("max", "g2.1") == OK
        # Unregistering someone else's registration does nothing; one's own frees all.
        bus.unregister_gateway("g2", first.replace(":1", ":9"))
        assert bus.gateways() == ["g1", "g2", "g3"]
        bus.unregister_gateway("g2", first)
        assert bus.gateways() == ["g1", "g3"]
        assert bus.claim_alias("sam", "g1.2") == OK
        # A gateway that stops checking in is dropped, its aliases freed.
        assert bus.registered("gateway", "g3", first)
        assert bus.claim_alias("ray", "g3.1") == OK
        bus._gateways["g3"].seen -= bus.lifetime + 1
        assert bus.gateways() == ["g1"]
        bus._sweep()
        assert bus.info()["gateways"].keys() == {"g1"}
        assert bus.claim_alias("ray", "g1.1") == OK
        # Back with nothing sent to gateways meanwhile, it missed nothing; after a send to
        # everyone (which went to g1 only), it may have missed that.
        assert bus.register_gateway("g3", first, [], True)["missed"] is False
        bus.unregister_gateway("g3", first)
        everyone = Envelope(
            id=EnvelopeId("s-1"),
            type="news",
            sender=ServiceAddress("news"),
            recipients=Recipients(everyone=True),
        )
        bus.route(encode_batch([everyone]))
        assert bus.register_gateway("g3", first, [], True)["missed"] is True
    finally:
        bus._shutdown()


def test_a_service_registered_by_a_dead_process_is_replaced_at_once(
    wsbus_pyro_config: PyroConfig,
) -> None:
    bus = MessageBus(wsbus_pyro_config)
    # Nothing listens at the first address: the process that registered it is gone.
    gone = f"PYRO:wsbus.service.echo@127.0.0.1:{free_port()}"
    again = f"PYRO:wsbus.service.echo@127.0.0.1:{free_port()}"
    try:
        assert bus.register_service("echo", ["echo"], gone) is None
        assert bus.register_service("echo", ["echo"], again) is None
        assert bus.registered("service", "echo", again)
        # Leaving with another process's address removes nothing.
        bus.unregister_service("echo", gone)
        assert bus.info()["services"].keys() == {"echo"}
        bus.unregister_service("echo", again)
        assert bus.info()["services"] == {}
    finally:
        bus._shutdown()


def test_aliases_claimed_again_go_in_calls_a_pyro_message_can_carry() -> None:
    pairs = [[f"alias{i}", f"g1.{i}"] for i in range(10_000)]
    chunks = _chunks(pairs, 64 * 1024 // 4)
    assert [pair for chunk in chunks for pair in chunk] == pairs
    assert len(chunks) > 1
    assert all(len(repr(chunk).encode()) <= 64 * 1024 // 2 for chunk in chunks)
    assert _chunks([], 100) == [[]]  # one call, to register


def test_the_message_bus_sends_back_only_a_gateways_own_probe_and_only_its_id(
    wsbus_nameserver: Child, wsbus_pyro_config: PyroConfig
) -> None:
    bus = MessageBus(wsbus_pyro_config)
    me = GatewayAddress(NodeId("g1"))
    try:
        bus.register_gateway("g1", "PYRO:gw@127.0.0.1:1")
        forged = [
            Envelope(
                id=EnvelopeId("p1"), type="wsbus.probe", sender=GatewayAddress(NodeId("g2")), to=me
            ),
            Envelope(id=EnvelopeId("p2"), type="chat.say", sender=me, to=me),
            Envelope(
                id=EnvelopeId("p3"), type="wsbus.probe", sender=me, to=GatewayAddress(NodeId("g9"))
            ),
        ]
        for envelope in forged:
            assert bus.probe(encode_batch([envelope])) == NO_ROUTE, envelope
        two = Envelope(id=EnvelopeId("p4"), type="wsbus.probe", sender=me, to=me)
        assert bus.probe(encode_batch([two, two])) == NO_ROUTE
        queued: list[Envelope] = []
        endpoint = bus._gateways["g1"]
        endpoint.forwarder.put = lambda envelope, callback=None: queued.append(envelope)  # type: ignore[method-assign]
        carrying = Envelope(
            id=EnvelopeId("p5"),
            type="wsbus.probe",
            sender=me,
            to=me,
            content={"x": 1},
            headers={"wsbus-hist": "lobby:1"},
        )
        assert bus.probe(encode_batch([carrying])) == OK
        assert queued == [Envelope(id=EnvelopeId("p5"), type="wsbus.probe", sender=me, to=me)]
    finally:
        bus._shutdown()
