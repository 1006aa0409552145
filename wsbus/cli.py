"""The ``wsbus`` command line.

::

    wsbus demo                       everything, with a web page, on one machine
    wsbus nameserver                 a Pyro name server (127.0.0.1:9090)
    wsbus bus                        the Pyro message bus
    wsbus service MODULE:CLASS       a wsbus Service as a Pyro service process
    wsbus serve --bus memory|pyro    a gateway on a WebSocket port

Errors a user can act on (a port taken, no name server) print one line and exit 1; they
never print a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from ._version import __version__
from .errors import WsbusError

__all__ = ["main"]

log = logging.getLogger("wsbus.cli")


def _pyro_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Pyro")
    group.add_argument("--ns-host", default="127.0.0.1", help="name server host (127.0.0.1)")
    group.add_argument("--ns-port", type=int, default=9090, help="name server port (9090)")
    group.add_argument(
        "--pyro-host",
        default="127.0.0.1",
        help="address this process's Pyro daemon binds (127.0.0.1: only this machine)",
    )
    group.add_argument(
        "--secret",
        default=os.environ.get("WSBUS_SECRET"),
        help="shared secret every Pyro peer must know (default: $WSBUS_SECRET; none)",
    )


def _pyro_config(args: argparse.Namespace) -> Any:
    from wsbus_pyro import PyroConfig

    return PyroConfig(
        ns_host=args.ns_host, ns_port=args.ns_port, host=args.pyro_host, secret=args.secret
    )


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser for ``wsbus``."""
    parser = argparse.ArgumentParser(
        prog="wsbus",
        description="A WebSocket gateway between clients and internal services over a bus.",
    )
    parser.add_argument("--version", action="version", version=f"wsbus {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="run everything on this machine, with a web page (chat rooms, nicknames, echo)",
        description=(
            "Start a Pyro name server, the message bus and the demo services as processes, "
            "and a gateway serving the demo page; print its URL. Ctrl-C stops them all."
        ),
    )
    demo.add_argument(
        "--bus",
        choices=("pyro", "memory"),
        default="pyro",
        help="pyro: services as their own processes (default); memory: in this process",
    )
    demo.add_argument("--host", default="127.0.0.1", help="address of the page (127.0.0.1)")
    demo.add_argument("--port", type=int, default=8765, help="port of the page (8765)")
    demo.add_argument("--no-browser", action="store_true", help="do not open the page in a browser")

    ns = commands.add_parser("nameserver", help="run a Pyro name server")
    _pyro_options(ns)

    bus = commands.add_parser("bus", help="run the Pyro message bus")
    _pyro_options(bus)

    service = commands.add_parser("service", help="run a wsbus Service as a Pyro process")
    service.add_argument("spec", metavar="MODULE:CLASS", help="the Service subclass to run")
    _pyro_options(service)

    serve = commands.add_parser("serve", help="run a gateway on a WebSocket port")
    serve.add_argument("--bus", choices=("memory", "pyro"), default="memory", help="the bus")
    serve.add_argument("--host", default="127.0.0.1", help="WebSocket address (127.0.0.1)")
    serve.add_argument("--port", type=int, default=8765, help="WebSocket port (8765)")
    serve.add_argument(
        "--service",
        action="append",
        default=[],
        metavar="MODULE:CLASS",
        help="with --bus memory: a service to run in-process (repeatable)",
    )
    serve.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE",
        help="a plugin module to register (repeatable)",
    )
    serve.add_argument(
        "--origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="an allowed browser origin besides the server's own (repeatable)",
    )
    serve.add_argument("--static", default=None, help="a directory to serve over HTTP")
    serve.add_argument("--max-connections", type=int, default=10_000, help="connection cap")
    serve.add_argument(
        "--rate", type=float, default=100.0, help="messages a second per connection (100)"
    )
    serve.add_argument("--node", default=None, help="this gateway's node id (random)")
    _pyro_options(serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        if args.command == "demo":
            from .demo import run_demo

            asyncio.run(
                run_demo(
                    bus=args.bus, host=args.host, port=args.port, open_browser=not args.no_browser
                )
            )
        elif args.command == "nameserver":
            from wsbus_pyro import run_name_server

            run_name_server(_pyro_config(args))
        elif args.command == "bus":
            from wsbus_pyro import run_bus

            run_bus(_pyro_config(args))
        elif args.command == "service":
            from wsbus_pyro import run_service

            run_service(args.spec, _pyro_config(args))
        elif args.command == "serve":
            asyncio.run(_serve(args))
    except (WsbusError, OSError) as exc:
        print(f"wsbus {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


async def _serve(args: argparse.Namespace) -> None:
    from wsbus import Gateway, GatewayConfig, MemoryBus
    from wsbus_websockets import EdgeConfig, serve

    from .errors import ConfigError

    plugins = [importlib.import_module(name) for name in args.plugin]
    config = GatewayConfig(node=args.node, max_connections=args.max_connections, rate=args.rate)
    bus: Any
    if args.bus == "memory":
        from .service import load_service

        bus = MemoryBus([load_service(spec) for spec in args.service])
    else:
        if args.service:
            raise ConfigError("--service runs services in-process: use it with --bus memory")
        from wsbus_pyro import PyroBus

        bus = PyroBus(_pyro_config(args))
    gateway = Gateway(bus, config=config, plugins=plugins)
    await gateway.start()
    edge_config = EdgeConfig(allowed_origins=tuple(args.origin), static_dir=args.static)
    try:
        server = await serve(gateway, args.host, args.port, config=edge_config)
    except OSError:
        await gateway.close()
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    print(f"wsbus gateway {gateway.node} listening on {server.url}", flush=True)
    await stop.wait()
    await server.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
