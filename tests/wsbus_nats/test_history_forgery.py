"""A service cannot silence or disorder a group's history at gateways, on a real nats-server.

The users and permissions are those ``wsbus nats-config`` makes (:mod:`wsbus_nats.permissions`):
a real Gateway (NatsBus as user gw-a, ``room.*`` keeping history) behind a real websockets
edge on 127.0.0.1, a service "chat" (user svc-chat) that sends to room.1, and a hostile
service "evil" that holds only its own credentials, through the wsbus API or by hand (a raw
nats-py connection as svc-evil). The security review's proofs, inverted.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import nats.aio.client
import pytest
import pytest_asyncio
import websockets

import wsbus_nats.bus
from wsbus import Context, Gateway, GatewayConfig, HistoryConfig, Service, handles
from wsbus.envelope import (
    ClientAddress,
    ConnId,
    Envelope,
    EnvelopeId,
    Recipients,
    ServiceAddress,
    encode_envelope,
)
from wsbus.history import GROUP_HEADER, POSITION_HEADER
from wsbus_nats import NatsBus, NatsConfig, ServiceHost
from wsbus_nats.bus import SEQ_HEADER
from wsbus_nats.permissions import SERVER_CONFIG, Access, plan, write
from wsbus_nats.servers import NatsServer
from wsbus_nats.subjects import FROM_SERVICE, Subjects
from wsbus_websockets import serve

WAIT = 30.0
"""Seconds any one step may take on a busy two-core machine before the test fails."""
QUIET = 1.5
"""Seconds without a frame after which a client is taken to have everything (the reorder
stage waits 0.2 s for a hole before it fetches)."""
SUBJECTS = Subjects("wsbus")
ROOM = Recipients(groups=("room.1",))


class Chat(Service):
    """Puts a client in room.1 and says what it is told there."""

    name = "chat"

    @handles("chat.join")
    async def join(self, message: Envelope, ctx: Context) -> None:
        """Put the sender in room.1."""
        assert isinstance(message.sender, ClientAddress)
        await ctx.join(message.sender.conn_id, "room.1")
        ctx.reply(None, type="chat.joined")

    @handles("chat.say")
    async def say(self, message: Envelope, ctx: Context) -> None:
        """Send the content to room.1."""
        ctx.send(ROOM, "chat.line", message.content)


class Evil(Service):
    """Sends to room.1 a message of its own that carries a position it made up."""

    name = "evil"

    @handles("evil.poison")
    async def poison(self, message: Envelope, ctx: Context) -> None:
        """The proof's message: its own, with a position far ahead; and one to the sender."""
        headers = {GROUP_HEADER: "room.1", POSITION_HEADER: message.content}
        ctx.link.send(ROOM, "evil.noise", None, headers=headers)
        assert isinstance(message.sender, ClientAddress)
        ctx.link.send(
            Recipients(conn_ids=(message.sender.conn_id,)), "evil.direct", None, headers=headers
        )


@pytest.fixture
def access() -> Access:
    """Users for gateway a and the services chat and evil."""
    return plan(["chat", "evil"], ["a"])


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
        servers=(server.url,), user=credentials.name, password=credentials.password, heartbeat=0.5
    )


class Deployment:
    """The gateway, its bus and edge, and evil's raw NATS connection."""

    def __init__(self, gateway: Gateway, bus: NatsBus, edge: Any, raw: nats.aio.client.Client):
        self.gateway = gateway
        self.bus = bus
        self.edge = edge
        self.raw = raw


@pytest_asyncio.fixture
async def deployment(server: NatsServer, access: Access) -> AsyncIterator[Deployment]:
    bus = NatsBus(_settings(server, access, "gw-a"))
    config = GatewayConfig(node="a", history=HistoryConfig(groups=("room.*",)))
    gateway = Gateway(bus, config=config, entry_points=False)
    await gateway.start()
    hosts: list[ServiceHost] = []
    edge = raw = None
    try:
        edge = await serve(gateway, "127.0.0.1", 0)
        for service, user in ((Chat(), "svc-chat"), (Evil(), "svc-evil")):
            host = ServiceHost(service, _settings(server, access, user))
            hosts.append(host)
            await host.start()
        evil = access.user("svc-evil")
        raw = await nats.connect(
            server.url,
            user=evil.name,
            password=evil.password,
            inbox_prefix=SUBJECTS.inbox(FROM_SERVICE, "evil"),
            allow_reconnect=False,
        )
        async with asyncio.timeout(WAIT):
            while not (bus.directory.service_live("chat") and bus.directory.service_live("evil")):
                await asyncio.sleep(0.05)
        yield Deployment(gateway, bus, edge, raw)
    finally:
        if raw is not None:
            await raw.close()
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


