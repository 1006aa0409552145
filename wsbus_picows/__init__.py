"""A second WebSocket edge for wsbus, on the ``picows`` library (extra ``picows``).

Importing this package costs nothing: ``picows`` is imported when a name is first used,
and a missing extra fails with an error that says ``pip install 'wsbus[picows]'``.

- :func:`serve` puts a started :class:`wsbus.Gateway` on a WebSocket port, as
  ``wsbus_websockets.serve`` does, with picows parsing the frames.

The command line selects it with ``wsbus serve --edge picows`` (see docs/picows.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from wsbus.extras import lazy_exports

if TYPE_CHECKING:
    from .server import TOKEN_SUBPROTOCOL_PREFIX, PicowsConfig, PicowsServer, serve

__all__ = ["TOKEN_SUBPROTOCOL_PREFIX", "PicowsConfig", "PicowsServer", "serve"]

_WHERE = {name: "server" for name in __all__}

__getattr__ = lazy_exports(__name__, _WHERE, "picows", "picows")
