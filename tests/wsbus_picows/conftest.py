"""The kit's ``wsbus_server`` fixture, on the picows edge: the websockets edge's attack and
hardening tests run here unchanged, against ``wsbus_picows``.

A test that sets ``wsbus_edge_config`` (a ``wsbus_websockets.EdgeConfig``) gets the same
settings on this edge: the fields both edges have are carried over.
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
