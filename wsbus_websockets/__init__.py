"""The WebSocket edge adapter for wsbus, on the ``websockets`` library, and a Python client.

Importing this package costs nothing: ``websockets`` is imported when a name is first used,
and a missing extra fails with an error that says ``pip install 'wsbus[websockets]'``.

- :func:`serve` puts a started :class:`wsbus.Gateway` on a WebSocket port.
- :func:`connect` opens a Python client connection to a wsbus gateway.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from wsbus.extras import lazy_exports

if TYPE_CHECKING:
    from .client import RECONNECT_CODES, RESYNC, Client, connect
    from .server import TOKEN_SUBPROTOCOL_PREFIX, EdgeConfig, EdgeServer, serve

__all__ = [
    "RECONNECT_CODES",
    "RESYNC",
    "TOKEN_SUBPROTOCOL_PREFIX",
    "Client",
    "EdgeConfig",
    "EdgeServer",
    "connect",
    "serve",
]

_WHERE = {
    "TOKEN_SUBPROTOCOL_PREFIX": "server",
    "EdgeConfig": "server",
    "EdgeServer": "server",
    "serve": "server",
    "Client": "client",
    "RECONNECT_CODES": "client",
    "RESYNC": "client",
    "connect": "client",
}


__getattr__ = lazy_exports(__name__, _WHERE, "websockets", "websockets")
