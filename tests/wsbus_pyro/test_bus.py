"""The Pyro bus with a real name server, a real message bus and real service processes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import pytest
import pytest_asyncio

from tests.conftest import assert_balanced
from wsbus import Codec, Gateway, GatewayConfig, Service, memory_pair
from wsbus.bus import (
    Bus,
    ClaimsAliases,
    KeepsHistory,
    KeepsSessions,
    ListsServices,
    Probes,
    ReportsAvailability,
)
from wsbus.edge import MemoryClient
from wsbus_pyro import PyroBus, PyroConfig
from wsbus_testing.children import Child
from wsbus_testing.conformance import BusConformance, MakeBus, MakeUnavailable

Spawn = Callable[[str], Child]


class TestPyroBusConformance(BusConformance):
    """The same conformance suite the in-memory bus passes, with services as processes."""

    capabilities = frozenset(
        {ClaimsAliases, KeepsHistory, KeepsSessions, ReportsAvailability, Probes, ListsServices}
    )
    spans_gateways = True

    @pytest.fixture
    def wsbus_make_unavailable(self, wsbus_message_bus: Child) -> MakeUnavailable:
        """Stop the message bus process (by its own pid)."""

        async def make_unavailable(bus: Bus) -> None:
            await asyncio.to_thread(wsbus_message_bus.stop)

        return make_unavailable

    @pytest_asyncio.fixture
    async def wsbus_make_bus(
        self, wsbus_spawn_service: Spawn, wsbus_pyro_config: PyroConfig
    ) -> AsyncIterator[MakeBus]:
        buses: list[PyroBus] = []

        async def make(services: list[type[Service]]) -> Bus:
            for cls in services:
                await asyncio.to_thread(wsbus_spawn_service, f"{cls.__module__}:{cls.__name__}")
            bus = PyroBus(wsbus_pyro_config)
            buses.append(bus)
            return bus

        yield make
        for bus in buses:
            await bus.close()


class Gateways:
    """Gateways on the Pyro bus in this process, with in-memory clients; all closed after."""

    def __init__(self, config: PyroConfig) -> None:
        self.config = config
        self.gateways: list[Gateway] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def gateway(self, node: str) -> Gateway:
        gateway = Gateway(PyroBus(self.config), config=GatewayConfig(node=node), entry_points=False)
        await gateway.start()
        self.gateways.append(gateway)
        return gateway

    async def client(self, gateway: Gateway, codec: Codec = Codec.JSON) -> MemoryClient:
        conn, client = memory_pair(codec)
        self.tasks.append(asyncio.create_task(gateway.serve(conn)))
        welcome = await client.receive()
        client.conn_id = welcome["content"]["conn_id"]
        return client

    async def close(self) -> None:
        for gateway in self.gateways:
            await gateway.close()
        await asyncio.gather(*self.tasks)


@pytest_asyncio.fixture
async def gateways(
    wsbus_pyro_config: PyroConfig, wsbus_spawn_service: Spawn
) -> AsyncIterator[Gateways]:
    for spec in (
        "wsbus_cli.demo_services:Echo",
        "wsbus_cli.demo_services:Chat",
        "wsbus_testing.services:Director",
    ):
        await asyncio.to_thread(wsbus_spawn_service, spec)
    kit = Gateways(wsbus_pyro_config)
    try:
        yield kit
    finally:
        await kit.close()


async def _until(client: MemoryClient, type: str) -> dict[str, Any]:
    return await client.receive_until(type, timeout=10)


async def _ack_and_reply(client: MemoryClient, ref: str) -> dict[str, Any]:
    """Read the ack of ``ref`` and the reply to it, in either order; return the reply.

    The reply goes straight from the service process to the gateway (the one-hop path),
    while the news that the service holds the message goes back through the bus before
    the gateway acks it: either may come first.
    """
    frames = [await client.receive(10), await client.receive(10)]
    acks = [f for f in frames if f["type"] == "wsbus.ack"]
    assert [a["content"] for a in acks] == [{"ref": ref}], frames
    replies = [f for f in frames if f["type"] != "wsbus.ack"]
    assert len(replies) == 1 and replies[0]["reply_to"] == ref, frames
    return replies[0]


async def test_client_message_reaches_a_service_process_and_back(gateways: Gateways) -> None:
    gateway = await gateways.gateway("g1")
    client = await gateways.client(gateway)
    client.send("echo", {"x": [1, 2]}, id="e1")
    reply = await _ack_and_reply(client, "e1")
    assert reply["type"] == "echo.reply"
    assert reply["content"] == {
        "content": {"x": [1, 2]},
        "sender": {"type": "client", "conn_id": client.conn_id, "alias": None, "user": None},
    }
    client.send("nobody.handles.this", id="n")
    error = await _until(client, "wsbus.error")
    assert error["content"]["code"] == "no_route"
    assert_balanced(gateway.stats())


async def test_service_sends_to_conn_alias_group_everyone(gateways: Gateways) -> None:
    gateway = await gateways.gateway("g1")
    ann = await gateways.client(gateway)
    bob = await gateways.client(gateway, Codec.MSGPACK)
    ann.send("director.alias", {"alias": "ann"})
    assert (await _until(ann, "director.alias.reply"))["content"] == {"alias": "ann"}
    bob.send("director.join", {"group": "g"})
    assert (await _until(bob, "director.join.reply"))["content"] == {"joined": True}

    async def check(recipients: dict[str, Any], body: str, *expect: MemoryClient) -> None:
        ann.send("director.send", {"recipients": recipients, "body": body})
        for client in expect:
            item = await _until(client, "director.item")
            assert item["content"] == body and item["from"] == "director"

    await check({"conn_ids": [bob.conn_id]}, "to bob", bob)
    await check({"aliases": ["ann"]}, "to ann", ann)
    await check({"groups": ["g"]}, "to g", bob)
    await check({"everyone": True}, "to all", ann, bob)
    # Order per sender and client: a burst arrives in order.
    for i in range(50):
        ann.send("director.send", {"recipients": {"conn_ids": [bob.conn_id]}, "body": str(i)})
    got = [(await _until(bob, "director.item"))["content"] for _ in range(50)]
    assert got == [str(i) for i in range(50)]


async def test_chat_over_pyro(gateways: Gateways) -> None:
    gateway = await gateways.gateway("g1")
    ann = await gateways.client(gateway)
    bob = await gateways.client(gateway)
    ann.send("chat.nick", {"nick": "ann"})
    assert (await _until(ann, "chat.nick.reply"))["content"] == {"ok": True, "nick": "ann"}
    for client in (ann, bob):
        client.send("chat.join", {"room": "lobby"})
        await _until(client, "chat.join.reply")
    ann.send("chat.say", {"room": "lobby", "text": "hello"})
    for client in (ann, bob):
        message = await _until(client, "chat.message")
        assert message["content"] == {"room": "lobby", "from": "ann", "text": "hello"}


async def test_two_gateways_share_one_bus(gateways: Gateways) -> None:
    g1 = await gateways.gateway("g1")
    g2 = await gateways.gateway("g2")
    a = await gateways.client(g1)
    b = await gateways.client(g2)
    b.send("director.alias", {"alias": "bee"})
    await _until(b, "director.alias.reply")
    for client in (a, b):
        client.send("director.join", {"group": "both"})
        assert (await _until(client, "director.join.reply"))["content"] == {"joined": True}

    a.send("director.send", {"recipients": {"aliases": ["bee"]}, "body": "cross"})
    assert (await _until(b, "director.item"))["content"] == "cross"
    a.send("director.send", {"recipients": {"conn_ids": [b.conn_id]}, "body": "by id"})
    assert (await _until(b, "director.item"))["content"] == "by id"
    b.send("director.send", {"recipients": {"groups": ["both"]}, "body": "group"})
    for client in (a, b):
        assert (await _until(client, "director.item"))["content"] == "group"
    # Each gateway owns its connections: a reaches only g1's, b only g2's.
    assert [c.conn_id for c in g1.clients()] == [a.conn_id]
    assert [c.conn_id for c in g2.clients()] == [b.conn_id]
    # A shared message reaches the right gateway and nobody is reported missing.
    a.send("director.missed", None)
    assert (await _until(a, "director.missed.reply"))["content"] == {"missed": []}
    for gateway in (g1, g2):
        assert_balanced(gateway.stats())


async def test_traffic_resumes_after_the_connections_sat_idle(
    wsbus_spawn_service: Spawn, wsbus_pyro_config: PyroConfig
) -> None:
    # The child processes drop Pyro connections idle for 5 s (their comm_timeout). This
    # gateway waits longer than that before it would reconnect on its own, so its first
    # call after the pause meets a dropped connection: nothing may be lost or refused.
    await asyncio.to_thread(wsbus_spawn_service, "wsbus_cli.demo_services:Echo")
    config = msgspec.structs.replace(wsbus_pyro_config, comm_timeout=20.0)
    kit = Gateways(config)
    try:
        gateway = await kit.gateway("idle")
        client = await kit.client(gateway)
        client.send("echo", "before", id="b")
        assert (await _ack_and_reply(client, "b"))["content"]["content"] == "before"
        await asyncio.sleep(6.5)
        client.send("echo", "after", id="a")
        assert (await _ack_and_reply(client, "a"))["content"]["content"] == "after"
        assert_balanced(gateway.stats())
    finally:
        await kit.close()


async def test_a_shared_secret_is_proven_both_ways(wsbus_pyro_config: PyroConfig) -> None:
    import Pyro5.errors

    from wsbus_pyro.transport import lookup, make_proxy

    config = msgspec.structs.replace(wsbus_pyro_config, secret="s3cret")
    args = ["--ns-port", str(config.ns_port)]
    env: dict[str, str | None] = {"WSBUS_SECRET": "s3cret"}  # never on a command line
    children = [Child(["nameserver", *args], env=env), Child(["bus", *args], env=env)]
    children.append(Child(["service", "wsbus_cli.demo_services:Echo", *args], env=env))
    kit = Gateways(config)
    try:
        gateway = await kit.gateway("sec")
        client = await kit.client(gateway)
        client.send("echo", "secret ok", id="s")
        assert (await _until(client, "echo.reply"))["content"]["content"] == "secret ok"

        def refused(cfg: PyroConfig) -> Exception:
            try:
                with lookup(cfg.bus_name, cfg) as bus:
                    bus.info()
            except Exception as exc:
                return exc
            raise AssertionError("the bus took a call without the right proof")

        # No secret, or a wrong one: the bus refuses the connection.
        for wrong in (None, "guess"):
            exc = await asyncio.to_thread(refused, msgspec.structs.replace(config, secret=wrong))
            assert isinstance(exc, Pyro5.errors.CommunicationError), exc

        # A daemon that does not know the secret cannot pass itself off as the bus.
        def impostor() -> Exception:
            import Pyro5.api

            from wsbus_pyro.config import SecureDaemon

            @Pyro5.api.expose
            class Fake:
                def info(self) -> dict[str, Any]:
                    return {}

            import threading

            fake = SecureDaemon(msgspec.structs.replace(config, secret=None))
            uri = fake.register(Fake, "fake")
            serving = threading.Thread(target=fake.requestLoop, daemon=True)
            serving.start()
            try:
                with make_proxy(uri, config) as proxy:
                    proxy._pyroBind()
            except Exception as exc:
                return exc
            finally:
                fake.shutdown()
                serving.join(5)
            raise AssertionError("connected to a daemon without the secret")

        assert isinstance(await asyncio.to_thread(impostor), Pyro5.errors.SecurityError)
    finally:
        await kit.close()
        for child in reversed(children):
            await asyncio.to_thread(child.stop)
