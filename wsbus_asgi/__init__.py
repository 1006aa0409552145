"""The ASGI edge for wsbus: a gateway's WebSocket endpoint in Starlette, FastAPI or any ASGI 3 app.

- :func:`app` returns a gateway's endpoint as an ASGI application, to mount in a host
  application or run alone under an ASGI server (docs/asgi.md). It needs no extra.
- :func:`serve` runs it under uvicorn on a port of its own, on the running loop (what
  ``wsbus serve --edge asgi`` does); uvicorn is imported on first use, and a missing extra
  fails with an error that says ``pip install 'wsbus[asgi]'``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from wsbus.extras import lazy_exports

from .application import App, AsgiConfig, app

if TYPE_CHECKING:
    from .server import AsgiServer, serve, uvicorn_options

__all__ = ["App", "AsgiConfig", "AsgiServer", "app", "serve", "uvicorn_options"]

_WHERE = {"AsgiServer": "server", "serve": "server", "uvicorn_options": "server"}

__getattr__ = lazy_exports(__name__, _WHERE, "uvicorn", "asgi")
