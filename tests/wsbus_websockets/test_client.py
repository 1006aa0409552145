"""The Python client (wsbus_websockets/client.py) against servers that misbehave.

The client's behaviour with the real edge is in tests/wsbus_websockets/test_server.py.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
import pytest_asyncio
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed as WsConnectionClosed
from websockets.typing import Subprotocol

from wsbus import (
    ClientAddress,
    Context,
    Envelope,
    Gateway,
    GatewayConfig,
    Recipients,
    ResumeSettings,
    Service,
    handles,
)
from wsbus.control import Processed
from wsbus.envelope import ConnId
from wsbus.errors import ConnectionClosed, RequestTimeout, WsbusError
from wsbus.history import HistoryConfig
from wsbus.wire import Codec
from wsbus_cli.demo_services import Echo
from wsbus_cli.supervisor import free_port
from wsbus_websockets import RESYNC, Client, connect


async def test_a_server_that_never_welcomes_times_out_the_open_and_is_closed() -> None:
    # The upgrade succeeds with the wsbus subprotocol, then nothing: only open_timeout
    # ends the wait (a gateway would end it with its auth_timeout; this server never does).
    closed: asyncio.Future[tuple[int | None, str | None]] = (
        asyncio.get_running_loop().create_future()
    )

    async def silent(ws: ServerConnection) -> None:
        await ws.wait_closed()
        if not closed.done():
            closed.set_result((ws.close_code, ws.close_reason))

    async with ws_serve(
        silent, "127.0.0.1", 0, subprotocols=[Subprotocol(Codec.JSON.value)]
    ) as server:
        port = server.sockets[0].getsockname()[1]
        async with asyncio.timeout(20):
            with pytest.raises(RequestTimeout) as raised:
                await connect(f"ws://127.0.0.1:{port}/", reconnect=False, open_timeout=0.2)
            assert isinstance(raised.value, TimeoutError) and isinstance(raised.value, WsbusError)
            assert "wsbus.welcome" in str(raised.value)
            # The client closed the socket itself, with a reason that says why.
            assert await closed == (1000, "no wsbus.welcome in time")


@pytest.mark.parametrize(
    ("first", "said"),
    [
        ('{"type": "wsbus.welcome", "id": "gw-1"}', "not an object with a conn_id"),
        ('{"type": "wsbus.welcome", "content": [1]}', "not an object with a conn_id"),
        ('{"type": "wsbus.welcome", "content": {"conn_id": 7}}', "not an object with a conn_id"),
        ('{"type": "wsbus.ack", "content": {}}', "got 'wsbus.ack'"),
        ("[1, 2]", "not a wsbus frame"),
        ('"wsbus.welcome"', "not a wsbus frame"),
        ("{not json", "not a wsbus frame"),
    ],
)
async def test_a_server_whose_first_frame_is_no_welcome_is_closed_with_1002(
    first: str, said: str
) -> None:
    # A hostile or broken server: the client says what it sent wrong, with an error of the
    # wsbus tree, and closes the socket itself (the server's handler sees it end).
    closed: asyncio.Future[tuple[int | None, str | None]] = (
        asyncio.get_running_loop().create_future()
    )

    async def wrong(ws: ServerConnection) -> None:
        await ws.send(first)
        await ws.wait_closed()
        if not closed.done():
            closed.set_result((ws.close_code, ws.close_reason))

    async with ws_serve(
        wrong, "127.0.0.1", 0, subprotocols=[Subprotocol(Codec.JSON.value)]
    ) as server:
        port = server.sockets[0].getsockname()[1]
        url = f"ws://127.0.0.1:{port}/"
        async with asyncio.timeout(20):
            with pytest.raises(ConnectionClosed) as raised:
                await connect(url, reconnect=False, open_timeout=10)
            assert raised.value.code == 1002 and isinstance(raised.value, WsbusError)
            assert said in raised.value.reason and url in raised.value.reason
            assert await closed == (1002, "expected wsbus.welcome")


async def test_a_server_that_never_answers_the_close_has_its_socket_aborted() -> None:
    # A server that completes the upgrade by hand, then reads and never writes: it sends no
    # welcome and never answers the client's close. The client's RequestTimeout comes with
    # the socket gone (the server reads its end), not left for websockets' close_timeout.
    ended: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        key = next(
            line.split(b":", 1)[1].strip()
            for line in request.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        )
        accept = base64.b64encode(
            hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
        )
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n"
            b"Sec-WebSocket-Protocol: " + Codec.JSON.value.encode() + b"\r\n\r\n"
        )
        await writer.drain()
        received = b""
        while chunk := await reader.read(4096):
            received += chunk
        if not ended.done():
            ended.set_result(received)
        writer.close()

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        async with asyncio.timeout(30):
            with pytest.raises(RequestTimeout):
                await connect(f"ws://127.0.0.1:{port}/", reconnect=False, open_timeout=0.2)
            # The server read to the end of the stream: the client closed it. It did send
            # a close frame first (opcode 8, masked: 0x88).
            assert (await ended)[:1] == b"\x88"


async def test_a_gap_comes_in_order_to_receive_and_to_on_gap(
    wsbus_gateway: Gateway, wsbus_ws_connect: Any
) -> None:
    heard: list[dict[str, Any]] = []

    def broken(frame: dict[str, Any]) -> None:
        raise RuntimeError("a bug in the application's callback")

    client = await wsbus_ws_connect(on_gap=heard.append)
    other = await wsbus_ws_connect(on_gap=broken)
    wsbus_gateway.deliveries_lost("slow_consumer", "the bus dropped 3 envelopes")
    async with asyncio.timeout(5):
        frame = await client.receive()
        assert (await other.receive())["type"] == "wsbus.gap"
    assert frame["type"] == "wsbus.gap" and frame["content"]["reason"] == "slow_consumer"
    assert heard == [frame] and client.gaps == 1 and other.gaps == 1
    # The connection goes on: a callback that raised is logged, nothing more.
    reply = await other.request("echo", {"after": "gap"})
    assert reply["content"]["content"] == {"after": "gap"}


# -- resume, resync and acknowledgements, against a gateway played by hand -------------------


class HandGateway:
    """A websockets server on 127.0.0.1 whose connections the test plays, frame by frame."""

    def __init__(self) -> None:
        self.connections: asyncio.Queue[ServerConnection] = asyncio.Queue()
        self.url = ""

    async def handler(self, ws: ServerConnection) -> None:
        await self.connections.put(ws)
        await ws.wait_closed()

    async def accept(self, conn_id: str, token: str | None = None) -> ServerConnection:
        """The next connection, welcomed as ``conn_id`` (offering ``token`` for resume)."""
        async with asyncio.timeout(10):
            ws = await self.connections.get()
        content: dict[str, Any] = {"protocol": "wsbus.v1", "conn_id": conn_id}
        if token is not None:
            content["resume"] = {"token": token, "window": 120.0}
        await ws.send(json.dumps({"type": "wsbus.welcome", "content": content, "id": "w"}))
        return ws


@pytest_asyncio.fixture
async def hand() -> AsyncIterator[HandGateway]:
    gateway = HandGateway()
    async with ws_serve(
        gateway.handler, "127.0.0.1", 0, subprotocols=[Subprotocol(Codec.JSON.value)]
    ) as server:
        gateway.url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
        yield gateway


async def _recv(ws: ServerConnection) -> dict[str, Any]:
    async with asyncio.timeout(10):
        frame: dict[str, Any] = json.loads(await ws.recv())
    return frame


def _message(n: int, group: str = "room.1", epoch: str = "e1", **extra: Any) -> str:
    return json.dumps(
        {
            "type": "chat.message",
            "content": {"n": n},
            "id": f"m{n}",
            "from": "chat",
            "group": group,
            "pos": f"{epoch}:{n}",
            **extra,
        }
    )


async def _open(url: str, **options: Any) -> Client:
    client: Client = await connect(url, **options)
    return client


async def _pair(
    hand: HandGateway, token: str | None = None, **options: Any
) -> tuple[Client, ServerConnection]:
    """A client of ``hand`` and the server's end, welcomed as gw.1 (offering ``token``)."""
    opening = asyncio.create_task(_open(hand.url, **options))
    ws = await hand.accept("gw.1", token=token)
    async with asyncio.timeout(10):
        return await opening, ws


