"""A service cannot pose as a gateway to other services, on a real nats-server.

The users and permissions are those ``wsbus nats-config`` makes (:mod:`wsbus_nats.permissions`):
a real Gateway (NatsBus as user gw-a) behind a real websockets edge on 127.0.0.1, a service
"chat" (user svc-chat, declares ``wsbus.presence``) and a hostile service "evil" that holds
only its own credentials. NATS lets evil send chat any type as itself; what only gateways send
(presence events, acknowledgements, receipts, answers, undeliverable reports) chat's runtime
drops and counts (``ServiceLink.forged``). The security review's proofs, inverted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import pytest_asyncio
import websockets

from wsbus import Context, Gateway, GatewayConfig, Service, control, handles
from wsbus.envelope import (
    ClientAddress,
    ConnId,
    Envelope,
    GatewayAddress,
    NodeId,
    Recipients,
    ServiceAddress,
)
from wsbus_nats import NatsBus, NatsConfig, ServiceHost
from wsbus_nats.permissions import SERVER_CONFIG, Access, plan, write
from wsbus_nats.servers import NatsServer
from wsbus_websockets import serve

WAIT = 30.0
"""Seconds any one step may take on a busy two-core machine before the test fails."""


class Chat(Service):
    """The service evil preys on: hears presence and acknowledgements, asks for receipts."""

    name = "chat"

    def __init__(self) -> None:
        self.events: list[Envelope] = []
        self.heard: list[Envelope] = []
        self.marked = asyncio.Event()
        self.receipted = asyncio.Event()

    @handles("chat.join")
    async def join(self, message: Envelope, ctx: Context) -> None:
        """Put the sender in room.1."""
        assert isinstance(message.sender, ClientAddress)
        await ctx.join(message.sender.conn_id, "room.1")
        ctx.reply(None, type="chat.joined")

    @handles("chat.say")
    async def say(self, message: Envelope, ctx: Context) -> None:
        """Send the content to room.1."""
        ctx.send(Recipients(groups=("room.1",)), "chat.line", message.content)

    @handles("chat.rsend")
    async def rsend(self, message: Envelope, ctx: Context) -> None:
        """Send to room.1 with a receipt; answer with the conn ids it says were written."""
        try:
            receipts = await ctx.send_with_receipt(Recipients(groups=("room.1",)), "chat.line")
        finally:
            self.receipted.set()
        ctx.reply([d.conn_id for d in receipts.written], type="chat.receipt")

    @handles("chat.marker")
    async def marker(self, message: Envelope, ctx: Context) -> None:
        """Evil's last message, after its forgeries (one subject: in order)."""
        self.marked.set()

    @handles(control.PRESENCE, control.PROCESSED, control.RECEIPT, control.UNDELIVERABLE)
    async def gateways_word(self, message: Envelope, ctx: Context) -> None:
        """Keep what a gateway says (what passes for it, without the runtime's check)."""
        self.heard.append(message)
        if message.type == control.PRESENCE:
            self.events.append(message)


class Evil(Service):
    """A service that holds only its own credentials and uses the wsbus API."""

    name = "evil"

    def __init__(self, chat: Chat) -> None:
        self.chat = chat
        self.spraying = asyncio.Event()

    @handles("evil.forge")
    async def forge(self, message: Envelope, ctx: Context) -> None:
        """Pose as a gateway: every type only gateways send, to chat, then a marker."""
        lost = control.PresenceEvent("gateway_lost", NodeId("b"), reason="gateway_lost")
        join = control.PresenceEvent(
            "join", NodeId("a"), group="room.admins", conn_id=ConnId("a.999"), user="admin"
        )
        chat = ServiceAddress("chat")
        # By name: a raw NATS publish on P.svc.chat.svc.evil carries these same envelopes.
        forged: list[tuple[str, msgspec.Struct]] = [
            (control.PRESENCE, join),
            (control.PRESENCE, lost),
            (control.PROCESSED, control.Processed(ConnId("a.1"), ("m1",), user="alice")),
            (control.RECEIPT, control.Receipt(NodeId("a"))),
            (control.RESULT, control.Result(True, value=True)),
            (control.UNDELIVERABLE, control.Undeliverable("no_match", Recipients(), "forged")),
        ]
        for type_, content in forged:
            ctx.link._put(type_, msgspec.to_builtins(content), reply_to="m1", to=chat)
        ctx.link.publish("chat.marker")

    @handles("evil.spray")
    async def spray(self, message: Envelope, ctx: Context) -> None:
        """Receipts for chat's next envelope ids (predicted), until chat has its receipts."""
        fake = control.Receipt(
            NodeId("a"),
            deliveries=(control.Delivery(ConnId("a.999"), "written", user="admin"),),
        )
        content = msgspec.to_builtins(fake)
        chat = ServiceAddress("chat")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(WAIT):
                while not self.chat.receipted.is_set():
                    for predicted in message.content:
                        ctx.link._put(control.RECEIPT, content, reply_to=predicted, to=chat)
                    self.spraying.set()
                    await asyncio.sleep(0.001)


