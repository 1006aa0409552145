"""Both client connections pass the connection conformance suite: the in-memory fake, and the
websockets adapter on a real socket (127.0.0.1, an ephemeral port)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import ClassVar

import pytest_asyncio
from websockets.asyncio.client import ClientConnection as WsClientConnection
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.typing import Subprotocol

from wsbus import Codec, HandshakeRequest, memory_pair
from wsbus.edge import (
    ClientConnection,
    MemoryClient,
    ReceivesBatch,
    ReceivesRaw,
    ReportsUnsent,
    SendsNowait,
)
from wsbus_testing.connection_conformance import (
    ConnectionConformance,
    MakeConnectionPair,
    Peer,
    WebSocketPeer,
)
from wsbus_websockets._wsconn import (
    EdgeConnection,
    HandshakeGuard,
    RateLimitedLog,
    connection_factory,
)
from wsbus_websockets.server import _Connection

TIMEOUT = 5.0
CLOSE_TIMEOUT = 1.0


class _MemoryPeer:
    """A MemoryClient as a Peer.

    The fake keeps what the gateway sends as bytes; on a socket the codec decides the frame
    type, so a JSON frame is read back as text.
    """

    def __init__(self, client: MemoryClient, codec: Codec) -> None:
        self._client = client
        self._codec = codec

    async def send_text(self, data: str) -> None:
        self._client.send_raw(data)

    async def send_binary(self, data: bytes) -> None:
        self._client.send_raw(data)

    async def receive(self) -> str | bytes:
        data = await self._client.receive_raw(TIMEOUT)
        return data.decode() if self._codec.is_text else data

    async def close(self, code: int, reason: str) -> None:
        self._client.close(code, reason)

    async def wait_closed(self) -> int:
        return await self._client.wait_closed(TIMEOUT)


class TestMemoryConnection(ConnectionConformance):
    # What it takes is in the client's hands at once: nothing is ever unsent, and its
    # receive is no wrapper to skip.
    capabilities = frozenset({SendsNowait, ReceivesBatch})

    @pytest_asyncio.fixture
    async def wsbus_connection_pair(self) -> AsyncIterator[MakeConnectionPair]:
        connections: list[ClientConnection] = []

        async def make(
            codec: Codec, request_headers: dict[str, str] | None = None
        ) -> tuple[ClientConnection, Peer]:
            request = HandshakeRequest(headers=dict(request_headers or {}), remote="memory")
            connection, client = memory_pair(codec, request)
            connections.append(connection)
            return connection, _MemoryPeer(client, codec)

        yield make
        for connection in connections:
            await connection.close(1000)


class TestWebSocketsConnection(ConnectionConformance):
    capabilities = frozenset({SendsNowait, ReceivesRaw, ReceivesBatch, ReportsUnsent})
    compression: ClassVar[str | None] = None
    """permessage-deflate (``"deflate"``) or none, as EdgeServer's default."""

    @pytest_asyncio.fixture
    async def wsbus_connection_pair(self) -> AsyncIterator[MakeConnectionPair]:
        handed: asyncio.Queue[_Connection] = asyncio.Queue()
        finished = asyncio.Event()

        async def handler(ws: ServerConnection) -> None:
            assert ws.request is not None
            assert isinstance(ws, EdgeConnection)
            codec = Codec(ws.subprotocol) if ws.subprotocol else Codec.JSON
            request = HandshakeRequest(
                path=ws.request.path,
                headers={name.lower(): value for name, value in ws.request.headers.raw_items()},
                remote="{}:{}".format(*ws.remote_address[:2]),
            )
            await handed.put(_Connection(ws, codec, request))
            # websockets closes the connection when its handler returns: hold it for the test.
            await finished.wait()

        async with asyncio.timeout(TIMEOUT):
            server = await serve(
                handler,
                "127.0.0.1",
                0,
                subprotocols=[Subprotocol(codec) for codec in Codec],
                compression=self.compression,
                close_timeout=CLOSE_TIMEOUT,
                # _Connection writes through the edge's own connection class.
                create_connection=connection_factory(
                    HandshakeGuard(1024, RateLimitedLog(logging.getLogger("test"))), 1 << 20
                ),
            )
        port = server.sockets[0].getsockname()[1]
        peers: list[WsClientConnection] = []

        async def make(
            codec: Codec, request_headers: dict[str, str] | None = None
        ) -> tuple[ClientConnection, Peer]:
            async with asyncio.timeout(TIMEOUT):
                ws = await connect(
                    f"ws://127.0.0.1:{port}/",
                    subprotocols=[Subprotocol(codec.value)],
                    additional_headers=request_headers,
                    compression=self.compression,
                    close_timeout=CLOSE_TIMEOUT,
                )
                peers.append(ws)
                connection = await handed.get()
            assert ws.subprotocol == codec.value
            if self.compression is not None:
                assert ws.protocol.extensions, "permessage-deflate was negotiated"
            return connection, WebSocketPeer(ws)

        try:
            yield make
        finally:
            finished.set()
            async with asyncio.timeout(TIMEOUT):
                for ws in peers:
                    await ws.close()
                server.close()
                await server.wait_closed()