async def _take(client: Any, count: int) -> list[dict[str, Any]]:
    async with asyncio.timeout(10):
        return [await client.receive() for _ in range(count)]


@pytest.mark.parametrize("code", [1012, 4507])
async def test_the_client_resumes_after_a_close_with_its_token_and_positions(
    hand: HandGateway, code: int
) -> None:
    client, first = await _pair(hand, "t1", backoff=(0.01, 0.05))
    try:
        for n in (1, 2):
            await first.send(_message(n))
        await first.send(_message(7, group="room.2"))
        assert [m["content"]["n"] for m in await _take(client, 3)] == [1, 2, 7]
        assert client.positions == {"room.1": "e1:2", "room.2": "e1:7"}
        assert client.resume_token == "t1"
        await first.close(code, "test")
        # The first frame on the new connection is the resume, with the old token.
        second = await hand.accept("gw.2", token="t2")
        resume = await _recv(second)
        assert resume["type"] == "wsbus.resume" and isinstance(resume["id"], str)
        assert resume["content"] == {
            "token": "t1",
            "positions": {"room.1": "e1:2", "room.2": "e1:7"},
        }
        await second.send(
            json.dumps(
                {
                    "type": "wsbus.resumed",
                    "id": "g1",
                    "reply_to": resume["id"],
                    "content": {
                        "conn_id": "gw.2",
                        "alias": "ann",
                        "user": None,
                        "groups": ["room.1", "room.2"],
                        "recovered": ["room.1", "room.2"],
                        "resync": [],
                        "redelivered": 0,
                        "token": "t3",
                    },
                }
            )
        )
        # Replayed, then live: the client goes on where it was, and says nothing else.
        await second.send(_message(3))
        await second.send(_message(4))
        assert [m["content"]["n"] for m in await _take(client, 2)] == [3, 4]
        assert client.positions == {"room.1": "e1:4", "room.2": "e1:7"}
        assert client.resume_token == "t3" and client.conn_id == "gw.2"
        assert (client.reconnects, client.resumes, client.resyncs) == (1, 1, 0)
        assert client.resumed["alias"] == "ann"
        # The new connection is usable once resumed.
        await client.send("chat.say", {"text": "back"})
        assert (await _recv(second))["content"] == {"text": "back"}
    finally:
        await client.close()


