"""The WebSocket edge as an adapter of the ``wsbus`` command (entry point ``wsbus.edges``).

Importing this module imports no ``websockets``: the command loads every installed adapter
to build its ``--help``; the library is imported when the edge is used.
"""

from __future__ import annotations

import argparse
from typing import Any

import msgspec

from wsbus.gateway import Gateway
from wsbus_cli.adapters import Listening, Section, add_edge_flags, edge_flags, hookimpl


def _config() -> type[msgspec.Struct]:
    from .server import EdgeConfig

    return EdgeConfig


class WebSocketsAdapter:
    """Clients over WebSocket, on the ``websockets`` library.

    Attributes:
        name: ``websockets``.
        description: one line for ``wsbus --help``.
        section: the ``[websockets]`` table, read into :class:`wsbus_websockets.EdgeConfig`.
    """

    name = "websockets"
    description = "WebSocket clients (browsers, wsbus_websockets.connect), on websockets"
    section: Section | None = Section(
        "websockets",
        _config,
        "websockets",
        "the WebSocket edge (`EdgeConfig`)",
        flags=edge_flags(""),
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
        """Put ``gateway`` on a WebSocket port (see :func:`wsbus_websockets.serve`)."""
        from . import serve

        if static_dir is not None:
            config = msgspec.structs.replace(config, static_dir=static_dir)
        server: Listening = await serve(gateway, host, port, config=config)
        return server

    @hookimpl
    def wsbus_cli_options(self, command: str, parser: argparse.ArgumentParser) -> None:
        """Add the WebSocket edge's flags (origins, static files, metrics) to ``wsbus serve``."""
        if command != "serve":
            return
        add_edge_flags(parser, "websockets", "", "WebSocket edge")


websockets = WebSocketsAdapter()
"""The ``websockets`` entry point of ``wsbus.edges``."""
