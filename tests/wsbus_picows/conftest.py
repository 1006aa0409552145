"""The picows edge for the tests here: ``serve_picows`` for the edge suites of wsbus_testing
(test_attacks.py, test_server.py), and the kit's ``wsbus_server`` fixture on this edge for
its own tests.

A test that sets ``wsbus_edge_config`` (a ``PicowsConfig``, or the websockets edge's
``EdgeConfig``, whose fields both edges have are carried over) gets those settings here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest_asyncio

from wsbus import Gateway
from wsbus_picows import PicowsConfig, PicowsServer, serve


def picows_config(config: Any) -> PicowsConfig:
    """``config`` (either edge's settings) as the picows edge's."""
    if isinstance(config, PicowsConfig):
        return config
    fields = set(PicowsConfig.__struct_fields__)
    shared = {k: v for k, v in msgspec.structs.asdict(config).items() if k in fields}
    return PicowsConfig(**shared)


async def serve_picows(gateway: Gateway, **settings: Any) -> PicowsServer:
    """The picows edge on ``gateway``, on an ephemeral port of 127.0.0.1 (the suites' factory)."""
    return await serve(gateway, "127.0.0.1", 0, config=PicowsConfig(**settings))


@pytest_asyncio.fixture
async def wsbus_server(
    wsbus_gateway: Gateway, wsbus_edge_config: Any
) -> AsyncIterator[PicowsServer]:
    """``wsbus_gateway`` on a real picows port on 127.0.0.1 (an ephemeral port)."""
    server = await serve(wsbus_gateway, "127.0.0.1", 0, config=picows_config(wsbus_edge_config))
    try:
        yield server
    finally:
        await wsbus_gateway.close()
        await server.close()