async def test_groups_the_gateway_cannot_replay_are_reported_once_as_a_resync(
    hand: HandGateway,
) -> None:
    heard: list[dict[str, Any]] = []
    client, first = await _pair(hand, "t1", backoff=(0.01, 0.05), on_resync=heard.append)
    try:
        await first.send(_message(1))
        await first.send(_message(5, group="room.2"))
        await _take(client, 2)
        await first.close(1001, "going away")
        second = await hand.accept("gw.2", token="t2")
        resume = await _recv(second)
        await second.send(
            json.dumps(
                {
                    "type": "wsbus.resumed",
                    "id": "g1",
                    "reply_to": resume["id"],
                    "content": {
                        "conn_id": "gw.2",
                        "alias": None,
                        "alias_lost": "ann",
                        "user": None,
                        "groups": ["room.1", "room.2"],
                        "recovered": ["room.1"],
                        "resync": ["room.2"],
                        "redelivered": 0,
                        "token": "t3",
                    },
                }
            )
        )
        [resync] = await _take(client, 1)
        assert resync["type"] == RESYNC and heard == [resync]
        content = resync["content"]
        assert content["groups"] == ["room.2"] and content["restored"] is True
        assert content["reason"] == "resync" and content["alias_lost"] == "ann"
        # The group with a hole has no position left: its next message gives one.
        assert client.positions == {"room.1": "e1:1"}
        await second.send(_message(9, group="room.2"))
        assert (await _take(client, 1))[0]["pos"] == "e1:9"
        assert client.resyncs == 1
    finally:
        await client.close()


