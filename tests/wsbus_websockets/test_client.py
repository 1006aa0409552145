"""The Python client (wsbus_websockets/client.py) against servers that misbehave.

The client's behaviour with the real edge is in tests/wsbus_websockets/test_server.py.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.typing import Subprotocol

from wsbus import Gateway
from wsbus.errors import ConnectionClosed, RequestTimeout, WsbusError
from wsbus.wire import Codec
from wsbus_websockets import connect


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
