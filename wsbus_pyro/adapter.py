"""The Pyro bus as an adapter of the ``wsbus`` command (entry point ``wsbus.buses``).

It brings the ``[pyro]`` settings table, the ``--ns-host``/``--ns-port``/``--pyro-host``/
``--secret`` options of ``wsbus serve`` and ``wsbus service``, the ``--ns-port``/
``--no-secret`` options of ``wsbus demo``, the subcommands ``wsbus nameserver`` and
``wsbus bus``, and runs ``wsbus service`` (:meth:`PyroAdapter.run_service`). Importing
this module imports no Pyro5: the command loads every installed adapter to build its
``--help``; Pyro5 is imported when the bus is used, and a missing extra then fails with
``pip install 'wsbus[pyro]'``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any, Final

import msgspec

from wsbus.bus import Bus
from wsbus.errors import BusUnavailable
from wsbus.service import Service
from wsbus_cli.adapters import Commands, Section, hookimpl, port_number
from wsbus_cli.config import SECRET_ENV
from wsbus_cli.supervisor import Child, ChildFailed, free_port

__all__ = ["NO_SECRET_WARNING", "PyroAdapter", "check_pyro", "pyro"]

NO_SECRET_WARNING: Final = (
    "wsbus demo: WARNING: running the Pyro processes with no shared secret: any process on "
    "this machine can pose as a demo service, read every chat message and send to the page's "
    "clients. Leave out --no-secret to use a generated one."
)
"""What ``wsbus demo --no-secret`` prints on stderr."""


def _config() -> type[msgspec.Struct]:
    from .config import PyroConfig

    return PyroConfig


class PyroAdapter:
    """The Pyro bus: a name server, a message bus, and services as their own processes.

    Attributes:
        name: ``pyro``.
        description: one line for ``wsbus --help``.
        section: the ``[pyro]`` table, read into :class:`wsbus_pyro.PyroConfig`.
        runs_services: False: each service is its own ``wsbus service`` process.
    """

    name = "pyro"
    description = "services as their own processes on a Pyro5 message bus (wsbus[pyro])"
    section: Section | None = Section(
        "pyro",
        _config,
        "pyro",
        "the Pyro bus (`wsbus_pyro.PyroConfig`)",
        flags={
            "ns_host": "--ns-host",
            "ns_port": "--ns-port",
            "host": "--pyro-host",
            "secret": "--secret",
        },
        environment={"secret": SECRET_ENV},
        secrets=frozenset({"secret"}),
        ports=("ns_port", "port"),
    )
    runs_services = False

    @contextlib.asynccontextmanager
    async def open(self, config: Any, services: Sequence[Service]) -> AsyncIterator[Bus]:
        """Check that the name server and the message bus answer; yield a PyroBus.

        Raises:
            BusUnavailable: the name server or the bus does not answer, or does not share
                this process's secret (the message says which, and what to start).
        """
        from . import PyroBus

        await asyncio.to_thread(check_pyro, config)
        yield PyroBus(config)

    def run_service(self, service: Service, config: Any) -> None:
        """Run ``service`` as a Pyro service process until a signal (``wsbus service``).

        Raises:
            BusUnavailable: the name server or the bus does not answer, or does not share
                this process's secret.
        """
        from . import run_service

        check_pyro(config)
        run_service(service, config)

    @contextlib.asynccontextmanager
    async def demo(
        self, options: argparse.Namespace, services: Sequence[str]
    ) -> AsyncIterator[Bus]:
        """Start a name server, the message bus and ``services`` as processes; yield a PyroBus.

        The processes share a secret, generated for the run (``secrets.token_urlsafe``)
        unless ``WSBUS_SECRET`` is set: without one, any local process could pose as a demo
        service, read every chat message, or send to the page's clients as "echo". The
        children get it in their environment, never on their command line, which any local
        user can read with ``ps``. ``--no-secret`` runs without one, with a warning.

        Raises:
            BusUnavailable: a process did not start (the message has its last line).
        """
        from . import PyroBus, PyroConfig

        secret = _secret(False if getattr(options, "no_secret", False) else None)
        ns_port = getattr(options, "ns_port", 0) or free_port()
        args = ["--ns-port", str(ns_port)]
        # In the environment (None removes an inherited one): never on a command line.
        env = {SECRET_ENV: secret}

        def start(*command: str) -> Child:
            try:
                return Child([*command, *args], env=env)
            except ChildFailed as exc:
                raise BusUnavailable(
                    f"the demo's `wsbus {' '.join(command)}` did not start: {exc.last_line}"
                ) from exc

        children: list[Child] = []
        try:
            children.append(await asyncio.to_thread(start, "nameserver"))
            children.append(await asyncio.to_thread(start, "bus"))
            for spec in services:
                children.append(await asyncio.to_thread(start, "service", spec))
            trust = "no shared secret" if secret is None else "its processes share a secret"
            print(f"wsbus demo: Pyro name server on port {ns_port}; {trust}", flush=True)
            yield PyroBus(PyroConfig(ns_port=ns_port, secret=secret))
        finally:
            for child in reversed(children):
                await asyncio.to_thread(child.stop)

    @hookimpl
    def wsbus_cli_options(self, command: str, parser: argparse.ArgumentParser) -> None:
        """Add the name server and secret to ``serve`` and ``service``; its port to ``demo``."""
        if command in ("serve", "service"):
            _pyro_options(parser)
        elif command == "demo":
            group = parser.add_argument_group("Pyro (--bus pyro)")
            group.add_argument(
                "--ns-port",
                type=port_number,
                default=0,
                help="the name server's port (default: a free one)",
            )
            group.add_argument(
                "--no-secret",
                action="store_true",
                help=(
                    "run the Pyro processes without a shared secret: any local process can "
                    "then pose as a demo service or read every chat message (for debugging "
                    "only)"
                ),
            )

    @hookimpl
    def wsbus_cli_commands(self, commands: Commands) -> None:
        """Add ``wsbus nameserver`` and ``wsbus bus``."""
        from wsbus_cli.cli import config_option

        ns = commands.add("nameserver", help="run a Pyro name server", run=_run_name_server)
        _pyro_options(ns)
        config_option(ns)
        bus = commands.add("bus", help="run the Pyro message bus", run=_run_bus)
        _pyro_options(bus)
        config_option(bus)
        bus.add_argument(
            "--metrics",
            default=None,
            metavar="[HOST:]PORT",
            help="serve Prometheus metrics there (127.0.0.1 when only a port; needs "
            "wsbus[metrics])",
        )


pyro = PyroAdapter()
"""The ``pyro`` entry point of ``wsbus.buses``."""


def _pyro_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Pyro")
    group.add_argument(
        "--ns-host",
        dest="pyro.ns_host",
        metavar="HOST",
        default=None,
        help="name server host (127.0.0.1)",
    )
    group.add_argument(
        "--ns-port",
        dest="pyro.ns_port",
        metavar="PORT",
        type=port_number,
        default=None,
        help="name server port (9090)",
    )
    group.add_argument(
        "--pyro-host",
        dest="pyro.host",
        metavar="HOST",
        default=None,
        help="address this process's Pyro daemon binds (127.0.0.1: only this machine)",
    )
    group.add_argument(
        "--secret",
        dest="pyro.secret",
        metavar="SECRET",
        default=None,
        help=(
            f"shared secret every Pyro peer must know (default: ${SECRET_ENV}; none). "
            f"Prefer ${SECRET_ENV}: any local user can read a command line"
        ),
    )


def _run_name_server(args: argparse.Namespace) -> None:
    from wsbus_cli.cli import settings_from_args

    from . import run_name_server

    config = settings_from_args(args, need=("pyro",)).pyro
    try:
        run_name_server(config)
    except OSError as exc:
        raise OSError(
            f"cannot listen on {config.ns_host}:{config.ns_port} ({exc.strerror or exc}): is "
            "another name server running? Pick another port with --ns-port"
        ) from exc


def _run_bus(args: argparse.Namespace) -> None:
    from wsbus_cli.cli import settings_from_args

    from . import run_bus

    config = settings_from_args(args, need=("pyro",)).pyro
    check_pyro(config, bus=False)
    run_bus(config, metrics=getattr(args, "metrics", None))


def _secret(secret: str | bool | None) -> str | None:
    if secret is False:
        print(NO_SECRET_WARNING, file=sys.stderr, flush=True)
        return None
    if isinstance(secret, str) and secret:
        return secret
    return os.environ.get(SECRET_ENV) or secrets.token_urlsafe(32)


# -- say which of name server, bus and secret is wrong --------------------------------------


def check_pyro(config: Any, *, bus: bool = True) -> None:
    """Check that the name server (and the message bus) answer and accept our secret.

    Three causes, three messages: no name server at the address; no bus registered with it
    (or it no longer answers); a name server or bus whose shared secret is not this
    process's.

    Raises:
        BusUnavailable: one of those, with what to do.
    """
    from Pyro5 import errors as pyro_errors

    from .transport import make_proxy

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
