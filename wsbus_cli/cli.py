"""The ``wsbus`` command line.

::

    wsbus demo                          everything, with a web page, on one machine
    wsbus nameserver                    a Pyro name server (127.0.0.1:9090)
    wsbus bus                           the Pyro message bus
    wsbus service MODULE:CLASS          a wsbus Service as its own process (--bus pyro|nats)
    wsbus serve --bus memory|pyro|nats  a gateway on a WebSocket port
    wsbus nats-config                   the NATS users and permissions of a deployment
    wsbus config check FILE             validate a settings file, print the effective settings

The buses, the edges, and their options and subcommands (``nameserver`` and ``bus`` are the
Pyro bus's, ``nats-config`` the NATS bus's) come from the installed adapters
(:mod:`wsbus_cli.adapters`); ``wsbus service`` runs on any bus whose adapter runs services
as processes (:class:`~wsbus_cli.adapters.RunsServiceProcesses`).

A mistake the user can fix prints one line on stderr that names what was wrong and what to
do, never a traceback: exit status 2 for a wrong argument or setting (or a missing extra:
``pip install 'wsbus[pyro]'``), 1 for a failure at run time (a port taken, no name server,
no bus, a shared secret that does not match). ``--debug`` adds the traceback. An unexpected
exception is a bug in wsbus: it keeps its traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import inspect
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

from wsbus import __version__
from wsbus.errors import BusUnavailable, ConfigError, MissingExtra, PluginError, WsbusError

from .adapters import Commands, RunsServiceProcesses, installed, port_number
from .config import (
    NODE_PATTERN,
    NODE_RULE,
    Settings,
    load_settings,
    render_docs,
    render_toml,
)
from .loops import LOOPS
from .loops import run as run_on_loop

__all__ = [
    "app_dir_option",
    "build_parser",
    "config_option",
    "flag_settings",
    "load_plugin",
    "load_service_spec",
    "main",
    "settings_from_args",
    "use_app_dir",
]

log = logging.getLogger("wsbus.cli")

_SERVICE_BUS = "pyro"
"""The bus of ``wsbus service`` when neither ``--bus`` nor the settings file names one."""

USAGE_ERROR = 2
"""Exit status for a wrong argument or setting."""
RUNTIME_ERROR = 1
"""Exit status for a failure at run time."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: what was wrong, and where to look."""

    commands: dict[str, argparse.ArgumentParser] | None = None
    """The subcommands' parsers, by name (on the top parser)."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: {message} (see `{self.prog} --help`)\n")

    def parse_command_line(self, argv: Sequence[str] | None) -> argparse.Namespace:
        """Parse ``argv``; an option a command does not know is that command's error.

        argparse reports what a subcommand did not recognize from the top parser, which
        would send the user to ``wsbus --help``, where the command's options are not.
        """
        args, extra = self.parse_known_args(argv)
        if extra:
            command = getattr(args, "command", None)
            chosen = (self.commands or {}).get(command) if isinstance(command, str) else None
            (chosen if isinstance(chosen, _Parser) else self).error(
                f"unrecognized arguments: {' '.join(extra)}"
            )
        return args


def _node(text: str) -> str:
    if NODE_PATTERN.fullmatch(text) is None:
        raise argparse.ArgumentTypeError(f"{text!r}: {NODE_RULE}")
    return text


def _positive(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text}: must be more than 0")
        return value

    parse.__name__ = kind.__name__
    return parse


def config_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--config FILE.toml`` to ``parser`` (read with :func:`settings_from_args`)."""
    parser.add_argument(
        "--config",
        metavar="FILE.toml",
        default=None,
        help="read settings from a TOML file (see docs/configuration.md); flags override it",
    )