async def test_a_refused_resume_says_that_nothing_was_restored(hand: HandGateway) -> None:
    client, first = await _pair(hand, "t1", backoff=(0.01, 0.05))
    try:
        await first.send(_message(1))
        await _take(client, 1)
        first.transport.abort()  # lost without a close: 1006
        second = await hand.accept("gw.2", token="t2")
        resume = await _recv(second)
        assert resume["content"]["token"] == "t1"
        await second.send(
            json.dumps(
                {
                    "type": "wsbus.error",
                    "id": "g1",
                    "content": {
                        "code": "resume_failed",
                        "message": "the session expired",
                        "ref": resume["id"],
                        "retry": False,
                    },
                }
            )
        )
        [resync] = await _take(client, 1)
        assert resync["type"] == RESYNC
        assert resync["content"]["restored"] is False
        assert resync["content"]["reason"] == "resume_failed"
        assert resync["content"]["groups"] == ["room.1"]
        assert "the session expired" in resync["content"]["message"]
        # A new session: no positions, and the new connection's token for next time.
        assert client.positions == {} and client.resume_token == "t2"
        assert (client.reconnects, client.resumes) == (1, 0)
        # A gateway that offers no resume: the reconnect says the session started over.
        second.transport.abort()
        third = await hand.accept("gw.3")
        [resync] = await _take(client, 1)
        assert resync["content"]["reason"] == "not_offered"
        assert resync["content"]["restored"] is False
        await client.send("after", None)
        assert (await _recv(third))["type"] == "after"
    finally:
        await client.close()


async def test_a_client_resumes_another_clients_session_when_given_its_token(
    hand: HandGateway,
) -> None:
    first, server = await _pair(hand, "t1", reconnect=False)
    await server.send(_message(3))
    await _take(first, 1)
    saved = (first.resume_token, first.positions)
    await first.close()
    # A program that restarted: the same session, the same positions.
    opening = asyncio.create_task(
        _open(hand.url, reconnect=False, resume_token=saved[0], positions=saved[1])
    )
    second = await hand.accept("gw.2", token="t2")
    resume = await _recv(second)
    assert resume["content"] == {"token": "t1", "positions": {"room.1": "e1:3"}}
    await second.send(
        json.dumps(
            {
                "type": "wsbus.resumed",
                "id": "g1",
                "reply_to": resume["id"],
                "content": {"conn_id": "gw.2", "groups": ["room.1"], "resync": [], "token": "t3"},
            }
        )
    )
    async with asyncio.timeout(10):
        client = await opening
    try:
        assert client.resumes == 1 and client.resume_token == "t3"
    finally:
        await client.close()


async def _acked(ws: ServerConnection) -> list[str]:
    frame = await _recv(ws)
    assert frame["type"] == "wsbus.processed", frame
    ids: list[str] = frame["content"]["ids"]
    return ids


