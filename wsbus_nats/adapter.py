"""The NATS bus as an adapter of the ``wsbus`` command (entry point ``wsbus.buses``).

It brings the ``[nats]`` settings table (:class:`wsbus_nats.NatsConfig`), the
``--nats-url``/``--nats-user``/``--nats-creds``/``--nats-prefix`` options of ``wsbus
serve`` and ``wsbus service``, runs ``wsbus service MODULE:CLASS --bus nats`` (each service
instance its own process), ``wsbus demo --bus nats`` (a private nats-server on 127.0.0.1,
every process with its own NATS user), and the subcommand ``wsbus nats-config`` (the users
and permissions of a deployment, :mod:`wsbus_nats.permissions`).

Importing this module imports no nats-py: the command loads every installed adapter to
build its ``--help``; nats-py is imported when the bus is used, and a missing extra then
fails with ``pip install 'wsbus[nats]'``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import socket
import sys
import tempfile
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Final

import msgspec

from wsbus.bus import Bus
from wsbus.errors import BusUnavailable, ChildFailed
from wsbus.service import Service
from wsbus_cli.adapters import Commands, Section, hookimpl
from wsbus_cli.supervisor import Child

__all__ = ["PASSWORD_ENV", "TOKEN_ENV", "NatsAdapter", "check_nats", "nats"]

log = logging.getLogger("wsbus.nats")

PASSWORD_ENV: Final = "WSBUS_NATS_PASSWORD"
"""The environment variable holding the NATS password (``nats.password``)."""
TOKEN_ENV: Final = "WSBUS_NATS_TOKEN"
"""The environment variable holding a NATS authentication token (``nats.token``)."""


def _config() -> type[msgspec.Struct]:
    from .config import NatsConfig

    return NatsConfig


class NatsAdapter:
    """The NATS bus: gateways and service instances as peers on a NATS cluster.

    Attributes:
        name: ``nats``.
        description: one line for ``wsbus --help``.
        section: the ``[nats]`` table, read into :class:`wsbus_nats.NatsConfig`.
        runs_services: False: each service instance is its own ``wsbus service`` process.
    """

    name = "nats"
    description = "gateways and services as peers on a NATS cluster (wsbus[nats])"
    section: Section | None = Section(
        "nats",
        _config,
        "nats",
        "the NATS bus (`wsbus_nats.NatsConfig`)",
        flags={
            "servers": "--nats-url",
            "user": "--nats-user",
            "creds_file": "--nats-creds",
            "prefix": "--nats-prefix",
        },
        environment={"password": PASSWORD_ENV, "token": TOKEN_ENV},
        secrets=frozenset({"password", "token"}),
    )
    runs_services = False

    @contextlib.asynccontextmanager
    async def open(self, config: Any, services: Sequence[Service]) -> AsyncIterator[Bus]:
        """Yield a NatsBus on ``config`` (it connects when the gateway starts it).

        Raises:
            MissingExtra: nats-py is not installed.
        """
        from . import NatsBus

        await asyncio.to_thread(check_nats, config)
        yield NatsBus(config)

    def run_service(self, service: Service, config: Any) -> None:
        """Run ``service`` as one instance on NATS until a signal (``wsbus service``).

        Prints ``service 'NAME' ready`` once it takes traffic. Start more processes of the
        same service to share its traffic (one NATS queue group per service).

        Raises:
            BusUnavailable: no NATS server (with JetStream) answers at ``config.servers``.
            MissingExtra: nats-py is not installed.
        """
        from . import run_service

        check_nats(config)
        run_service(service, config)

    @contextlib.asynccontextmanager
    async def demo(
        self, options: argparse.Namespace, services: Sequence[str]
    ) -> AsyncIterator[Bus]:
        """Start a private nats-server and ``services`` as processes; yield a NatsBus.

        The server listens on 127.0.0.1 (a free port), with JetStream storing in a
        temporary directory removed at the end, and lets in only the users ``wsbus
        nats-config`` generated for this run: one per service, allowed to send only as that
        service, and one for the gateway. No other local process can connect, let alone
        pose as a demo service. Each service process gets its password in its environment
        (``WSBUS_NATS_PASSWORD``), never on its command line.

        Raises:
            ChildFailed: there is no nats-server executable, or it did not start.
            BusUnavailable: a service process did not start (the message has its last line).
        """
        from wsbus import control
        from wsbus_cli.cli import load_service_spec

        from . import NatsBus, NatsConfig
        from .buckets import make_buckets
        from .permissions import SERVER_CONFIG, plan, write
        from .servers import NatsServer

        loaded = [load_service_spec(spec, "demo service") for spec in services]
        names = [service.name for service in loaded]
        presence = [s.name for s in loaded if control.PRESENCE in type(s).handled_types()]
        access = plan(names, any_gateway=True, presence=presence)
        with tempfile.TemporaryDirectory(prefix="wsbus-nats-demo-") as directory:
            conf = Path(directory) / "conf"
            write(access, conf)
            server = NatsServer(
                Path(directory) / "server", config_file=conf / SERVER_CONFIG, monitor=False
            )
            children: list[Child] = []
            gateway = access.gateway_user()
            try:
                await asyncio.to_thread(server.start)
                gateway_config = NatsConfig(
                    servers=(server.url,), user=gateway.name, password=gateway.password
                )
                # The services start first and may not make the directory's buckets (only
                # gateways may): made here, as the gateway will find them.
                await make_buckets(gateway_config)
                for spec, name in zip(services, names, strict=True):
                    user = access.service_user(name)
                    command = ["service", spec, "--bus", "nats", "--nats-url", server.url]
                    command += ["--nats-user", user.name]
                    env: dict[str, str | None] = {PASSWORD_ENV: user.password, TOKEN_ENV: None}
                    try:
                        child = await asyncio.to_thread(Child, command, env=env)
                    except ChildFailed as exc:
                        raise BusUnavailable(
                            f"the demo's `wsbus service {spec}` did not start: {exc.last_line}"
                        ) from exc
                    children.append(child)
                print(
                    f"wsbus demo: private nats-server at {server.url}; each process has its "
                    "own NATS user and may send only as itself",
                    flush=True,
                )
                yield NatsBus(gateway_config)
            finally:
                for child in reversed(children):
                    await asyncio.to_thread(child.stop)
                await asyncio.to_thread(server.stop)

    @hookimpl
    def wsbus_cli_options(self, command: str, parser: argparse.ArgumentParser) -> None:
        """Add the NATS servers and credentials to ``serve`` and ``service``."""
        if command in ("serve", "service"):
            _nats_options(parser)

    @hookimpl
    def wsbus_cli_commands(self, commands: Commands) -> None:
        """Add ``wsbus nats-config``."""
        from wsbus_cli.cli import app_dir_option

        config = commands.add(
            "nats-config",
            help="generate the NATS users and permissions of a deployment",
            description=(
                "Generate a nats-server configuration with one user per service and gateway, "
                "each allowed to send only under its own name (docs/nats.md), with new random "
                "passwords. Without --out it is printed, each user's wsbus settings as "
                "comments at the end; with --out DIR, DIR/nats-server.conf and one settings "
                "file per user (for --config) are written, readable by you only."
            ),
            run=_run_nats_config,
        )
        config.add_argument(
            "--service",
            action="append",
            default=[],
            metavar="NAME",
            help="a service's name, or MODULE:CLASS to read it from (repeatable)",
        )
        config.add_argument(
            "--presence",
            action="append",
            default=[],
            metavar="NAME",
            help=(
                "a service (named by --service) that hears the gateways' presence events "
                "(wsbus.presence); a MODULE:CLASS that declares them needs none (repeatable)"
            ),
        )
        config.add_argument(
            "--gateway",
            action="append",
            default=[],
            metavar="NODE",
            help="a gateway's node id (wsbus serve --node NODE) (repeatable)",
        )
        config.add_argument(
            "--any-gateway",
            action="store_true",
            help=(
                "add a user 'gateways' for gateways of any node id (then one gateway can "
                "pose as another: prefer --gateway)"
            ),
        )
        config.add_argument(
            "--server",
            action="append",
            default=[],
            metavar="URL",
            help="a NATS server URL to put in the settings files (repeatable)",
        )
        config.add_argument("--prefix", default="wsbus", help="the subjects' prefix (wsbus)")
        config.add_argument(
            "--account", default="WSBUS", help="the NATS account of the users (WSBUS)"
        )
        config.add_argument("--out", metavar="DIR", default=None, help="write the files to DIR")
        app_dir_option(config)


nats = NatsAdapter()
"""The ``nats`` entry point of ``wsbus.buses``."""


def check_nats(config: Any) -> None:
    """Check that a server of ``config.servers`` answers and takes this process's user.

    Decided by our own connection, before nats-py tries (and logs each failed attempt), so
    that a server that is not running, or one that refuses the user or password, is one
    line saying what to do. The credentials are checked over plain connections with a user
    and password or a token (the NATS protocol's CONNECT, then PING); over TLS, or with a
    creds or nkey file, only that the server answers.

    Raises:
        BusUnavailable: none answers, or the first that does refuses the credentials.
    """
    from .config import has_credentials, redact_url

    if any(has_credentials(url) for url in config.servers):
        # Said, not refused: the URL may come from a private settings file.
        log.warning(
            "a NATS server URL holds credentials (%s): given with --nats-url, anyone on "
            "this machine can read them with ps; give --nats-user and $%s, or a settings "
            "file (--config) readable by this user only",
            ", ".join(redact_url(url) for url in config.servers if has_credentials(url)),
            PASSWORD_ENV,
        )
    for url in config.servers:
        parts = urllib.parse.urlsplit(url if "://" in url else f"nats://{url}")
        try:
            port = parts.port or 4222
        except ValueError:
            continue  # not a port: nats-py will say so
        try:
            with socket.create_connection(
                (parts.hostname or "127.0.0.1", port), timeout=config.connect_timeout
            ) as sock:
                refused = _refusal(sock, config, parts)
        except (OSError, ValueError):
            continue
        if refused is None:
            return
        # A URL's user only with a password: a name alone there is a token (secret).
        user = config.user or (parts.username if parts.password is not None else None)
        who = f"user {user!r}" if user else "this process (no user given)"
        raise BusUnavailable(
            f"the NATS server at {redact_url(url)} refused {who}: {refused}; give the user "
            "and password "
            f"wsbus nats-config made for this process (--config FILE, or --nats-user and "
            f"${PASSWORD_ENV})"
        )
    raise BusUnavailable(
        f"no NATS server answers at {', '.join(map(redact_url, config.servers))}: start one "
        "(`nats-server "
        "-js`), or pass its URL with --nats-url"
    )


def _refusal(sock: socket.socket, config: Any, url: urllib.parse.SplitResult) -> str | None:
    """Say hello as a NATS client would; return the server's refusal, or None."""
    reader = sock.makefile("rb")
    info_line = reader.readline(64 * 1024)
    if not info_line.startswith(b"INFO "):
        raise ValueError("not a NATS server")
    info = json.loads(info_line[5:])
    user, password = url.username or config.user, url.password or config.password
    token = config.token
    if (
        not info.get("auth_required")
        or info.get("tls_required")
        or url.scheme == "tls"
        or config.uses_tls
        or config.creds_file
        or config.nkey_seed_file
    ):
        return None
    options: dict[str, Any] = {"verbose": False, "pedantic": False, "name": "wsbus check"}
    if user is not None:
        options |= {"user": user, "pass": password or ""}
    elif token is not None:
        options["auth_token"] = token
    sock.sendall(b"CONNECT " + json.dumps(options).encode() + b"\r\nPING\r\n")
    answer = reader.readline(64 * 1024).decode(errors="replace").strip()
    if answer == "PONG":
        return None
    # The server's own words (-ERR 'Authorization Violation'), shown as they are.
    return answer.removeprefix("-ERR").strip(" '") or "it closed the connection"


def _nats_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("NATS")
    group.add_argument(
        "--nats-url",
        dest="nats.servers",
        metavar="URL",
        action="append",
        default=None,
        help=(
            "a NATS server (repeatable; default nats://127.0.0.1:4222); no password in it "
            f"(anyone can read it with ps): use --nats-user and ${PASSWORD_ENV}"
        ),
    )
    group.add_argument(
        "--nats-user",
        dest="nats.user",
        metavar="USER",
        default=None,
        help=f"NATS user name; its password from ${PASSWORD_ENV} or the settings file",
    )
    group.add_argument(
        "--nats-creds",
        dest="nats.creds_file",
        metavar="FILE",
        default=None,
        help="a NATS .creds file (JWT and nkey seed)",
    )
    group.add_argument(
        "--nats-prefix",
        dest="nats.prefix",
        metavar="PREFIX",
        default=None,
        help="the first token of every wsbus subject (wsbus)",
    )


def _run_nats_config(args: argparse.Namespace) -> None:
    from wsbus import control
    from wsbus_cli.cli import load_service_spec, use_app_dir

    from .permissions import SERVER_CONFIG, plan, write

    names = []
    presence = list(args.presence)
    for spec in args.service:
        if ":" in spec:
            use_app_dir(args.app_dir or ".")
            service = load_service_spec(spec, "--service")
            names.append(service.name)
            # A class that declares presence events gets to hear them.
            if control.PRESENCE in type(service).handled_types():
                presence.append(service.name)
        else:
            names.append(spec)
    access = plan(
        names,
        args.gateway,
        any_gateway=args.any_gateway,
        prefix=args.prefix,
        account=args.account,
        servers=args.server,
        presence=sorted(set(presence)),
    )
    if args.out is None:
        sys.stdout.write(access.server_config())
        for user in access.users:
            sys.stdout.write(f"\n# ---- {user.name}.toml ----\n")
            for line in access.credentials(user).splitlines():
                sys.stdout.write(f"# {line}\n" if line else "#\n")
        return
    out = Path(args.out)
    write(access, out)
    conf = out / SERVER_CONFIG
    print(f"{conf}: start the server with `nats-server -c {conf} -js`")
    for user in access.users:
        path = out / f"{user.name}.toml"
        if user.role == "service":
            print(f"{path}: wsbus service MODULE:CLASS --config {path}")
        else:
            print(f"{path}: wsbus serve --config {path}")
