"""The Pyro5 bus adapter for wsbus.

Not in this release yet: the core's :class:`wsbus.Bus` interface is what it will implement.
Importing this package costs nothing; using it will need ``pip install 'wsbus[pyro]'``.
"""

from __future__ import annotations

__all__: list[str] = []
