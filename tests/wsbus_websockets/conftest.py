"""The websockets edge for the edge suites of wsbus_testing (test_attacks.py, test_server.py)."""

from __future__ import annotations

from typing import Any

from wsbus import Gateway
from wsbus_websockets import EdgeConfig, EdgeServer, serve


async def serve_websockets(gateway: Gateway, **settings: Any) -> EdgeServer:
    """The websockets edge on ``gateway``, on an ephemeral port of 127.0.0.1 (the factory)."""
    return await serve(gateway, "127.0.0.1", 0, config=EdgeConfig(**settings))
