"""The attack suite (wsbus_testing.edge_attacks) against the picows edge on 127.0.0.1: the
same cases as the websockets edge's (tests/wsbus_websockets/test_attacks.py)."""

from __future__ import annotations

import pytest

from tests.wsbus_picows.conftest import serve_picows
from wsbus_testing.edge_attacks import EdgeAttacks
from wsbus_testing.edges import ServeEdge


class TestPicowsAttacks(EdgeAttacks):
    @pytest.fixture
    def wsbus_serve_edge(self) -> ServeEdge:
        return serve_picows
