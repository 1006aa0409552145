"""The attack suite (wsbus_testing.edge_attacks) against the websockets edge on 127.0.0.1."""

from __future__ import annotations

from typing import Any

import pytest

from wsbus import Gateway
from wsbus_testing.edge_attacks import EdgeAttacks
from wsbus_testing.edges import ServeEdge
from wsbus_websockets import EdgeConfig, EdgeServer, serve


async def serve_websockets(gateway: Gateway, **settings: Any) -> EdgeServer:
    """The websockets edge on ``gateway``, on an ephemeral port of 127.0.0.1."""
    return await serve(gateway, "127.0.0.1", 0, config=EdgeConfig(**settings))


class TestWebsocketsAttacks(EdgeAttacks):
    @pytest.fixture
    def wsbus_serve_edge(self) -> ServeEdge:
        return serve_websockets
