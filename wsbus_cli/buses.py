"""The in-memory bus as an adapter of the ``wsbus`` command (``wsbus serve --bus memory``).

:class:`wsbus.MemoryBus` is the core's; the core knows nothing of entry points, so its
adapter object lives here, in the composition root, registered like any other under the
``wsbus.buses`` group.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

from wsbus.bus import Bus
from wsbus.memory import MemoryBus
from wsbus.service import Service

from .adapters import Section

__all__ = ["MemoryAdapter", "memory"]


class MemoryAdapter:
    """The in-memory bus: services run in the gateway's process; nothing to start.

    Attributes:
        name: ``memory``.
        description: one line for ``wsbus --help``.
        section: None (it has no settings).
        runs_services: True: ``--service MODULE:CLASS`` runs in the gateway's process.
    """

    name = "memory"
    description = "services in the gateway's own process (nothing else to run)"
    section: Section | None = None
    runs_services = True

    @contextlib.asynccontextmanager
    async def open(self, config: Any, services: Sequence[Service]) -> AsyncIterator[Bus]:
        """Yield a :class:`wsbus.MemoryBus` with ``services``."""
        yield MemoryBus(list(services))

    @contextlib.asynccontextmanager
    async def demo(
        self, options: argparse.Namespace, services: Sequence[str]
    ) -> AsyncIterator[Bus]:
        """Yield a :class:`wsbus.MemoryBus` running the demo's services in this process."""
        from .cli import load_service_spec

        yield MemoryBus([load_service_spec(spec, "demo service") for spec in services])


memory = MemoryAdapter()
"""The ``memory`` entry point of ``wsbus.buses``."""