def app_dir_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--app-dir DIR`` to ``parser`` (the ``serve.app_dir`` setting)."""
    parser.add_argument(
        "--app-dir",
        default=None,
        metavar="DIR",
        help="look for services and plugins in DIR first (default: the current directory)",
    )


# Flag destination -> dotted setting name, for the command's own flags that override the
# settings file; an adapter's are named by its settings section (flag_settings).
_FLAG_SETTINGS = {
    "bus": ("serve.bus", "--bus"),
    "host": ("serve.host", "--host"),
    "port": ("serve.port", "--port"),
    "service": ("serve.services", "--service"),
    "plugin": ("serve.plugins", "--plugin"),
    "app_dir": ("serve.app_dir", "--app-dir"),
    "edge": ("serve.edge", "--edge"),
    "loop": ("serve.loop", "--loop"),
    "node": ("gateway.node", "--node"),
    "max_connections": ("gateway.max_connections", "--max-connections"),
    "rate": ("gateway.rate", "--rate"),
    "burst": ("gateway.burst", "--burst"),
    "alias_policy": ("gateway.alias_policy", "--alias-policy"),
    "allow_anonymous": ("gateway.allow_anonymous", "--no-anonymous"),
    "tracing": ("gateway.tracing", "--tracing"),
    "service_tracing": ("serve.service_tracing", "--service-tracing"),
}


def _adapters_epilog() -> str:
    found = installed()
    lines = ["buses (--bus):"]
    lines += [f"  {name:<12} {a.description}" for name, a in sorted(found.buses.items())]
    lines.append("edges (--edge):")
    lines += [f"  {name:<12} {a.description}" for name, a in sorted(found.edges.items())]
    if found.broken:
        lines.append("broken adapters (not loaded):")
        lines += [f"  {message}" for message in found.broken.values()]
    return "\n".join(lines)


def build_parser() -> _Parser:
    """Return the argument parser for ``wsbus``, with the installed adapters' options.

    An adapter whose hook raises (an option another already has, say) is set aside as
    broken (``wsbus --help`` lists it) and the parser is built again without it, so that one
    adapter's mistake leaves the command and the other adapters working.
    """
    while True:
        try:
            return _build_parser()
        except PluginError:
            # Set aside already: what it added to this parser goes with the parser. Each
            # pass sets one adapter aside, so this ends.
            continue


def _build_parser() -> _Parser:
    found = installed()
    parser = _Parser(
        prog="wsbus",
        description="A WebSocket gateway between clients and internal services over a bus.",
        epilog=_adapters_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"wsbus {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)"
    )
    parser.add_argument(
        "--debug", action="store_true", help="log everything, and show tracebacks of errors"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    buses = ", ".join(sorted(found.buses)) or "none installed"

    demo = commands.add_parser(
        "demo",
        help="run everything on this machine, with a web page (chat rooms, nicknames, echo)",
        description=(
            "Start the bus (with --bus pyro: a Pyro name server, the message bus and the demo "
            "services as processes, sharing a secret generated for this run or "
            "$WSBUS_SECRET, so no other local process can pose as one of them; with --bus "
            "nats: a private nats-server and the services as processes, each with its own "
            "NATS user) and a gateway serving the demo page; print its URL and open it in a "
            "browser. Ctrl-C stops them all."
        ),
    )
    demo.add_argument(
        "--bus",
        default="pyro" if "pyro" in found.buses else "memory",
        metavar="NAME",
        help=(
            f"the bus: {buses} (pyro: services as their own processes, the default; "
            "nats: the same over a private nats-server; memory: in this process)"
        ),
    )
    demo.add_argument("--host", default="127.0.0.1", help="address of the page (127.0.0.1)")
    demo.add_argument("--port", type=port_number, default=8765, help="port of the page (8765)")
    demo.add_argument("--no-browser", action="store_true", help="do not open the page in a browser")
    demo.add_argument(
        "--loop",
        choices=LOOPS,
        default=None,
        help="the gateway's event loop (asyncio; uvloop needs pip install 'wsbus[uvloop]')",
    )
    found.call("wsbus_cli_options", command="demo", parser=demo)

    serve = commands.add_parser(
        "serve",
        help="run a gateway on a WebSocket port",
        description=(
            "Run a gateway. Every setting can come from --config FILE.toml "
            "(docs/configuration.md); the flags below override the file."
        ),
    )
    config_option(serve)
    serve.add_argument("--bus", default=None, metavar="NAME", help=f"the bus: {buses} (memory)")
    serve.add_argument(
        "--edge",
        default=None,
        metavar="NAME",
        help=f"the edge: {', '.join(sorted(found.edges)) or 'none installed'} (websockets)",
    )
    serve.add_argument("--host", default=None, help="WebSocket address (127.0.0.1)")
    serve.add_argument("--port", type=port_number, default=None, help="WebSocket port (8765)")
    serve.add_argument(
        "--loop",
        choices=LOOPS,
        default=None,
        help="the event loop (asyncio; uvloop needs pip install 'wsbus[uvloop]')",
    )
    serve.add_argument(
        "--service",
        action="append",
        default=None,
        metavar="MODULE:CLASS",
        help="with --bus memory: a service to run in-process (repeatable)",
    )
    serve.add_argument(
        "--plugin",
        action="append",
        default=None,
        metavar="MODULE[:NAME]",
        help="a plugin module, or an object or class in it, to register (repeatable)",
    )
    app_dir_option(serve)
    serve.add_argument(
        "--max-connections", type=_positive(int), default=None, help="connection cap (10000)"
    )
    serve.add_argument(
        "--rate", type=_positive(float), default=None, help="messages a second per connection"
    )
    serve.add_argument(
        "--burst", type=_positive(int), default=None, help="messages a connection may send at once"
    )
    serve.add_argument(
        "--alias-policy",
        choices=("refuse", "suffix"),
        default=None,
        help="when an alias is taken: refuse it, or add a numeric suffix",
    )
    serve.add_argument(
        "--no-anonymous",
        dest="allow_anonymous",
        action="store_const",
        const=False,
        default=None,
        help="refuse clients no authentication plugin accepted (see $WSBUS_TOKENS)",
    )
    serve.add_argument("--node", type=_node, default=None, help="this gateway's node id (random)")
    serve.add_argument(
        "--tracing",
        action="store_const",
        const=True,
        default=None,
        help="make OpenTelemetry spans in the gateway (pip install 'wsbus[otel]')",
    )
    serve.add_argument(
        "--service-tracing",
        action="store_const",
        const=True,
        default=None,
        help="make OpenTelemetry spans in the --service services too",
    )
    found.call("wsbus_cli_options", command="serve", parser=serve)

    process_buses = sorted(
        name for name, adapter in found.buses.items() if isinstance(adapter, RunsServiceProcesses)
    )
    service = commands.add_parser(
        "service",
        help="run a wsbus Service as its own process on a bus",
        description=(
            "Run a Service subclass as this process, on a bus whose services are their own "
            "processes. MODULE is imported from --app-dir (the current directory by default) "
            "or the installed packages."
        ),
    )
    service.add_argument("spec", metavar="MODULE:CLASS", help="the Service subclass to run")
    service.add_argument(
        "--bus",
        default=None,
        metavar="NAME",
        help=f"the bus: {', '.join(process_buses) or 'none installed'} ({_SERVICE_BUS})",
    )
    app_dir_option(service)
    config_option(service)
    service.add_argument(
        "--metrics",
        default=None,
        metavar="[HOST:]PORT",
        help="serve Prometheus metrics there (127.0.0.1 when only a port; needs wsbus[metrics])",
    )
    service.add_argument(
        "--tracing",
        dest="service_tracing",
        action="store_const",
        const=True,
        default=None,
        help="make OpenTelemetry spans in the service (pip install 'wsbus[otel]')",
    )
    found.call("wsbus_cli_options", command="service", parser=service)

    config = commands.add_parser("config", help="check a settings file")
    config_commands = config.add_subparsers(
        dest="config_command", metavar="ACTION", parser_class=_Parser, required=True
    )
    check = config_commands.add_parser(
        "check",
        help="validate FILE and print the effective settings (secrets redacted)",
    )
    check.add_argument("file", metavar="FILE.toml")
    config_commands.add_parser("docs", help="print docs/configuration.md")
    # After wsbus's own commands: an adapter's that takes one of their names fails in its
    # own hook (and is set aside), not in wsbus's code.
    found.call("wsbus_cli_commands", commands=Commands(commands.add_parser))
    parser.commands = dict(commands.choices)
    return parser


def flag_settings(args: argparse.Namespace) -> dict[str, tuple[str, str]]:
    """Return, for each option of a parsed command that sets a setting: dest -> (setting, flag).

    The command's own options are listed here. An adapter's options (added by its
    ``wsbus_cli_options`` hook) name their setting as their ``dest`` (``pyro.ns_port``), and
    its settings section names their flags (:attr:`wsbus_cli.config.Section.flags`); one
    it does not name is called by its setting. Read from what was parsed, never from the
    parser: argparse sets every option's ``dest`` on ``args``, to its default at least.

    Args:
        args: what :func:`build_parser` parsed.
    """
    declared = {
        f"{section.name}.{setting}": flag
        for section in installed().sections()
        for setting, flag in section.flags.items()
    }
    found = {dest: setting for dest, setting in _FLAG_SETTINGS.items() if hasattr(args, dest)}
    for dest in vars(args):
        if "." in dest:
            found[dest] = (dest, declared.get(dest, dest))
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    command = "wsbus"
    # Before parsing, --debug is known only by its spelling: building the parser can fail.
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
        args = parser.parse_command_line(argv)
        debug = args.debug
        level = (logging.WARNING, logging.INFO, logging.DEBUG)[2 if debug else min(args.verbose, 2)]
        logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        if level > logging.INFO:
            # Pyro's client logs each failed connection at ERROR; wsbus says what it means.
            logging.getLogger("Pyro5.client").setLevel(logging.CRITICAL)
        if args.command is None:
            parser.print_help(sys.stderr)
            return USAGE_ERROR
        command = f"wsbus {args.command}"
        args._flags = flag_settings(args)
        return _run(args)
    except (ConfigError, MissingExtra) as exc:
        # A missing extra is the user's to fix, like a setting: the same status whichever
        # of the settings table or the adapter's code found it missing first.
        return _fail(command, exc, USAGE_ERROR, debug)
    except (WsbusError, OSError) as exc:
        return _fail(command, exc, RUNTIME_ERROR, debug)
    except KeyboardInterrupt:
        return 130


def _fail(command: str, exc: BaseException, status: int, debug: bool) -> int:
    if debug:
        traceback.print_exception(exc)
    # BusUnavailable's str() starts "the bus is unavailable:", which the reasons here say better.
    message = exc.reason if isinstance(exc, BusUnavailable) else str(exc)
    text = " ".join(message.split()) or type(exc).__name__
    print(f"{command}: {text}", file=sys.stderr, flush=True)
    return status


def _run(args: argparse.Namespace) -> int:
    run = getattr(args, "run", None)
    if run is not None:
        # An adapter's own subcommand (wsbus nameserver, bus, service).
        status: int | None = run(args)
        return status or 0
    if args.command == "demo":
        from .demo import run_demo

        run_on_loop(
            run_demo(
                bus=args.bus,
                host=args.host,
                port=args.port,
                open_browser=not args.no_browser,
                options=args,
            ),
            args.loop or "asyncio",
            "--loop",
        )
    elif args.command == "config":
        if args.config_command == "docs":
            sys.stdout.write(render_docs())
        else:
            settings = load_settings(args.file)
            sys.stdout.write(render_toml(settings))
            print(f"# {args.file}: valid", file=sys.stderr)
    elif args.command == "serve":
        # load_settings has checked that the chosen loop is installed, naming the setting.
        settings = settings_from_args(args)
        run_on_loop(_serve(settings), settings.serve.loop)
    elif args.command == "service":
        _service(args)
    return 0


def settings_from_args(args: argparse.Namespace, *, need: Sequence[str] = ()) -> Settings:
    """Read the settings of a parsed command: ``--config``, the environment, the flags given.

    Args:
        args: what :func:`build_parser` parsed (through :func:`main`).
        need: adapter tables to build even if the chosen bus does not use them.

    Raises:
        ConfigError: see :func:`wsbus_cli.config.load_settings`.
    """
    flags: dict[str, tuple[str, Any]] = {}
    known = getattr(args, "_flags", None) or _FLAG_SETTINGS
    for dest, (dotted, flag) in known.items():
        value = getattr(args, dest, None)
        if value is not None:
            flags[dotted] = (flag, tuple(value) if isinstance(value, list) else value)
    return load_settings(getattr(args, "config", None), flags=flags, need=need)


# -- finding services and plugins -----------------------------------------------------------


def use_app_dir(app_dir: str) -> None:
    """Put ``app_dir`` first on the import path, as uvicorn's ``--app-dir`` does.

    ``python -m wsbus_cli`` has the current directory there already; the ``wsbus`` script does
    not, so ``wsbus service myapp.todo:Todo`` would not find ``./myapp`` without this.

    Raises:
        ConfigError: the directory does not exist.
    """
    path = Path(app_dir).resolve()
    if not path.is_dir():
        raise ConfigError(f"--app-dir {app_dir}: no such directory")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


def _import(module_name: str, what: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        if module_name == missing or module_name.startswith(missing + "."):
            raise ConfigError(
                f"{what}: no module named {missing!r} in {os.getcwd()} (or --app-dir) or the "
                "installed packages; check the spelling, or pass --app-dir DIR"
            ) from exc
        raise ConfigError(
            f"{what}: importing {module_name!r} failed: it imports {missing!r}, which is "
            "not installed"
        ) from exc
    except Exception as exc:
        # The module's own code raised: the user's to fix, with --debug for the traceback.
        raise ConfigError(
            f"{what}: importing {module_name!r} raised {type(exc).__name__}: {exc} "
            "(--debug shows the traceback)"
        ) from exc


def load_service_spec(spec: str, what: str = "--service") -> Any:
    """Import ``MODULE:CLASS`` and return an instance of that :class:`~wsbus.Service`.

    Raises:
        ConfigError: the spec is malformed, the module cannot be imported, it has no such
            name, the name is not a Service subclass, or creating it raised.
    """
    from wsbus.service import Service

    label = f"{what} {spec}".strip()
    module_name, sep, class_name = spec.partition(":")
    if not sep or not module_name or not class_name:
        raise ConfigError(f"{label}: expected MODULE:CLASS, for example myapp.todo:Todo")
    module = _import(module_name, label)
    cls = getattr(module, class_name, None)
    if cls is None:
        found = sorted(
            name
            for name, value in vars(module).items()
            if isinstance(value, type) and issubclass(value, Service) and value is not Service
        )
        where = getattr(module, "__file__", None) or module_name
        hint = f"its services: {', '.join(found)}" if found else "it has no Service subclass"
        raise ConfigError(f"{label}: module {where} has no {class_name!r}; {hint}")
    if not (isinstance(cls, type) and issubclass(cls, Service)):
        raise ConfigError(
            f"{label}: {class_name} is a {type(cls).__name__}, not a wsbus.Service subclass"
        )
    try:
        return cls()
    except Exception as exc:
        raise ConfigError(
            f"{label}: {class_name}() raised {type(exc).__name__}: {exc} "
            "(--debug shows the traceback)"
        ) from exc


def load_plugin(spec: str) -> object:
    """Return the plugin ``MODULE`` (the module) or ``MODULE:NAME`` (an instance of a class).

    Raises:
        ConfigError: the module cannot be imported, or has no such name.
    """
    module_name, sep, name = spec.partition(":")
    if not module_name or (sep and not name):
        raise ConfigError(f"--plugin {spec!r}: expected MODULE or MODULE:NAME")
    module = _import(module_name, f"--plugin {spec}")
    if not sep:
        return module
    plugin = getattr(module, name, None)
    if plugin is None:
        raise ConfigError(f"--plugin {spec}: module {module_name!r} has no {name!r}")
    if inspect.isclass(plugin):
        try:
            plugin = plugin()
        except Exception as exc:
            raise ConfigError(
                f"--plugin {spec}: {name}() raised {type(exc).__name__}: {exc}"
            ) from exc
    return plugin


# -- service --------------------------------------------------------------------------------


def _service(args: argparse.Namespace) -> None:
    from .adapters import find_bus

    settings = settings_from_args(args)
    if "serve.bus" not in settings.sources:
        # Neither --bus nor the file names a bus: the one services ran on before there
        # were several.
        args.bus = _SERVICE_BUS
        settings = settings_from_args(args)
    name = settings.serve.bus
    adapter = find_bus(name)
    if not isinstance(adapter, RunsServiceProcesses):
        raise ConfigError(
            f"--bus {name}: the {name} bus runs services in the gateway's process, not as "
            f"their own: `wsbus serve --bus {name} --service {args.spec}`"
        )
    use_app_dir(settings.serve.app_dir)
    instance = load_service_spec(args.spec, "")
    if settings.serve.service_tracing:
        instance.tracing = True
        _tracing_notice()
    config = getattr(settings, adapter.section.name) if adapter.section else None
    stop_metrics = _process_metrics(args.metrics, f"service {instance.name!r}")
    try:
        adapter.run_service(instance, config)
    finally:
        if stop_metrics is not None:
            stop_metrics()


def _tracing_notice() -> None:
    """Warn when tracing is on but nothing in this process would record a span.

    The ``otel`` extra is OpenTelemetry's API alone: without an SDK set up (a tracer
    provider), every span is made and dropped, and the user would wonder why none arrive.
    """
    try:
        from opentelemetry import trace
    except ImportError:
        return  # turning tracing on says which extra is missing
    if isinstance(
        trace.get_tracer_provider(), trace.ProxyTracerProvider | trace.NoOpTracerProvider
    ):
        log.warning(
            "tracing is on, but no OpenTelemetry SDK is set up in this process: spans are "
            "made and dropped. Run it under opentelemetry-instrument (pip install "
            "opentelemetry-distro and an exporter), or set a tracer provider "
            "(docs/tracing.md)"
        )


def _process_metrics(address: str | None, what: str) -> Callable[[], None] | None:
    """Serve a service process's metrics at ``address`` (``--metrics``); None when off."""
    if address is None:
        return None
    from wsbus.metrics import serve_metrics, service_metrics
    from wsbus.service import hosted_figures

    return serve_metrics(address, lambda: service_metrics(hosted_figures()), what)