async def _frames(ws: Any, lines: int) -> list[dict[str, Any]]:
    """Read frames until ``lines`` chat.line frames came and then none for QUIET seconds."""
    frames: list[dict[str, Any]] = []
    async with asyncio.timeout(WAIT):
        while sum(f["type"] == "chat.line" for f in frames) < lines:
            frames.append(json.loads(await ws.recv()))
    while True:
        try:
            async with asyncio.timeout(QUIET):
                frames.append(json.loads(await ws.recv()))
        except TimeoutError:
            return frames


async def _member(ws: Any) -> tuple[ConnId, str]:
    """Join room.1 and have chat say 1 there; return the conn id and that line's position."""
    welcome = await _until(ws, "wsbus.welcome")
    await ws.send(json.dumps({"type": "chat.join", "id": "j"}))
    await _until(ws, "chat.joined")
    await ws.send(json.dumps({"type": "chat.say", "content": 1, "id": "s1"}))
    line = await _until(ws, "chat.line")
    return ConnId(welcome["content"]["conn_id"]), line["pos"]


async def _say(ws: Any, *numbers: int) -> None:
    for n in numbers:
        await ws.send(json.dumps({"type": "chat.say", "content": n, "id": f"s{n}"}))


def _offsets(frames: list[dict[str, Any]], type_: str) -> list[int]:
    return [int(f["pos"].rpartition(":")[2]) for f in frames if f["type"] == type_]


def _noise(n: int, recipients: Recipients, pos: str) -> Envelope:
    """An envelope of evil's, carrying a history position it chose."""
    return Envelope(
        id=EnvelopeId(f"evil-raw-{n}"),
        type="evil.noise",
        sender=ServiceAddress("evil"),
        recipients=recipients,
        headers={GROUP_HEADER: "room.1", POSITION_HEADER: pos},
    )


async def test_a_service_cannot_silence_a_groups_history_with_a_position_of_its_own(
    deployment: Deployment,
) -> None:
    async with websockets.connect(deployment.edge.url) as ws:
        _, pos = await _member(ws)
        epoch = pos.rpartition(":")[0]
        await ws.send(json.dumps({"type": "evil.poison", "content": f"{epoch}:999999999"}))
        noise = await _until(ws, "evil.noise")
        direct = await _until(ws, "evil.direct")
        await _say(ws, 2, 3, 4)
        frames = await _frames(ws, 3)
    # Evil's message took its place in history as any other (its own position dropped),
    # its message to one connection has none: chat's 2, 3, 4 follow, none silenced, no gap.
    assert noise["pos"] == f"{epoch}:2"
    assert "pos" not in direct and "group" not in direct
    assert [f["content"] for f in frames if f["type"] == "chat.line"] == [2, 3, 4]
    assert _offsets(frames, "chat.line") == [3, 4, 5]
    assert not [f for f in frames if f["type"] == "wsbus.gap"]
    assert deployment.gateway.stats().history_duplicates == 0
    # Dropped by evil's runtime: nothing forged reached the gateway.
    assert deployment.bus.history_counters.mismatches == 0


async def test_a_gateway_believes_no_position_the_history_stream_does_not_hold(
    deployment: Deployment, caplog: pytest.LogCaptureFixture
) -> None:
    raw, subject = deployment.raw, SUBJECTS.to_gateway("a", "evil")
    async with websockets.connect(deployment.edge.url) as ws:
        conn_id, pos = await _member(ws)
        far = f"{pos.rpartition(':')[0]}:999999999"
        forged = [
            # Published by hand on evil's own subject to the gateway: naming chat's entry,
            # naming none, and addressed to one connection.
            (_noise(1, ROOM, far), {SEQ_HEADER: "1"}),
            (_noise(2, ROOM, far), None),
            (_noise(3, Recipients(conn_ids=(conn_id,)), far), {SEQ_HEADER: "1"}),
            (_noise(4, ROOM, "elsewhere-1:2"), {SEQ_HEADER: "999"}),
        ]
        for envelope, headers in forged:
            await raw.publish(subject, encode_envelope(envelope), headers=headers)
        await raw.flush()
        await _say(ws, 2, 3, 4)
        frames = await _frames(ws, 3)
    # Each forgery reached the member as evil's message, without a position; chat's
    # genuine 2, 3, 4 came in order after 1, none silenced, no gap.
    noise = [f for f in frames if f["type"] == "evil.noise"]
    assert sorted(f["id"] for f in noise) == [f"evil-raw-{n}" for n in (1, 2, 3, 4)]
    assert not [f for f in noise if "pos" in f or "group" in f]
    assert [f["content"] for f in frames if f["type"] == "chat.line"] == [2, 3, 4]
    assert _offsets(frames, "chat.line") == [2, 3, 4]
    assert not [f for f in frames if f["type"] == "wsbus.gap"]
    assert deployment.bus.history_counters.mismatches >= 4
    assert deployment.gateway.stats().history_duplicates == 0
    # Said once (rate-limited), naming the service whose credentials were used.
    said = [r.getMessage() for r in caplog.records if r.name == "wsbus.nats.gateway"]
    assert [m for m in said if "from service 'evil' without the history position" in m]