async def test_acknowledgements_come_on_arrival_or_once_the_application_is_done(
    hand: HandGateway,
) -> None:
    client, ws = await _pair(hand, reconnect=False, ack_types={"task.run"})
    try:
        # Not opted in: acknowledged as it arrives, before the application reads it.
        await ws.send(json.dumps({"type": "note", "content": 1, "id": "n1", "ack": True}))
        assert await _acked(ws) == ["n1"]
        # Opted in: acknowledged when the application asks for the next message.
        await ws.send(json.dumps({"type": "task.run", "content": 2, "id": "t1", "ack": True}))
        await ws.send(json.dumps({"type": "task.run", "content": 3, "id": "t2", "ack": True}))
        await ws.send(json.dumps({"type": "plain", "content": 4, "id": "p1"}))
        [note, t1] = await _take(client, 2)
        assert (note["id"], t1["id"]) == ("n1", "t1")
        [t2] = await _take(client, 1)  # done with t1
        assert t2["id"] == "t2" and await _acked(ws) == ["t1"]
        # An explicit processed() acknowledges at once, and once.
        client.processed(t2)
        client.processed(t2)
        assert await _acked(ws) == ["t2"]
        await ws.send(json.dumps({"type": "plain", "content": 5, "id": "p2"}))
        [plain, _] = await _take(client, 2)
        assert plain["id"] == "p1"
        # A frame that asked for nothing is never acknowledged. close() sends what is
        # waiting before its close frame: nothing but the close comes.
        await client.close()
        with pytest.raises(WsConnectionClosed):
            await _recv(ws)
        assert ws.close_code == 1000
    finally:
        await client.close()


async def test_manual_acknowledgements_and_a_burst_in_few_frames(hand: HandGateway) -> None:
    client, ws = await _pair(hand, reconnect=False, ack_types={"*"}, manual_ack=True)
    try:
        for n in range(300):
            await ws.send(json.dumps({"type": "job", "content": n, "id": f"j{n}", "ack": True}))
        jobs = await _take(client, 300)
        await client.send("probe", None)
        # Nothing acknowledged yet: the application has not said it processed anything.
        assert (await _recv(ws))["type"] == "probe"
        for job in jobs:
            client.processed(job)
        # In two frames (256 ids at most in one), not 300.
        ids = await _acked(ws) + await _acked(ws)
        assert ids == [f"j{n}" for n in range(300)]
    finally:
        await client.close()


async def test_redelivered_and_replayed_frames_the_application_has_are_dropped(
    hand: HandGateway,
) -> None:
    client, first = await _pair(hand, "t1", backoff=(0.01, 0.05), ack_types={"task.run"})
    try:
        # m1 processed (its ack is lost with the connection), m2 still in the application's
        # hands, m3 never arrives; all three ask for an ack.
        for n in (1, 2):
            await first.send(_message(n, type="task.run", ack=True))
        [m1] = await _take(client, 1)
        [m2] = await _take(client, 1)
        assert (m1["id"], m2["id"]) == ("m1", "m2")
        assert await _acked(first) == ["m1"]
        await first.close(4507, "slow consumer: messages were missed")
        second = await hand.accept("gw.2", token="t2")
        resume = await _recv(second)
        assert resume["content"]["positions"] == {"room.1": "e1:2"}
        await second.send(
            json.dumps(
                {
                    "type": "wsbus.resumed",
                    "id": "g1",
                    "reply_to": resume["id"],
                    "content": {
                        "groups": ["room.1"],
                        "resync": [],
                        "redelivered": 3,
                        "token": "t3",
                    },
                }
            )
        )
        # Redelivered (the unacknowledged ones, m3 among them, ahead of the replay), then
        # the replay from e1:2 (m3 again), then live.
        for n in (1, 2, 3):
            await second.send(_message(n, type="task.run", ack=True))
        await second.send(_message(3, type="task.run", ack=True))
        await second.send(_message(4))
        await second.send(_message(2))  # a position already had: dropped
        # m1 was processed: its acknowledgement is said again; m2 and m3 once processed.
        assert await _acked(second) == ["m1"]
        async with asyncio.timeout(10):
            while client.duplicates < 4:  # every frame read (m3's second copy included)
                await asyncio.sleep(0.01)
        [m3] = await _take(client, 1)  # done with m2
        assert m3["id"] == "m3" and await _acked(second) == ["m2"]
        [m4] = await _take(client, 1)  # done with m3
        assert m4["id"] == "m4" and await _acked(second) == ["m3"]
        assert client.duplicates == 4
        assert client.positions == {"room.1": "e1:4"}
        await client.send("probe", None)
        assert (await _recv(second))["type"] == "probe"
        assert client._incoming.empty()
    finally:
        await client.close()