# -- serve ----------------------------------------------------------------------------------


async def _serve(settings: Settings) -> None:
    from wsbus.gateway import Gateway
    from wsbus.plugins import TokenAuth

    from .adapters import find_bus, find_edge

    use_app_dir(settings.serve.app_dir)
    plugins = [load_plugin(spec) for spec in settings.serve.plugins]
    if settings.auth.tokens:
        plugins.append(TokenAuth({token: user for user, token in settings.auth.tokens.items()}))
    adapter = find_bus(settings.serve.bus)
    edge = find_edge(settings.serve.edge)
    services = [load_service_spec(spec) for spec in settings.serve.services]
    if settings.serve.service_tracing:
        for service in services:
            service.tracing = True
    if settings.serve.service_tracing or settings.gateway.tracing:
        _tracing_notice()
    bus_config = getattr(settings, adapter.section.name) if adapter.section else None
    edge_config = getattr(settings, edge.section.name) if edge.section else None
    async with adapter.open(bus_config, services) as bus:
        gateway = Gateway(bus, config=settings.gateway, plugins=plugins)
        host, port = settings.serve.host, settings.serve.port
        await gateway.start()
        try:
            try:
                server = await edge.serve(gateway, host, port, edge_config)
            except OSError as exc:
                from .demo import listen_advice

                raise OSError(listen_advice(host, port, exc, "gateway")) from None
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, stop.set)
            # What start-up made (modules, settings, services) lives as long as the process:
            # moved out of the collector's generations, a full collection under load scans
            # only what connections made, which keeps its pause on the event loop short.
            gc.freeze()
            print(f"wsbus gateway {gateway.node} listening on {server.url}", flush=True)
            await stop.wait()
            # The gateway drains and closes its connections (1001), then the port closes.
            await gateway.close()
            await server.close()
        finally:
            await gateway.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