async def test_a_position_appended_by_hand_is_the_streams_and_history_goes_on_after_it(
    deployment: Deployment,
) -> None:
    """What remains (docs/nats.md): evil appends by hand, as itself, an entry far ahead and
    sends it with its sequence. The stream holds it, so the gateway believes it (members
    get a gap), but chat's later messages are appended after it and all arrive."""
    raw = deployment.raw
    async with websockets.connect(deployment.edge.url) as ws:
        _, pos = await _member(ws)
        far = f"{pos.rpartition(':')[0]}:999999999"
        envelope = _noise(1, ROOM, far)
        data = encode_envelope(envelope)
        ack = await raw.jetstream().publish(SUBJECTS.history("room.1", "evil"), data)
        await raw.publish(
            SUBJECTS.to_gateway("a", "evil"), data, headers={SEQ_HEADER: str(ack.seq)}
        )
        await raw.flush()
        await _until(ws, "evil.noise")
        await _say(ws, 2, 3, 4)
        frames = await _frames(ws, 3)
    assert [f["content"] for f in frames if f["type"] == "chat.line"] == [2, 3, 4]
    assert _offsets(frames, "chat.line") == [1_000_000_000, 1_000_000_001, 1_000_000_002]
    assert deployment.gateway.stats().history_duplicates == 0


async def test_a_service_cannot_make_another_services_history_sends_fail_by_taking_its_ids(
    deployment: Deployment,
) -> None:
    raw = deployment.raw
    async with websockets.connect(deployment.edge.url) as ws:
        _, pos = await _member(ws)
        line = pos.rpartition(":")[0]
        # Chat's next envelope ids, from the one its frames show clients (prefix, hex
        # counter), stored first as de-duplication ids of evil's own entries.
        await _say(ws, 2)
        said = await _until(ws, "chat.line")
        prefix, _, n = said["id"].rpartition("-")
        js = raw.jetstream()
        for k in (1, 2, 3):
            predicted = f"{prefix}-{int(n, 16) + k:x}"
            envelope = _noise(k, ROOM, f"{line}:{2 + k}")
            await js.publish(
                SUBJECTS.history("room.1", "evil"),
                encode_envelope(envelope),
                headers={"Nats-Msg-Id": predicted},
            )
        await _say(ws, 3, 4)
        frames = await _frames(ws, 2)
    # Chat's sends were appended (after evil's entries) and delivered.
    assert [f["content"] for f in frames if f["type"] == "chat.line"] == [3, 4]
    assert _offsets(frames, "chat.line") == [6, 7]


async def test_a_flood_of_positions_by_hand_holds_back_only_its_own_service(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wsbus_nats.bus, "HOLD_LIMIT", 2)
    raw, subject = deployment.raw, SUBJECTS.to_gateway("a", "evil")
    async with websockets.connect(deployment.edge.url) as ws:
        _, pos = await _member(ws)
        far = f"{pos.rpartition(':')[0]}:999999999"
        for n in range(200):
            await raw.publish(
                subject, encode_envelope(_noise(n, ROOM, far)), headers={SEQ_HEADER: "1"}
            )
        await raw.flush()
        await _say(ws, 2, 3, 4)
        frames = await _frames(ws, 3)
    # Evil's excess was dropped and said (a gap); chat's messages all came, in order.
    counters = deployment.bus.history_counters
    assert counters.overflows > 0
    assert counters.overflows + len([f for f in frames if f["type"] == "evil.noise"]) == 200
    assert [f for f in frames if f["type"] == "wsbus.gap"]
    assert [f["content"] for f in frames if f["type"] == "chat.line"] == [2, 3, 4]
    assert _offsets(frames, "chat.line") == [2, 3, 4]
