"""Presence across gateways on the Pyro bus, with real name server, bus and service processes.

A gateway's ``wsbus.presence`` events reach the services that declared the type and every
other gateway (routing rule 5); when a gateway dies, the message bus drops it after
``3 * reregister_interval`` without a check-in and tells the others (``gateway_lost``, in
their streams) and the services (the ``gateway_lost`` event, from the bus itself). Receipts
and acknowledgements travel to their service as any ``to=`` envelope does.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import pytest_asyncio

from tests.conftest import assert_balanced
from wsbus import Codec, Envelope, Gateway, GatewayConfig, Service, memory_pair
from wsbus.edge import MemoryClient
from wsbus.envelope import Recipients
from wsbus.service import Context, handles
from wsbus_pyro import PyroBus, PyroConfig
from wsbus_pyro.transport import lookup
from wsbus_testing.children import Child
from wsbus_websockets import connect

Spawn = Callable[[str], Child]

WAIT = 30.0
"""The bound on every wait here: generous, for a busy two-core machine."""


class Receipted(Service):
    """Sends with receipts and acknowledgements, for these tests.

    ``receipted.send`` ``{"group"}`` sends ``receipted.item`` to the group with
    ``send_with_receipt(ack=True)`` and replies with the merged receipts;
    ``receipted.processed`` replies with every ``wsbus.processed`` it got.
    """

    name = "receipted"

    def __init__(self) -> None:
        self.processed: list[Any] = []

    @handles("receipted.send")
    async def send(self, message: Envelope, ctx: Context) -> None:
        """Send to the group and reply with what became of it at every gateway."""
        recipients = Recipients(groups=(message.content["group"],))
        receipts = await ctx.send_with_receipt(recipients, "receipted.item", "hello", ack=True)
        ctx.reply(msgspec.to_builtins(receipts))

    @handles("wsbus.processed")
    async def acknowledged(self, message: Envelope, ctx: Context) -> None:
        """Keep a client's acknowledgement, as its gateway passed it on."""
        self.processed.append({"from": msgspec.to_builtins(message.sender), **message.content})

    @handles("receipted.processed")
    async def list_processed(self, message: Envelope, ctx: Context) -> None:
        """Reply with the acknowledgements kept so far."""
        ctx.reply({"processed": self.processed})


class Kit:
    """Gateways on the Pyro bus in this process, with in-memory clients; all closed after."""

    def __init__(self, config: PyroConfig) -> None:
        self.config = config
        self.gateways: list[Gateway] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def gateway(self, node: str) -> Gateway:
        config = GatewayConfig(node=node, presence_frames=("room",))
        gateway = Gateway(PyroBus(self.config), config=config, entry_points=False)
        await gateway.start()
        self.gateways.append(gateway)
        return gateway

    async def client(self, gateway: Gateway) -> MemoryClient:
        conn, client = memory_pair(Codec.JSON)
        self.tasks.append(asyncio.create_task(gateway.serve(conn)))
        welcome = await client.receive(WAIT)
        client.conn_id = welcome["content"]["conn_id"]
        return client

    async def close(self) -> None:
        for gateway in self.gateways:
            await gateway.close()
        await asyncio.gather(*self.tasks)


@pytest_asyncio.fixture
async def kit(wsbus_pyro_config: PyroConfig, wsbus_spawn_service: Spawn) -> AsyncIterator[Kit]:
    for spec in (
        "wsbus_testing.services:Director",
        "wsbus_testing.services:Watcher",
        "tests.wsbus_pyro.test_presence:Receipted",
    ):
        await asyncio.to_thread(wsbus_spawn_service, spec)
    kit = Kit(wsbus_pyro_config)
    try:
        yield kit
    finally:
        await kit.close()


async def _join(client: MemoryClient, group: str) -> None:
    client.send("director.join", {"group": group}, id=f"join-{group}")
    reply = await client.receive_until("director.join.reply", WAIT)
    assert reply["content"] == {"joined": True}


async def _presence_frame(client: MemoryClient, event: str, conn_id: str) -> dict[str, Any]:
    """Skip frames until the presence frame of ``event`` for ``conn_id``; return its content."""
    async with asyncio.timeout(WAIT):
        while True:
            frame = await client.receive_until("wsbus.presence", WAIT)
            content: dict[str, Any] = frame["content"]
            if content["event"] == event and content["conn_id"] == conn_id:
                return content


