"""The ASGI edge for the tests here: ``serve_asgi`` for the edge suites of wsbus_testing
(test_attacks.py, test_edge.py): the gateway's ASGI application under a real uvicorn
server, in this process, on an ephemeral port of 127.0.0.1."""

from __future__ import annotations

from typing import Any

from wsbus import Gateway
from wsbus_asgi import AsgiConfig, AsgiServer, serve


async def serve_asgi(gateway: Gateway, **settings: Any) -> AsgiServer:
    """The ASGI edge on ``gateway`` under uvicorn (the suites' factory)."""
    return await serve(gateway, "127.0.0.1", 0, config=AsgiConfig(**settings))