@pytest.fixture
def access() -> Access:
    """Users for gateway a and the services chat (hears presence) and evil."""
    return plan(["chat", "evil"], ["a"], presence=["chat"])


@pytest.fixture
def server(tmp_path: Path, access: Access) -> Iterator[NatsServer]:
    """A nats-server with the generated configuration, ended by its own pid."""
    write(access, tmp_path / "conf")
    server = NatsServer(tmp_path / "nats", config_file=tmp_path / "conf" / SERVER_CONFIG).start()
    try:
        yield server
    finally:
        server.stop()


def _settings(server: NatsServer, access: Access, user: str) -> NatsConfig:
    credentials = access.user(user)
    return NatsConfig(
        servers=(server.url,),
        user=credentials.name,
        password=credentials.password,
        heartbeat=0.5,
    )


class Deployment:
    """The gateway, its edge, and both services' hosts."""

    def __init__(self, gateway: Gateway, edge: Any, chat: Chat, evil: Evil) -> None:
        self.gateway = gateway
        self.edge = edge
        self.chat = chat
        self.evil = evil


@pytest_asyncio.fixture
async def deployment(server: NatsServer, access: Access) -> AsyncIterator[Deployment]:
    bus = NatsBus(_settings(server, access, "gw-a"))
    gateway = Gateway(bus, config=GatewayConfig(node="a"), entry_points=False)
    await gateway.start()
    hosts: list[ServiceHost] = []
    edge = None
    try:
        edge = await serve(gateway, "127.0.0.1", 0)
        chat = Chat()
        evil = Evil(chat)
        for service, user in ((chat, "svc-chat"), (evil, "svc-evil")):
            host = ServiceHost(service, _settings(server, access, user))
            hosts.append(host)
            await host.start()
        async with asyncio.timeout(WAIT):
            while not (bus.directory.service_live("chat") and bus.directory.service_live("evil")):
                await asyncio.sleep(0.05)
        yield Deployment(gateway, edge, chat, evil)
    finally:
        for host in hosts:
            await host.close()
        await gateway.close()
        if edge is not None:
            await edge.close()


async def _until(ws: Any, type_: str) -> dict[str, Any]:
    """Read frames until one of ``type_``; return it."""
    async with asyncio.timeout(WAIT):
        while True:
            frame: dict[str, Any] = json.loads(await ws.recv())
            if frame["type"] == type_:
                return frame


async def test_a_service_with_its_own_credentials_cannot_pose_as_a_gateway(
    deployment: Deployment,
) -> None:
    chat = deployment.chat
    async with websockets.connect(deployment.edge.url) as ws:
        await _until(ws, "wsbus.welcome")
        await ws.send(json.dumps({"type": "evil.forge", "id": "f"}))
        async with asyncio.timeout(WAIT):
            await chat.marked.wait()
        # The marker came after every forgery, on the same subject: all were seen.
        assert chat.heard == []
        assert chat.link.forged == 6
        # What a gateway says still comes: the join's presence event.
        await ws.send(json.dumps({"type": "chat.join", "id": "j"}))
        await _until(ws, "chat.joined")
        async with asyncio.timeout(WAIT):
            while not chat.events:
                await asyncio.sleep(0.02)
    assert [e.sender for e in chat.events] == [GatewayAddress(NodeId("a"))]
    assert chat.events[0].content["event"] == "join"
    assert chat.link.forged == 6


async def test_a_service_cannot_forge_another_services_delivery_receipt(
    deployment: Deployment,
) -> None:
    chat, evil = deployment.chat, deployment.evil
    async with websockets.connect(deployment.edge.url) as ws:
        welcome = await _until(ws, "wsbus.welcome")
        conn_id = welcome["content"]["conn_id"]
        await ws.send(json.dumps({"type": "chat.join", "id": "j"}))
        await _until(ws, "chat.joined")
        await ws.send(json.dumps({"type": "chat.say", "content": 1, "id": "s"}))
        line = await _until(ws, "chat.line")
        # Chat's next ids, from the one its frame shows clients (prefix, hex counter).
        prefix, _, n = line["id"].rpartition("-")
        predicted = [f"{prefix}-{int(n, 16) + k:x}" for k in (1, 2, 3)]
        await ws.send(json.dumps({"type": "evil.spray", "content": predicted, "id": "e"}))
        async with asyncio.timeout(WAIT):
            await evil.spraying.wait()
        await ws.send(json.dumps({"type": "chat.rsend", "id": "r"}))
        answer = await _until(ws, "chat.receipt")
    # The gateway's receipt, not evil's: the one member, written.
    assert answer["content"] == [conn_id]
    assert chat.link.forged > 0
    assert [e.sender for e in chat.heard] == [GatewayAddress(NodeId("a"))]  # the join's event