# -- resume and acknowledgements with a real gateway (memory bus, real WebSocket edge) -------


class Room(Service):
    """Joins, sends to groups and connections (with an ack asked, or not), closes clients,
    and keeps the acknowledgements the gateway passes on."""

    name = "room"

    def __init__(self) -> None:
        self.processed: list[Processed] = []
        self.heard = asyncio.Event()

    @handles("room.join")
    async def join(self, message: Envelope, ctx: Context) -> None:
        assert isinstance(message.sender, ClientAddress)
        await ctx.join(message.sender.conn_id, message.content["group"])
        if "alias" in message.content:
            await ctx.set_alias(message.sender.conn_id, message.content["alias"])
        ctx.reply({"ok": True})

    @handles("room.send")
    async def send(self, message: Envelope, ctx: Context) -> None:
        to = message.content
        recipients = (
            Recipients(groups=(to["group"],))
            if "group" in to
            else Recipients(conn_ids=(ConnId(to["conn_id"]),))
        )
        ctx.send(recipients, to.get("type", "room.item"), to["body"], ack=to.get("ack", False))
        ctx.reply({"ok": True})

    @handles("room.kick")
    async def kick(self, message: Envelope, ctx: Context) -> None:
        await ctx.disconnect(ConnId(message.content["conn_id"]), message.content["code"], "test")
        ctx.reply({"ok": True})

    @handles("wsbus.processed")
    async def acked(self, message: Envelope, ctx: Context) -> None:
        self.processed.append(msgspec.convert(message.content, Processed))
        self.heard.set()

    async def acks(self, count: int) -> list[str]:
        """The ids acknowledged, once there are at least ``count``."""
        async with asyncio.timeout(10):
            while sum(len(p.ids) for p in self.processed) < count:
                self.heard.clear()
                await self.heard.wait()
        return [frame_id for p in self.processed for frame_id in p.ids]


@pytest.fixture
def wsbus_services() -> list[Service]:
    return [Echo(), Room()]


@pytest.fixture
def wsbus_config() -> GatewayConfig:
    return GatewayConfig(
        node="test", history=HistoryConfig(groups=("room.*",)), resume=ResumeSettings(window=30)
    )


def _room(services: list[Service]) -> Room:
    return next(service for service in services if isinstance(service, Room))


async def _away(client: Client, staff: Client, code: int, gateway: Gateway) -> str:
    """Have the gateway close ``client`` with ``code``; keep ``client`` away until _back().

    Closed by the gateway itself (as at shutdown or for a slow consumer): a service's
    ``ctx.disconnect`` would end the session for good (not resumable).
    """
    url, client.url = client.url, f"ws://127.0.0.1:{free_port()}/"
    old = client.conn_id
    assert old is not None
    gateway._sessions[ConnId(old)].close(code, "closed by the gateway", flush=True)
    async with asyncio.timeout(10):
        while any(info.conn_id == old for info in gateway.clients()):
            await asyncio.sleep(0.01)
    return url


async def _items(client: Client, count: int) -> list[Any]:
    found: list[Any] = []
    async with asyncio.timeout(10):
        while len(found) < count:
            message = await client.receive()
            if message["type"] == "room.item":
                found.append(message["content"])
    return found


