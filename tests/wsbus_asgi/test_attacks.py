"""The attack suite (wsbus_testing.edge_attacks) against the ASGI edge: the gateway's ASGI
application under a real uvicorn server on 127.0.0.1, the same cases as the websockets
edge's (tests/wsbus_websockets/test_attacks.py).

Every case applies at the ASGI layer: the frames and handshakes it sends reach uvicorn,
which parses them (invalid UTF-8: 1007; a frame over ``ws_max_size``, which
``wsbus_asgi.serve`` sets to the gateway's frame cap: 1009) and hands the rest to the
application, which checks the handshake (origin, subprotocols) as the other edges do.
"""

from __future__ import annotations

import pytest

from tests.wsbus_asgi.conftest import serve_asgi
from wsbus_testing.edge_attacks import EdgeAttacks
from wsbus_testing.edges import ServeEdge


class TestAsgiAttacks(EdgeAttacks):
    @pytest.fixture
    def wsbus_serve_edge(self) -> ServeEdge:
        return serve_asgi

    @pytest.fixture(autouse=True)
    def _cases_below_the_asgi_layer(self, request: pytest.FixtureRequest) -> None:
        if request.node.name.endswith("[upgrade-twice]"):
            # uvicorn's own handshake parser (websockets') answers a repeated Upgrade header
            # with 426, a 4xx as the case asks, before any application sees the request;
            # the case expects the 400 of wsbus's own parsers.
            pytest.skip("uvicorn answers a repeated Upgrade header itself (426), below ASGI")