async def _watched(
    client: MemoryClient, predicate: Callable[[list[dict[str, Any]]], bool]
) -> list[dict[str, Any]]:
    """Ask the watcher service for the presence events it got until ``predicate`` holds."""
    async with asyncio.timeout(WAIT):
        n = 0
        while True:
            n += 1
            client.send("watcher.seen", id=f"seen-{n}")
            while True:
                frame = await client.receive_until("watcher.seen.reply", WAIT)
                if frame["reply_to"] == f"seen-{n}":
                    break
            events: list[dict[str, Any]] = frame["content"]["events"]
            if predicate(events):
                return events
            await asyncio.sleep(0.05)


def _about(events: list[dict[str, Any]], event: str, **fields: Any) -> list[dict[str, Any]]:
    return [
        e
        for e in events
        if e["content"]["event"] == event
        and all(e["content"].get(k) == v for k, v in fields.items())
    ]


async def test_presence_events_reach_the_services_and_the_other_gateways(kit: Kit) -> None:
    g1 = await kit.gateway("g1")
    g2 = await kit.gateway("g2")
    ann = await kit.client(g1)
    bob = await kit.client(g2)
    await _join(ann, "room")
    await _join(bob, "room")
    # Bob's join, made on g2, reaches ann on g1 as a frame (through the bus).
    frame = await _presence_frame(ann, "join", bob.conn_id or "")
    assert frame == {
        "group": "room",
        "event": "join",
        "conn_id": bob.conn_id,
        "alias": None,
        "user": None,
    }
    # The watcher service heard both joins, each once, from the gateway it happened on.
    events = await _watched(ann, lambda events: len(_about(events, "join")) >= 2)
    joins = _about(events, "join", group="room")
    assert sorted((e["sender"]["node"], e["content"]["conn_id"]) for e in joins) == [
        ("g1", ann.conn_id),
        ("g2", bob.conn_id),
    ]
    bob.close()
    assert (await _presence_frame(ann, "leave", bob.conn_id or ""))["group"] == "room"
    events = await _watched(ann, lambda events: bool(_about(events, "leave")))
    [leave] = _about(events, "leave")
    assert leave["content"]["conn_id"] == bob.conn_id
    assert leave["content"]["reason"] == "disconnected"
    for gateway in (g1, g2):
        assert_balanced(gateway.stats())


def _bus_info(config: PyroConfig) -> dict[str, Any]:
    with lookup(config.bus_name, config) as bus:
        info: dict[str, Any] = bus.info()
    return info


async def _doomed_gateway(config: PyroConfig, node: str) -> tuple[Child, str]:
    """A ``wsbus serve --bus pyro`` process (to be killed); return it and its URL."""
    args = ["serve", "--bus", "pyro", "--port", "0", "--node", node]
    child = await asyncio.to_thread(
        Child,
        [*args, "--ns-port", str(config.ns_port)],
        ready="listening on",
        env={"WSBUS_SECRET": None},
    )
    match = re.search(r"listening on (\S+)", child.text)
    assert match is not None, child.text
    return child, match.group(1)


async def test_a_killed_gateways_members_leave_and_the_services_hear_it(
    kit: Kit, wsbus_pyro_config: PyroConfig
) -> None:
    """The bound: the bus drops a gateway ``3 * reregister_interval`` after its last
    check-in (at most one interval before the kill), sweeping twice per interval: so at
    most ``3.5 * reregister_interval`` after the kill (3.5 s by default) the other gateways
    send their leave frames and the services hear ``gateway_lost``.
    """
    config = wsbus_pyro_config
    g1 = await kit.gateway("g1")
    ann = await kit.client(g1)
    await _join(ann, "room")
    doomed, url = await _doomed_gateway(config, "gk")
    try:
        async with asyncio.timeout(WAIT), connect(url) as sam:
            reply = await sam.request("director.join", {"group": "room"})
            assert reply["content"] == {"joined": True}
            sam_id = sam.conn_id
            assert sam_id is not None and sam_id.startswith("gk.")
            await _presence_frame(ann, "join", sam_id)
            await asyncio.to_thread(doomed.kill)
            killed = time.monotonic()
            frame = await _presence_frame(ann, "leave", sam_id)
            elapsed = time.monotonic() - killed
    finally:
        await asyncio.to_thread(doomed.stop)
    assert frame["group"] == "room"
    events = await _watched(ann, lambda events: bool(_about(events, "gateway_lost")))
    [lost] = _about(events, "gateway_lost")
    assert lost == {
        "sender": {"type": "gateway", "node": "bus"},
        "content": {"event": "gateway_lost", "node": "gk"},
    }
    # The bus waited for the registration to lapse: its lifetime after the last check-in,
    # which came at most one of the gateway's intervals before the kill (a lower bound
    # only: a busy machine may take longer, never shorter). Both processes were started
    # by the command line, with the default interval.
    info = await asyncio.to_thread(_bus_info, config)
    interval = PyroConfig().reregister_interval
    assert info["lifetime"] == 3 * interval
    assert elapsed >= info["lifetime"] - interval
    print(
        f"gateway killed -> leave frame on another gateway: {elapsed:.2f} s "
        f"(the bus's reregister_interval {interval:g} s: bound 3.5 x interval + delivery)"
    )
    # Exactly once, however long we look.
    events = await _watched(ann, lambda events: True)
    assert len(_about(events, "gateway_lost")) == 1
    assert_balanced(g1.stats())


