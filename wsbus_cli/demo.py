"""``wsbus demo``: everything on one machine with no set-up.

The bus adapter (``--bus``, ``pyro`` by default) starts what it needs and runs the demo
services (echo, chat): with ``pyro``, a name server, the message bus and the services as
their own processes; with ``memory``, the services inside this process; with any other
installed bus adapter, what its ``demo`` does. The gateway runs in this process, with the
demo page on its own HTTP port through the ``websockets`` edge (the page speaks to it with
``wsbus.js``). Its chat rooms keep history and send presence frames (:func:`demo_config`):
the page lists who is in a room, and a reloaded page resumes its session with the messages
it missed. Ctrl-C or SIGTERM stops every process it started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import importlib.util
import logging
import os
import secrets
import signal
import socket
import tempfile
import webbrowser
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Final

import msgspec

from wsbus.gateway import Gateway, GatewayConfig, ResumeSettings
from wsbus.history import HistoryConfig
from wsbus.registry import AliasPolicy

from .adapters import find_bus, find_edge
from .config import section_struct

__all__ = [
    "DEMO_SERVICES",
    "ROOM_GROUPS",
    "demo_config",
    "listen_advice",
    "run_demo",
    "static_dir",
]

log = logging.getLogger("wsbus.demo")

DEMO_SERVICES: Final = ("wsbus_cli.demo_services:Echo", "wsbus_cli.demo_services:Chat")
"""The services the demo runs."""

ROOM_GROUPS: Final = ("room.*",)
"""The chat rooms' groups: they keep history and send presence frames."""


def demo_config(secret: str | None = None) -> GatewayConfig:
    """The demo gateway's configuration.

    Nicknames get a numeric suffix when taken, as the original login did. The chat rooms
    (groups ``room.*``) keep history and send their members join and leave frames, so a
    reloaded page resumes with the messages it missed and a current list of who is there.

    Args:
        secret: the key resume tokens are signed with (hex); a new random one by default.
            Every gateway the demo starts must be given the same one, or a page could not
            resume on another (the demo starts one; the key dies with the run).
    """
    return GatewayConfig(
        alias_policy=AliasPolicy.SUFFIX,
        history=HistoryConfig(groups=ROOM_GROUPS),
        presence_frames=ROOM_GROUPS,
        resume=ResumeSettings(secret=secret if secret is not None else secrets.token_hex(32)),
    )


def _with_metrics(config: msgspec.Struct | None) -> msgspec.Struct | None:
    """The edge's settings with ``/metrics`` on (loopback only), when the extra is installed.

    None: ``prometheus_client`` is missing (``pip install 'wsbus[metrics]'``), or the edge
    has no such setting; the demo then runs without metrics.
    """
    if importlib.util.find_spec("prometheus_client") is None:
        return None
    if config is None or "metrics_path" not in config.__struct_fields__:
        return None
    return msgspec.structs.replace(config, metrics_path="/metrics")


@contextlib.contextmanager
def static_dir() -> Iterator[Path]:
    """Yield a directory with the demo page and the browser client, for the edge to serve.

    The page lives here, the client (``wsbus.js``) beside the edge it speaks to, in
    ``wsbus_websockets/js``; the edge serves one directory, so both are copied into a
    temporary one for the run.
    """
    page = resources.files("wsbus_cli") / "demo_static"
    client = resources.files("wsbus_websockets") / "js" / "wsbus.js"
    with tempfile.TemporaryDirectory(prefix="wsbus-demo-") as directory:
        path = Path(directory)
        for item in page.iterdir():
            if item.is_file():
                (path / item.name).write_bytes(item.read_bytes())
        (path / "wsbus.js").write_bytes(client.read_bytes())
        yield path


def _port_taken(host: str, port: int, exc: OSError, what: str = "demo") -> OSError:
    """Say why ``host``:``port`` cannot be listened on, and which flag to change."""
    return OSError(listen_advice(host, port, exc, what))


def listen_advice(host: str, port: int, exc: OSError, what: str) -> str:
    """What to tell a user whose ``--host``/``--port`` cannot be listened on.

    A port in use (or refused) is the port's fault; an address this machine does not have,
    or a name that does not resolve, is the host's.
    """
    reason = exc.strerror or str(exc)
    if isinstance(exc, socket.gaierror) or exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
        return (
            f"cannot listen on {host}:{port} ({reason}): {host!r} is not an address of this "
            "machine; pick one with --host (127.0.0.1, or one of this machine's addresses)"
        )
    return (
        f"cannot listen on {host}:{port} ({reason}): is another {what} running? Pick another "
        "with --port"
    )


def _check_port(host: str, port: int) -> None:
    """Raise the demo's OSError if ``host``:``port`` cannot be listened on now.

    Bound as the server binds it (address reuse on, as asyncio's servers do on Unix), then
    let go: the server binds it again a moment later, and says so if it was taken meanwhile.
    """
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return  # the server's own bind says what is wrong with the address
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            if os.name == "posix":
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise _port_taken(host, port, exc) from None


async def run_demo(
    *,
    bus: str = "pyro",
    host: str = "127.0.0.1",
    port: int = 8765,
    open_browser: bool = True,
    options: argparse.Namespace | None = None,
) -> None:
    """Run the demo until SIGINT or SIGTERM.

    Args:
        bus: the bus adapter's name (``pyro``: services as processes; ``memory``: in this
            process).
        host: the page's address.
        port: the page's port.
        open_browser: open the page in the default browser.
        options: the parsed ``wsbus demo`` options, with the adapters' own (``--ns-port``,
            ``--no-secret``).

    Raises:
        ConfigError: no such bus adapter is installed.
        OSError: the port is taken (the message says which).
        BusUnavailable: the bus's processes did not come up.
    """
    adapter = find_bus(bus)
    edge = find_edge("websockets", "the demo's edge")
    options = options if options is not None else argparse.Namespace()
    # A taken port is found before the bus's processes start, not seconds after.
    _check_port(host, port)
    # Handled from the start: a SIGTERM while the bus's processes start (or just after the
    # "running at" line) still stops everything in order, and the exit status is 0.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with adapter.demo(options, DEMO_SERVICES) as chosen:
        gateway = Gateway(chosen, config=demo_config())
        await gateway.start()
        try:
            with static_dir() as static:
                config = section_struct(edge.section)() if edge.section is not None else None
                metrics = _with_metrics(config)
                if metrics is not None:
                    config = metrics
                try:
                    server = await edge.serve(gateway, host, port, config, static_dir=str(static))
                except OSError as exc:
                    raise _port_taken(host, port, exc) from None
                try:
                    url = f"http://{host}:{server.port}/"
                    print(f"wsbus demo running at {url} (bus: {bus}); Ctrl-C stops it", flush=True)
                    print(
                        f"  health {url}healthz, readiness {url}readyz"
                        + (f", metrics {url}metrics" if metrics is not None else ""),
                        flush=True,
                    )
                    if open_browser:
                        webbrowser.open(url)
                    await stop.wait()
                    print("stopping…", flush=True)
                finally:
                    await gateway.close()
                    await server.close()
        finally:
            await gateway.close()
