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
from wsbus_cli.adapters import Listening, Section, hookimpl


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
        flags={
            "allowed_origins": "--asgi-origin",
            "static_dir": "--asgi-static",
            "metrics_path": "--asgi-metrics",
            "metrics_from": "--asgi-metrics-from",
        },
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
        group = parser.add_argument_group("ASGI edge (--edge asgi)")
        group.add_argument(
            "--asgi-origin",
            dest="asgi.allowed_origins",
            action="append",
            default=None,
            metavar="ORIGIN",
            help="an allowed browser origin besides the server's own (repeatable)",
        )
        group.add_argument(
            "--asgi-static",
            dest="asgi.static_dir",
            metavar="DIR",
            default=None,
            help="a directory to serve over HTTP",
        )
        group.add_argument(
            "--asgi-metrics",
            dest="asgi.metrics_path",
            metavar="PATH",
            default=None,
            help="serve Prometheus metrics at PATH, e.g. /metrics (off without it; needs "
            "wsbus[metrics])",
        )
        group.add_argument(
            "--asgi-metrics-from",
            dest="asgi.metrics_from",
            action="append",
            default=None,
            metavar="NETWORK",
            help="a network that may read the metrics (repeatable; loopback by default)",
        )


asgi = AsgiAdapter()
"""The ``asgi`` entry point of ``wsbus.edges``."""
