"""The picows edge's client connection passes the connection conformance suite, on a real
socket (127.0.0.1, an ephemeral port), with the ``websockets`` client as the peer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest_asyncio
from websockets.asyncio.client import ClientConnection as WsClientConnection
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

from wsbus import Codec, Gateway, GatewayConfig, MemoryBus
from wsbus.edge import ClientConnection, ReceivesBatch, ReportsUnsent, SendsNowait
from wsbus_picows import PicowsConfig, PicowsServer
from wsbus_testing.connection_conformance import (
    ConnectionConformance,
    MakeConnectionPair,
    Peer,
    WebSocketPeer,
)

TIMEOUT = 5.0
CLOSE_TIMEOUT = 1.0


class _HandingServer(PicowsServer):
    """The edge without a gateway's serve: each connection is handed to the test."""

    def __init__(self, config: PicowsConfig) -> None:
        super().__init__(Gateway(MemoryBus([]), config=GatewayConfig(node="conf")), config)
        self.handed: asyncio.Queue[ClientConnection] = asyncio.Queue()

    def _opened(self, connection: ClientConnection) -> None:
        self.handed.put_nowait(connection)


class TestPicowsConnection(ConnectionConformance):
    # Its receive is picows' frames from a queue of its own: no translating wrapper to skip,
    # so it does not offer ReceivesRaw (see docs/picows.md).
    capabilities = frozenset({SendsNowait, ReceivesBatch, ReportsUnsent})

    @pytest_asyncio.fixture
    async def wsbus_connection_pair(self) -> AsyncIterator[MakeConnectionPair]:
        config = PicowsConfig(close_timeout=CLOSE_TIMEOUT, ping_interval=None)
        server = _HandingServer(config)
        async with asyncio.timeout(TIMEOUT):
            await server.start("127.0.0.1", 0)
        peers: list[WsClientConnection] = []
        connections: list[ClientConnection] = []

        async def make(
            codec: Codec, request_headers: dict[str, str] | None = None
        ) -> tuple[ClientConnection, Peer]:
            async with asyncio.timeout(TIMEOUT):
                ws = await connect(
                    server.url,
                    subprotocols=[Subprotocol(codec.value)],
                    additional_headers=request_headers,
                    compression=None,
                    close_timeout=CLOSE_TIMEOUT,
                )
                peers.append(ws)
                connection = await server.handed.get()
                connections.append(connection)
            assert ws.subprotocol == codec.value
            return connection, WebSocketPeer(ws)

        try:
            yield make
        finally:
            async with asyncio.timeout(TIMEOUT):
                for ws in peers:
                    await ws.close()
                for connection in connections:
                    await connection.close(1000)
                await server.close()
