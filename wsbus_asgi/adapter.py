"""The ASGI edge as an adapter of the ``wsbus`` command (entry point ``wsbus.edges``).

``wsbus serve --edge asgi`` runs the gateway's ASGI application under uvicorn, started on
the command's own event loop. Importing this module imports no ``uvicorn``: the command
loads every installed adapter to build its ``--help``; uvicorn is imported when the edge is
used (``pip install 'wsbus[asgi]'`` when it is missing).
"""

from __future__ import annotations

import argparse
from typing import Any

import msgspec

from wsbus.gateway import Gateway
from wsbus_cli.adapters import Listening, Section, add_edge_flags, edge_flags, hookimpl


def _config() -> type[msgspec.Struct]:
    from .application import AsgiConfig

    return AsgiConfig


class AsgiAdapter:
    """Clients over WebSocket, through the gateway's ASGI application under uvicorn.

    Attributes:
        name: ``asgi``.
        description: one line for ``wsbus --help``.
        section: the ``[asgi]`` table, read into :class:`wsbus_asgi.AsgiConfig`.
    """

    name = "asgi"
    description = "WebSocket clients through the ASGI application, under uvicorn (wsbus[asgi])"
    section: Section | None = Section(
        "asgi",
        _config,
        "asgi",
        "the ASGI edge (`AsgiConfig`)",
        flags=edge_flags("asgi-"),
    )

    async def serve(
        self,
        gateway: Gateway,
        host: str,
        port: int,
        config: Any,
        *,
        static_dir: str | None = None,
    ) -> Listening:
        """Put ``gateway`` on a port under uvicorn (see :func:`wsbus_asgi.serve`)."""
        from wsbus.errors import MissingExtra

        from .application import AsgiConfig

        try:
            from .server import serve
        except ImportError as exc:
            raise MissingExtra("asgi") from exc
        if config is None:
            config = AsgiConfig()
        if static_dir is not None:
            config = msgspec.structs.replace(config, static_dir=static_dir)
        server: Listening = await serve(gateway, host, port, config=config)
        return server

    @hookimpl
    def wsbus_cli_options(self, command: str, parser: argparse.ArgumentParser) -> None:
        """Add the ASGI edge's flags (origins, static files, metrics) to ``wsbus serve``."""
        if command != "serve":
            return
        add_edge_flags(parser, "asgi", "asgi-", "ASGI edge (--edge asgi)")


asgi = AsgiAdapter()
"""The ``asgi`` entry point of ``wsbus.edges``."""
