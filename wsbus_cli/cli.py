"""The ``wsbus`` command line.

::

    wsbus demo                       everything, with a web page, on one machine
    wsbus nameserver                 a Pyro name server (127.0.0.1:9090)
    wsbus bus                        the Pyro message bus
    wsbus service MODULE:CLASS       a wsbus Service as a Pyro service process
    wsbus serve --bus memory|pyro    a gateway on a WebSocket port
    wsbus config check FILE          validate a settings file, print the effective settings

A mistake the user can fix prints one line on stderr that names what was wrong and what to
do, never a traceback: exit status 2 for a wrong argument or setting, 1 for a failure at run
time (a port taken, no name server, no bus, a shared secret that does not match). ``--debug``
adds the traceback. An unexpected exception is a bug in wsbus: it keeps its traceback.
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
import socket
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

from wsbus._version import __version__
from wsbus.errors import BusUnavailable, ConfigError, WsbusError

from .config import (
    NODE_PATTERN,
    NODE_RULE,
    SECRET_ENV,
    Settings,
    load_settings,
    render_docs,
    render_toml,
)

__all__ = ["build_parser", "load_plugin", "load_service_spec", "main"]

log = logging.getLogger("wsbus.cli")

USAGE_ERROR = 2
"""Exit status for a wrong argument or setting."""
RUNTIME_ERROR = 1
"""Exit status for a failure at run time."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: what was wrong, and where to look."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text}: a port is 0-65535 (0 picks a free one)")
    return port


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


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE.toml",
        default=None,
        help="read settings from a TOML file (see docs/configuration.md); flags override it",
    )


def _app_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--app-dir",
        default=None,
        metavar="DIR",
        help="look for services and plugins in DIR first (default: the current directory)",
    )


def _pyro_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Pyro")
    group.add_argument("--ns-host", default=None, help="name server host (127.0.0.1)")
    group.add_argument("--ns-port", type=_port, default=None, help="name server port (9090)")
    group.add_argument(
        "--pyro-host",
        default=None,
        help="address this process's Pyro daemon binds (127.0.0.1: only this machine)",
    )
    group.add_argument(
        "--secret",
        default=None,
        help=(
            f"shared secret every Pyro peer must know (default: ${SECRET_ENV}; none). "
            f"Prefer ${SECRET_ENV}: any local user can read a command line"
        ),
    )