@pytest.mark.parametrize("code", [1001, 4507])
async def test_a_client_closed_by_the_gateway_resumes_and_misses_nothing(
    wsbus_gateway: Gateway, wsbus_ws_connect: Any, code: int
) -> None:
    client = await wsbus_ws_connect(reconnect=True, backoff=(0.01, 0.05))
    staff = await wsbus_ws_connect()
    await client.request("room.join", {"group": "room.1", "alias": "ann"})
    for n in (1, 2):
        await staff.request("room.send", {"group": "room.1", "body": n})
    assert await _items(client, 2) == [1, 2]
    epoch = client.positions["room.1"].split(":")[0]
    assert client.positions == {"room.1": f"{epoch}:2"}
    # Closed by the gateway; while it is away, the room goes on.
    url = await _away(client, staff, code, wsbus_gateway)
    for n in (3, 4):
        await staff.request("room.send", {"group": "room.1", "body": n})
    client.url = url
    assert await _items(client, 2) == [3, 4]
    assert (client.reconnects, client.resumes, client.resyncs) == (1, 1, 0)
    assert client.resumed["alias"] == "ann" and client.resumed["groups"] == ["room.1"]
    # Still in the room, with its alias: live messages come, positions go on.
    await staff.request("room.send", {"group": "room.1", "body": 5})
    assert await _items(client, 1) == [5]
    assert client.positions == {"room.1": f"{epoch}:5"}
    [info] = [info for info in wsbus_gateway.clients() if info.conn_id == client.conn_id]
    assert info.alias == "ann" and info.groups == ("room.1",)


async def test_a_group_without_history_is_reported_as_a_resync(
    wsbus_gateway: Gateway, wsbus_ws_connect: Any
) -> None:
    heard: list[dict[str, Any]] = []
    client = await wsbus_ws_connect(reconnect=True, backoff=(0.01, 0.05), on_resync=heard.append)
    staff = await wsbus_ws_connect()
    await client.request("room.join", {"group": "room.1"})
    await client.request("room.join", {"group": "plain.1"})
    await staff.request("room.send", {"group": "room.1", "body": 1})
    assert await _items(client, 1) == [1]
    client.url = await _away(client, staff, 1001, wsbus_gateway)
    async with asyncio.timeout(10):
        while True:
            message = await client.receive()
            if message["type"] == RESYNC:
                break
    assert heard == [message]
    assert message["content"]["groups"] == ["plain.1"] and message["content"]["restored"]
    assert sorted(client.resumed["groups"]) == ["plain.1", "room.1"]


async def test_acknowledgements_reach_the_service_and_redeliveries_are_dropped(
    wsbus_gateway: Gateway, wsbus_ws_connect: Any, wsbus_services: list[Service]
) -> None:
    room = _room(wsbus_services)
    client = await wsbus_ws_connect(
        reconnect=True, backoff=(0.01, 0.05), ack_types={"task.run"}, manual_ack=True
    )
    staff = await wsbus_ws_connect()
    me = client.conn_id
    for type, body in (("note", 1), ("task.run", 2), ("task.run", 3)):
        await staff.request("room.send", {"conn_id": me, "type": type, "body": body, "ack": True})
    async with asyncio.timeout(10):
        note, two, three = [await client.receive() for _ in range(3)]
    assert note["ack"] is True and (two["content"], three["content"]) == (2, 3)
    # The note on arrival; task 2 when the application says so; task 3 not yet.
    assert await room.acks(1) == [note["id"]]
    client.processed(two)
    assert await room.acks(2) == [note["id"], two["id"]]
    assert room.processed[0].conn_id == me
    # Lost with task 3 unacknowledged: the resume redelivers it, the client has it already.
    client.url = await _away(client, staff, 4507, wsbus_gateway)
    async with asyncio.timeout(10):
        while client.duplicates < 1:
            await asyncio.sleep(0.01)
    assert client.resumed["redelivered"] == 1 and client._incoming.empty()
    client.processed(three)
    assert await room.acks(3) == [note["id"], two["id"], three["id"]]
