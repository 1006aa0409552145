"""The WebSocket edge adapter for wsbus, on the ``websockets`` library.

Not in this release yet: the core's :class:`wsbus.ClientConnection` interface is what it
will implement. Importing this package costs nothing; using it will need
``pip install 'wsbus[websockets]'``.
"""

from __future__ import annotations

__all__: list[str] = []
