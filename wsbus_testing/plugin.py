"""The wsbus pytest plugin: fixtures for a gateway on the in-memory bus, and clients.

Loaded automatically (entry point ``pytest11``) when wsbus is installed. It imports nothing
heavy at collection time. Override ``wsbus_services``, ``wsbus_config`` or
``wsbus_plugins`` in a ``conftest.py`` to shape the gateway::

    @pytest.fixture
    def wsbus_services():
        return [MyService()]

    async def test_my_service(wsbus_client, wsbus_gateway):
        wsbus_client.send("my.type", {"x": 1}, id="1")
        assert (await wsbus_client.receive())["type"] == "wsbus.ack"
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from pytest_asyncio import fixture as _async_fixture
else:
    try:
        from pytest_asyncio import fixture as _async_fixture
    except ImportError:  # pragma: no cover - the testing extra is not installed
        # Async fixtures then fail only when a test asks for one, not at pytest start-up.
        _async_fixture = pytest.fixture

if TYPE_CHECKING:
    from wsbus import Gateway, GatewayConfig, HandshakeRequest, MemoryBus, Service
    from wsbus.edge import MemoryClient
    from wsbus.wire import Codec
    from wsbus_cli.supervisor import Child
    from wsbus_pyro import PyroConfig
    from wsbus_websockets import Client, EdgeConfig, EdgeServer

    ConnectFactory = Callable[..., Awaitable[MemoryClient]]
    WsConnectFactory = Callable[..., Awaitable[Client]]


@pytest.fixture
def wsbus_services() -> list[Service]:
    """The services to put on the in-memory bus: none by default. Override to add yours."""
    return []


@pytest.fixture
def wsbus_config() -> GatewayConfig:
    """The gateway's configuration: the defaults, with node id ``test``. Override it."""
    from wsbus import GatewayConfig

    return GatewayConfig(node="test")


@pytest.fixture
def wsbus_plugins() -> list[object]:
    """Plugins for the gateway: none by default. Entry-point plugins are not loaded."""
    return []


@pytest.fixture
def wsbus_bus(wsbus_services: list[Service]) -> MemoryBus:
    """An in-memory bus that records every envelope the gateway publishes."""
    from wsbus import MemoryBus

    return MemoryBus(wsbus_services, record=True)


@_async_fixture
async def wsbus_gateway(
    wsbus_bus: MemoryBus, wsbus_config: GatewayConfig, wsbus_plugins: list[object]
) -> AsyncIterator[Gateway]:
    """A started gateway on ``wsbus_bus``; closed gracefully after the test."""
    from wsbus import Gateway

    gateway = Gateway(wsbus_bus, config=wsbus_config, plugins=wsbus_plugins, entry_points=False)
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.close()


@_async_fixture
async def wsbus_connect(wsbus_gateway: Gateway) -> AsyncIterator[ConnectFactory]:
    """A factory that connects in-memory clients to ``wsbus_gateway``.

    ``await wsbus_connect(codec=Codec.JSON, request=None, buffer=1024, welcome=True)``
    returns a :class:`~wsbus.MemoryClient`; with ``welcome`` it has read the
    ``wsbus.welcome`` frame and set ``client.welcome`` and ``client.conn_id``.
    """
    from wsbus import memory_pair
    from wsbus.wire import Codec

    tasks: list[asyncio.Task[None]] = []

    async def connect(
        codec: Codec = Codec.JSON,
        request: HandshakeRequest | None = None,
        *,
        buffer: int = 1024,
        welcome: bool = True,
    ) -> MemoryClient:
        conn, client = memory_pair(codec, request, buffer=buffer)
        tasks.append(asyncio.create_task(wsbus_gateway.serve(conn)))
        if welcome:
            frame = await client.receive()
            assert frame["type"] == "wsbus.welcome", frame
            client.welcome = frame["content"]
            client.conn_id = frame["content"]["conn_id"]
        return client

    try:
        yield connect
    finally:
        await wsbus_gateway.close()
        for task in tasks:
            if not task.done():
                task.cancel()
        results: list[Any] = await asyncio.gather(*tasks, return_exceptions=True)
        errors = [r for r in results if isinstance(r, Exception)]
        if errors:
            raise errors[0]


@_async_fixture
async def wsbus_client(wsbus_connect: ConnectFactory) -> MemoryClient:
    """One in-memory JSON client, connected and welcomed."""
    return await wsbus_connect()