async def test_a_new_process_with_a_dead_gateways_node_id_ends_its_members(
    kit: Kit, wsbus_pyro_config: PyroConfig
) -> None:
    """A new gateway process that takes a dead one's node id (before the sweep or after)
    ends the dead one's presence exactly once."""
    config = wsbus_pyro_config
    g1 = await kit.gateway("g1")
    ann = await kit.client(g1)
    await _join(ann, "room")
    doomed, url = await _doomed_gateway(config, "gk")
    again: Child | None = None
    try:
        async with asyncio.timeout(WAIT), connect(url) as sam:
            await sam.request("director.join", {"group": "room"})
            sam_id = sam.conn_id
            assert sam_id is not None
            await _presence_frame(ann, "join", sam_id)
            await asyncio.to_thread(doomed.kill)
        again, _ = await _doomed_gateway(config, "gk")
        await _presence_frame(ann, "leave", sam_id)
        events = await _watched(ann, lambda events: bool(_about(events, "gateway_lost")))
        assert len(_about(events, "gateway_lost", node="gk")) == 1
        # The new process is alive: nothing more is said of gk while it runs, not even once
        # the old one's registration would have lapsed.
        await asyncio.sleep((await asyncio.to_thread(_bus_info, config))["lifetime"])
        events = await _watched(ann, lambda events: True)
        assert len(_about(events, "gateway_lost", node="gk")) == 1
    finally:
        await asyncio.to_thread(doomed.stop)
        if again is not None:
            await asyncio.to_thread(again.stop)


async def test_receipts_and_acknowledgements_reach_their_service(kit: Kit) -> None:
    """``wsbus.receipt`` and ``wsbus.processed`` go ``to=`` the sending service, from each
    gateway, as any envelope addressed to a service does."""
    g1 = await kit.gateway("g1")
    g2 = await kit.gateway("g2")
    ann = await kit.client(g1)
    bob = await kit.client(g2)
    await _join(ann, "team")
    await _join(bob, "team")
    ann.send("receipted.send", {"group": "team"}, id="r1")
    items = [await ann.receive_until("receipted.item", WAIT)]
    items.append(await bob.receive_until("receipted.item", WAIT))
    assert all(item["ack"] is True for item in items)
    reply = await ann.receive_until("receipted.send.reply", WAIT)
    receipts = reply["content"]
    assert sorted(receipts["nodes"]) == ["g1", "g2"]
    assert sorted(d["conn_id"] for d in receipts["written"]) == sorted(
        [str(ann.conn_id), str(bob.conn_id)]
    )
    assert receipts.get("dropped", []) == [] and receipts.get("refused", []) == []
    for client, item in ((ann, items[0]), (bob, items[1])):
        client.send("wsbus.processed", {"ids": [item["id"]]})
    async with asyncio.timeout(WAIT):
        while True:
            ann.send("receipted.processed", id="p")
            processed = (await ann.receive_until("receipted.processed.reply", WAIT))["content"]
            if len(processed["processed"]) >= 2:
                break
            await asyncio.sleep(0.05)
    heard = sorted((p["from"]["node"], p["conn_id"], p["ids"][0]) for p in processed["processed"])
    expected = [("g1", ann.conn_id, items[0]["id"]), ("g2", bob.conn_id, items[1]["id"])]
    assert heard == sorted(expected)
    for gateway in (g1, g2):
        assert_balanced(gateway.stats())
