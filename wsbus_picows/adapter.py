"""The picows edge as an adapter of the ``wsbus`` command (entry point ``wsbus.edges``).

Importing this module imports no ``picows``: the command loads every installed adapter to
build its ``--help``; the library is imported when the edge is used.
"""

from __future__ import annotations

import argparse
from typing import Any

import msgspec

from wsbus.gateway import Gateway
from wsbus_cli.adapters import Listening, Section, add_edge_flags, edge_flags, hookimpl


def _config() -> type[msgspec.Struct]:
    from .server import PicowsConfig

    return PicowsConfig


class PicowsAdapter:
    """Clients over WebSocket, on the ``picows`` library.

    Attributes:
        name: ``picows``.
        description: one line for ``wsbus --help``.
        section: the ``[picows]`` table, read into :class:`wsbus_picows.PicowsConfig`.
    """

    name = "picows"
    description = "WebSocket clients, on picows (faster frames; wsbus[picows])"
    section: Section | None = Section(
        "picows",
        _config,
        "picows",
        "the picows edge (`PicowsConfig`)",
        flags=edge_flags("picows-"),
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
        """Put ``gateway`` on a WebSocket port (see :func:`wsbus_picows.serve`)."""
        from .server import PicowsConfig, serve

        if config is None:
            config = PicowsConfig()
        if static_dir is not None:
            config = msgspec.structs.replace(config, static_dir=static_dir)
        server: Listening = await serve(gateway, host, port, config=config)
        return server

    @hookimpl
    def wsbus_cli_options(self, command: str, parser: argparse.ArgumentParser) -> None:
        """Add the picows edge's flags (origins, static files, metrics) to ``wsbus serve``."""
        if command != "serve":
            return
        add_edge_flags(parser, "picows", "picows-", "picows edge (--edge picows)")


picows = PicowsAdapter()
"""The ``picows`` entry point of ``wsbus.edges``."""