@pytest.fixture
def wsbus_edge_config() -> EdgeConfig:
    """The WebSocket edge's configuration: the defaults. Override to change it."""
    from wsbus_websockets import EdgeConfig

    return EdgeConfig()


@_async_fixture
async def wsbus_server(
    wsbus_gateway: Gateway, wsbus_edge_config: EdgeConfig
) -> AsyncIterator[EdgeServer]:
    """``wsbus_gateway`` on a real WebSocket port on 127.0.0.1 (an ephemeral port).

    Read ``wsbus_server.url`` and ``wsbus_server.port``. Closed gracefully after the test,
    as ``wsbus serve`` closes: the gateway first (it drains its queues and closes every
    connection with 1001, "server shutting down"), then this edge. Needs the
    ``websockets`` extra.
    """
    from wsbus_websockets import serve

    server = await serve(wsbus_gateway, "127.0.0.1", 0, config=wsbus_edge_config)
    try:
        yield server
    finally:
        # Closing the edge never closes the gateway, and pytest would close the gateway
        # (its own fixture, set up first) only after the edge: its connections would be
        # cut with what was queued for them. Gateway.close is idempotent: the gateway's
        # fixture then has nothing left to do.
        await wsbus_gateway.close()
        await server.close()


@_async_fixture
async def wsbus_ws_connect(wsbus_server: EdgeServer) -> AsyncIterator[WsConnectFactory]:
    """A factory that connects real Python clients to ``wsbus_server``; all closed after.

    ``await wsbus_ws_connect(codec=Codec.JSON, token=None, reconnect=False, **kwargs)``
    returns an open :class:`wsbus_websockets.Client`.
    """
    from wsbus_websockets import connect

    clients: list[Client] = []

    async def open_client(**kwargs: Any) -> Client:
        kwargs.setdefault("reconnect", False)
        client = await connect(wsbus_server.url, **kwargs)
        clients.append(client)
        return client

    try:
        yield open_client
    finally:
        for client in clients:
            await client.close()


@pytest.fixture
def wsbus_pyro_config() -> PyroConfig:
    """Pyro settings for a test: a free name-server port, short intervals and timeouts."""
    from wsbus_cli.supervisor import free_port
    from wsbus_pyro import PyroConfig

    return PyroConfig(ns_port=free_port(), reregister_interval=0.2, comm_timeout=3.0)


def _pyro_args(config: PyroConfig) -> list[str]:
    return ["--ns-host", config.ns_host, "--ns-port", str(config.ns_port)]


def _pyro_env(config: PyroConfig) -> dict[str, str | None]:
    """The child's environment: the secret goes here, never on its command line (``ps``)."""
    from wsbus_cli.config import SECRET_ENV

    # Without a secret, one in this process's environment must not reach the child.
    return {SECRET_ENV: config.secret or None}


@pytest.fixture
def wsbus_nameserver(wsbus_pyro_config: PyroConfig) -> Iterator[Child]:
    """A real Pyro name server process at ``wsbus_pyro_config``'s address."""
    from wsbus_cli.supervisor import Child

    child = Child(["nameserver", *_pyro_args(wsbus_pyro_config)], env=_pyro_env(wsbus_pyro_config))
    try:
        yield child
    finally:
        child.stop()


@pytest.fixture
def wsbus_message_bus(wsbus_nameserver: Child, wsbus_pyro_config: PyroConfig) -> Iterator[Child]:
    """A real message bus process (``wsbus bus``), registered with ``wsbus_nameserver``."""
    from wsbus_cli.supervisor import Child

    child = Child(["bus", *_pyro_args(wsbus_pyro_config)], env=_pyro_env(wsbus_pyro_config))
    try:
        yield child
    finally:
        child.stop()


@pytest.fixture
def wsbus_spawn_service(
    wsbus_message_bus: Child, wsbus_pyro_config: PyroConfig
) -> Iterator[Callable[[str], Child]]:
    """A factory: ``wsbus_spawn_service("module:Class")`` starts a real service process.

    Every process it started is ended (by its own pid) after the test.
    """
    from wsbus_cli.supervisor import Child

    children: list[Child] = []

    def spawn(spec: str) -> Child:
        child = Child(
            ["service", spec, *_pyro_args(wsbus_pyro_config)], env=_pyro_env(wsbus_pyro_config)
        )
        children.append(child)
        return child

    try:
        yield spawn
    finally:
        for child in reversed(children):
            child.stop()
