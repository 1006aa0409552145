"""The WebSocket edge adapter for wsbus, on the ``websockets`` library, and a Python client.

Importing this package costs nothing: ``websockets`` is imported when a name is first used,
and a missing extra fails with an error that says ``pip install 'wsbus[websockets]'``.

- :func:`serve` puts a started :class:`wsbus.Gateway` on a WebSocket port.
- :func:`connect` opens a Python client connection to a wsbus gateway.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from wsbus.errors import MissingExtra

if TYPE_CHECKING:
    from .client import RECONNECT_CODES, Client, ClientClosed, ServerError, connect
    from .server import TOKEN_SUBPROTOCOL_PREFIX, EdgeConfig, EdgeServer, serve

__all__ = [
    "RECONNECT_CODES",
    "TOKEN_SUBPROTOCOL_PREFIX",
    "Client",
    "ClientClosed",
    "EdgeConfig",
    "EdgeServer",
    "ServerError",
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
    "ClientClosed": "client",
    "ServerError": "client",
    "connect": "client",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'wsbus_websockets' has no attribute {name!r}")
    try:
        importlib.import_module("websockets")
    except ImportError as exc:
        raise MissingExtra("websockets") from exc
    return getattr(importlib.import_module(f".{module}", __name__), name)
