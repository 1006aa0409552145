"""The attack suite (wsbus_testing.edge_attacks) against the websockets edge on 127.0.0.1."""

from __future__ import annotations

import pytest

from tests.wsbus_websockets.conftest import serve_websockets
from wsbus_testing.edge_attacks import EdgeAttacks
from wsbus_testing.edges import ServeEdge


class TestWebsocketsAttacks(EdgeAttacks):
    @pytest.fixture
    def wsbus_serve_edge(self) -> ServeEdge:
        return serve_websockets
