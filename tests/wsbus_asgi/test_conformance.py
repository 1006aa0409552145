"""The ASGI edge's client connection passes the connection conformance suite, on a real
uvicorn server (in this process, 127.0.0.1, an ephemeral port), with the ``websockets``
client as the peer.

It offers none of the optional fast paths: ASGI's ``send`` and ``receive`` are coroutines,
one message each, and say nothing of what reached the socket (docs/asgi.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest_asyncio
from websockets.asyncio.client import ClientConnection as WsClientConnection
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

from wsbus import Codec, Gateway, GatewayConfig, MemoryBus
from wsbus.edge import ClientConnection
from wsbus_asgi import App, AsgiConfig, AsgiServer
from wsbus_testing.connection_conformance import (
    ConnectionConformance,
    MakeConnectionPair,
    Peer,
    WebSocketPeer,
)

TIMEOUT = 5.0
CLOSE_TIMEOUT = 1.0


class _HandingApp(App):
    """The application without a gateway's serve: each connection is handed to the test."""

    def __init__(self, gateway: Gateway, config: AsgiConfig) -> None:
        super().__init__(gateway, config, lifespan=False)
        self.handed: asyncio.Queue[ClientConnection] = asyncio.Queue()
        self.finished = asyncio.Event()

    async def _serve(self, connection: ClientConnection) -> None:
        self.handed.put_nowait(connection)
        # The server ends the connection when the application returns: hold it for the test.
        await self.finished.wait()


class TestAsgiConnection(ConnectionConformance):
    capabilities = frozenset()
    mount: str | None = None
    """Where the application is mounted in a FastAPI application (None: it runs alone)."""

    @pytest_asyncio.fixture
    async def wsbus_connection_pair(self) -> AsyncIterator[MakeConnectionPair]:
        config = AsgiConfig(ping_interval=None, close_timeout=CLOSE_TIMEOUT)
        gateway = Gateway(MemoryBus([]), config=GatewayConfig(node="conf"))
        app = _HandingApp(gateway, config)
        host: Any = None
        if self.mount is not None:
            from fastapi import FastAPI

            host = FastAPI()
            host.mount(self.mount, app)
        server = AsgiServer(gateway, config, app, host)
        async with asyncio.timeout(TIMEOUT):
            await server.start("127.0.0.1", 0)
        url = server.url if self.mount is None else f"{server.url.rstrip('/')}{self.mount}/"
        peers: list[WsClientConnection] = []
        connections: list[ClientConnection] = []

        async def make(
            codec: Codec, request_headers: dict[str, str] | None = None
        ) -> tuple[ClientConnection, Peer]:
            async with asyncio.timeout(TIMEOUT):
                ws = await connect(
                    url,
                    subprotocols=[Subprotocol(codec.value)],
                    additional_headers=request_headers,
                    compression=None,
                    close_timeout=CLOSE_TIMEOUT,
                )
                peers.append(ws)
                connection = await app.handed.get()
                connections.append(connection)
            assert ws.subprotocol == codec.value
            return connection, WebSocketPeer(ws)

        try:
            yield make
        finally:
            app.finished.set()
            async with asyncio.timeout(TIMEOUT):
                for ws in peers:
                    await ws.close()
                for connection in connections:
                    await connection.close(1000)
                await server.close()


class TestAsgiConnectionMountedInFastAPI(TestAsgiConnection):
    """The same suite with the application mounted at /ws in a FastAPI application."""

    mount = "/ws"
