"""``wsbus demo``: everything on one machine with no set-up.

With the default ``--bus pyro``: a Pyro name server, the message bus and the demo services
(echo, chat) as their own processes, and the gateway in this process with the demo page on
its own HTTP port. ``--bus memory`` runs the same services inside the gateway's process.
Ctrl-C or SIGTERM stops every process it started.

The Pyro processes share a secret, generated for the run (``secrets.token_urlsafe``) unless
``WSBUS_SECRET`` is set: without one, any local process could pose as a demo service, read
every chat message, or send to the page's clients as "echo". The children get it in their
environment, never on their command line, which any local user can read with ``ps``.
``--no-secret`` runs without one, with a warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import sys
import tempfile
import webbrowser
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from wsbus.errors import BusUnavailable
from wsbus.gateway import Gateway, GatewayConfig
from wsbus.memory import MemoryBus
from wsbus.registry import AliasPolicy

from .config import SECRET_ENV
from .supervisor import Child, ChildFailed, free_port

__all__ = ["DEMO_SERVICES", "run_demo", "static_dir"]

log = logging.getLogger("wsbus.demo")

DEMO_SERVICES = ("wsbus_cli.demo_services:Echo", "wsbus_cli.demo_services:Chat")
"""The services the demo runs."""


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


NO_SECRET_WARNING = (
    "wsbus demo: WARNING: running the Pyro processes with no shared secret: any process on "
    "this machine can pose as a demo service, read every chat message and send to the page's "
    "clients. Leave out --no-secret to use a generated one."
)


async def run_demo(
    *,
    bus: str = "pyro",
    host: str = "127.0.0.1",
    port: int = 8765,
    ns_port: int = 0,
    open_browser: bool = True,
    secret: str | bool | None = None,
) -> None:
    """Run the demo until SIGINT or SIGTERM.

    Args:
        bus: ``pyro`` (services as processes) or ``memory`` (in this process).
        host: the page's address.
        port: the page's port.
        ns_port: the Pyro name server's port; 0 picks a free one.
        open_browser: open the page in the default browser.
        secret: the shared secret of the Pyro processes; None takes ``$WSBUS_SECRET`` or
            generates one; False runs without (printing a warning).

    Raises:
        OSError: the port is taken (the message says which).
        BusUnavailable: the Pyro processes did not come up.
    """
    from wsbus_websockets import EdgeConfig, serve

    children: list[Child] = []
    try:
        chosen: Any
        trust = ""
        if bus == "pyro":
            shared = _secret(secret)
            chosen = await _pyro(children, ns_port, shared)
            trust = "; no shared secret" if shared is None else "; its processes share a secret"
        else:
            from .demo_services import Chat, Echo

            chosen = MemoryBus([Echo(), Chat()])
        # Nicknames get a numeric suffix when taken, as the original login did.
        gateway = Gateway(chosen, config=GatewayConfig(alias_policy=AliasPolicy.SUFFIX))
        await gateway.start()
        try:
            with static_dir() as static:
                try:
                    server = await serve(
                        gateway, host, port, config=EdgeConfig(static_dir=str(static))
                    )
                except OSError as exc:
                    raise OSError(
                        f"cannot listen on {host}:{port} ({exc.strerror or exc}); "
                        "is another demo running? Pick another with --port"
                    ) from None
                url = f"http://{host}:{server.port}/"
                line = f"wsbus demo running at {url} (bus: {bus}{trust}); Ctrl-C stops it"
                print(line, flush=True)
                if open_browser:
                    webbrowser.open(url)
                stop = asyncio.Event()
                loop = asyncio.get_running_loop()
                for signum in (signal.SIGINT, signal.SIGTERM):
                    loop.add_signal_handler(signum, stop.set)
                await stop.wait()
                print("stopping…", flush=True)
                await server.close()
        finally:
            await gateway.close()
    finally:
        for child in reversed(children):
            await asyncio.to_thread(child.stop)


def _secret(secret: str | bool | None) -> str | None:
    if secret is False:
        print(NO_SECRET_WARNING, file=sys.stderr, flush=True)
        return None
    if isinstance(secret, str) and secret:
        return secret
    return os.environ.get(SECRET_ENV) or secrets.token_urlsafe(32)


async def _pyro(children: list[Child], ns_port: int, secret: str | None) -> Any:
    from wsbus_pyro import PyroBus, PyroConfig

    ns_port = ns_port or free_port()
    config = PyroConfig(ns_port=ns_port, secret=secret)
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

    children.append(await asyncio.to_thread(start, "nameserver"))
    children.append(await asyncio.to_thread(start, "bus"))
    for spec in DEMO_SERVICES:
        children.append(await asyncio.to_thread(start, "service", spec))
    return PyroBus(config)