# Flag destination -> dotted setting name, for the flags that override the settings file.
_FLAG_SETTINGS = {
    "bus": ("serve.bus", "--bus"),
    "host": ("serve.host", "--host"),
    "port": ("serve.port", "--port"),
    "service": ("serve.services", "--service"),
    "plugin": ("serve.plugins", "--plugin"),
    "app_dir": ("serve.app_dir", "--app-dir"),
    "node": ("gateway.node", "--node"),
    "max_connections": ("gateway.max_connections", "--max-connections"),
    "rate": ("gateway.rate", "--rate"),
    "burst": ("gateway.burst", "--burst"),
    "alias_policy": ("gateway.alias_policy", "--alias-policy"),
    "allow_anonymous": ("gateway.allow_anonymous", "--no-anonymous"),
    "origin": ("websockets.allowed_origins", "--origin"),
    "static": ("websockets.static_dir", "--static"),
    "ns_host": ("pyro.ns_host", "--ns-host"),
    "ns_port": ("pyro.ns_port", "--ns-port"),
    "pyro_host": ("pyro.host", "--pyro-host"),
    "secret": ("pyro.secret", "--secret"),
}


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser for ``wsbus``."""
    parser = _Parser(
        prog="wsbus",
        description="A WebSocket gateway between clients and internal services over a bus.",
    )
    parser.add_argument("--version", action="version", version=f"wsbus {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)"
    )
    parser.add_argument(
        "--debug", action="store_true", help="log everything, and show tracebacks of errors"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    demo = commands.add_parser(
        "demo",
        help="run everything on this machine, with a web page (chat rooms, nicknames, echo)",
        description=(
            "Start a Pyro name server, the message bus and the demo services as processes, "
            "and a gateway serving the demo page; print its URL and open it in a browser. "
            "The processes share a secret generated for this run (or $WSBUS_SECRET), so no "
            "other local process can pose as one of them. Ctrl-C stops them all."
        ),
    )
    demo.add_argument(
        "--bus",
        choices=("pyro", "memory"),
        default="pyro",
        help="pyro: services as their own processes (default); memory: in this process",
    )
    demo.add_argument("--host", default="127.0.0.1", help="address of the page (127.0.0.1)")
    demo.add_argument("--port", type=_port, default=8765, help="port of the page (8765)")
    demo.add_argument(
        "--ns-port", type=_port, default=0, help="the name server's port (default: a free one)"
    )
    demo.add_argument("--no-browser", action="store_true", help="do not open the page in a browser")
    demo.add_argument(
        "--no-secret",
        action="store_true",
        help=(
            "run the Pyro processes without a shared secret: any local process can then pose "
            "as a demo service or read every chat message (for debugging only)"
        ),
    )

    ns = commands.add_parser("nameserver", help="run a Pyro name server")
    _pyro_options(ns)
    _config_option(ns)

    bus = commands.add_parser("bus", help="run the Pyro message bus")
    _pyro_options(bus)
    _config_option(bus)

    service = commands.add_parser(
        "service",
        help="run a wsbus Service as a Pyro process",
        description=(
            "Run a Service subclass on the Pyro bus. MODULE is imported from --app-dir "
            "(the current directory by default) or the installed packages."
        ),
    )
    service.add_argument("spec", metavar="MODULE:CLASS", help="the Service subclass to run")
    _app_dir_option(service)
    _pyro_options(service)
    _config_option(service)

    serve = commands.add_parser(
        "serve",
        help="run a gateway on a WebSocket port",
        description=(
            "Run a gateway. Every setting can come from --config FILE.toml "
            "(docs/configuration.md); the flags below override the file."
        ),
    )
    _config_option(serve)
    serve.add_argument("--bus", choices=("memory", "pyro"), default=None, help="the bus (memory)")
    serve.add_argument("--host", default=None, help="WebSocket address (127.0.0.1)")
    serve.add_argument("--port", type=_port, default=None, help="WebSocket port (8765)")
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
    _app_dir_option(serve)
    serve.add_argument(
        "--origin",
        action="append",
        default=None,
        metavar="ORIGIN",
        help="an allowed browser origin besides the server's own (repeatable)",
    )
    serve.add_argument("--static", default=None, help="a directory to serve over HTTP")
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
    _pyro_options(serve)

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    debug: bool = args.debug
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[2 if debug else min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if level > logging.INFO:
        # Pyro's client logs each failed connection at ERROR; wsbus says what it means.
        logging.getLogger("Pyro5.client").setLevel(logging.CRITICAL)
    if args.command is None:
        parser.print_help(sys.stderr)
        return USAGE_ERROR
    command = f"wsbus {args.command}"
    try:
        return _run(args)
    except ConfigError as exc:
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
    if args.command == "demo":
        from .demo import run_demo

        asyncio.run(
            run_demo(
                bus=args.bus,
                host=args.host,
                port=args.port,
                ns_port=args.ns_port,
                open_browser=not args.no_browser,
                secret=False if args.no_secret else None,
            )
        )
    elif args.command == "config":
        if args.config_command == "docs":
            sys.stdout.write(render_docs())
        else:
            settings = load_settings(args.file)
            sys.stdout.write(render_toml(settings))
            print(f"# {args.file}: valid", file=sys.stderr)
    elif args.command == "nameserver":
        from wsbus_pyro import run_name_server

        pyro = _settings(args, need_pyro=True).pyro
        try:
            run_name_server(pyro)
        except OSError as exc:
            raise OSError(
                f"cannot listen on {pyro.ns_host}:{pyro.ns_port} ({exc.strerror or exc}): is "
                "another name server running? Pick another port with --ns-port"
            ) from exc
    elif args.command == "bus":
        from wsbus_pyro import run_bus

        pyro = _settings(args, need_pyro=True).pyro
        check_pyro(pyro, bus=False)
        run_bus(pyro)
    elif args.command == "service":
        from wsbus_pyro import run_service

        settings = _settings(args, need_pyro=True)
        use_app_dir(settings.serve.app_dir)
        instance = load_service_spec(args.spec, "")
        check_pyro(settings.pyro)
        run_service(instance, settings.pyro)
    elif args.command == "serve":
        asyncio.run(_serve(_settings(args)))
    return 0


def _settings(args: argparse.Namespace, *, need_pyro: bool | None = None) -> Settings:
    flags: dict[str, tuple[str, Any]] = {}
    for dest, (dotted, flag) in _FLAG_SETTINGS.items():
        value = getattr(args, dest, None)
        if value is not None:
            flags[dotted] = (flag, tuple(value) if isinstance(value, list) else value)
    return load_settings(args.config, flags=flags, need_pyro=need_pyro)


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


# -- Pyro: say which of name server, bus and secret is wrong -------------------------------


def check_pyro(config: Any, *, bus: bool = True) -> None:
    """Check that the name server (and the message bus) answer and accept our secret.

    Three causes, three messages: no name server at the address; no bus registered with it
    (or it no longer answers); a name server or bus whose shared secret is not this
    process's.

    Raises:
        BusUnavailable: one of those, with what to do.
    """
    from Pyro5 import errors as pyro_errors

    from wsbus_pyro.transport import make_proxy

    where = f"{config.ns_host}:{config.ns_port}"
    ns_uri = f"PYRO:Pyro.NameServer@{where}"
    # The name server wsbus runs checks the secret too: one that is listening but refuses
    # (or cannot prove) it does not share ours. Decided by our own connection.
    try:
        with socket.create_connection((config.ns_host, config.ns_port), config.comm_timeout):
            pass
    except OSError:
        raise BusUnavailable(
            f"no Pyro name server answers at {where}: start one with `wsbus nameserver"
            f" --ns-port {config.ns_port}`, or pass its address with --ns-host/--ns-port"
        ) from None
    try:
        with make_proxy(ns_uri, config) as ns:
            try:
                ns._pyroBind()
            except pyro_errors.TimeoutError:
                raise
            except (pyro_errors.CommunicationError, pyro_errors.SecurityError):
                mine = "one" if config.secret else "none"
                raise BusUnavailable(
                    f"the name server at {where} and this process do not share a secret (this "
                    f"process has {mine}): give every process of the deployment the same "
                    f"${SECRET_ENV} (a name server with a secret must be `wsbus nameserver`)"
                ) from None
            if not bus:
                return
            try:
                uri = ns.lookup(config.bus_name)
            except pyro_errors.NamingError:
                raise BusUnavailable(
                    f"the name server at {where} knows no message bus ({config.bus_name!r}): "
                    f"start one with `wsbus bus --ns-port {config.ns_port}`"
                ) from None
    except pyro_errors.CommunicationError:
        raise BusUnavailable(
            f"no Pyro name server answers at {where}: start one with `wsbus nameserver"
            f" --ns-port {config.ns_port}`, or pass its address with --ns-host/--ns-port"
        ) from None
    # Reachability is decided by our own connection, not by Pyro's error: a bus that is
    # listening but fails the handshake refused our secret.
    try:
        with socket.create_connection((uri.host, uri.port), timeout=config.comm_timeout):
            pass
    except OSError:
        raise BusUnavailable(
            f"the message bus registered at {uri.location} does not answer (it stopped?): "
            f"start it with `wsbus bus --ns-port {config.ns_port}`"
        ) from None
    try:
        with make_proxy(uri, config) as proxy:
            proxy._pyroBind()
    except pyro_errors.TimeoutError:
        raise BusUnavailable(
            f"the message bus at {uri.location} did not answer within "
            f"{config.comm_timeout} s: it is overloaded or stuck; retry, or restart it"
        ) from None
    except (pyro_errors.CommunicationError, pyro_errors.SecurityError):
        mine = "one" if config.secret else "none"
        raise BusUnavailable(
            f"the message bus at {uri.location} and this process do not share a secret (this "
            f"process has {mine}): give every process of the deployment the same ${SECRET_ENV}"
        ) from None


# -- serve ----------------------------------------------------------------------------------


async def _serve(settings: Settings) -> None:
    from wsbus import Gateway, MemoryBus
    from wsbus.plugins import TokenAuth

    use_app_dir(settings.serve.app_dir)
    plugins = [load_plugin(spec) for spec in settings.serve.plugins]
    if settings.auth.tokens:
        plugins.append(TokenAuth({token: user for user, token in settings.auth.tokens.items()}))
    bus: Any
    if settings.serve.bus == "memory":
        bus = MemoryBus([load_service_spec(spec) for spec in settings.serve.services])
    else:
        from wsbus_pyro import PyroBus

        await asyncio.to_thread(check_pyro, settings.pyro)
        bus = PyroBus(settings.pyro)
    gateway = Gateway(bus, config=settings.gateway, plugins=plugins)
    from wsbus_websockets import serve

    host, port = settings.serve.host, settings.serve.port
    await gateway.start()
    try:
        server = await serve(gateway, host, port, config=settings.websockets)
    except OSError as exc:
        await gateway.close()
        raise OSError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}): is another gateway "
            "running? Pick another with --port"
        ) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    # What start-up made (modules, settings, services) lives as long as the process: moved
    # out of the collector's generations, a full collection under load scans only what
    # connections made, which keeps its pause on the event loop short.
    gc.freeze()
    print(f"wsbus gateway {gateway.node} listening on {server.url}", flush=True)
    await stop.wait()
    await server.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
