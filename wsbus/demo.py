"""``wsbus demo``: everything on one machine with no set-up.

With the default ``--bus pyro``: a Pyro name server, the message bus and the demo services
(echo, chat) as their own processes, and the gateway in this process with the demo page on
its own HTTP port. ``--bus memory`` runs the same services inside the gateway's process.
Ctrl-C or SIGTERM stops every process it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import webbrowser
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from .gateway import Gateway, GatewayConfig
from .memory import MemoryBus
from .processes import Child, free_port
from .registry import AliasPolicy

__all__ = ["DEMO_SERVICES", "run_demo", "static_dir"]

log = logging.getLogger("wsbus.demo")

DEMO_SERVICES = ("wsbus.demo_services:Echo", "wsbus.demo_services:Chat")
"""The services the demo runs."""


@contextlib.contextmanager
def static_dir() -> Iterator[Path]:
    """Yield the directory of the demo page and its JavaScript client."""
    with resources.as_file(resources.files("wsbus") / "demo_static") as path:
        yield Path(path)


async def run_demo(
    *, bus: str = "pyro", host: str = "127.0.0.1", port: int = 8765, open_browser: bool = True
) -> None:
    """Run the demo until SIGINT or SIGTERM.

    Raises:
        OSError: the port is taken (the message says which).
        BusUnavailable: the Pyro processes did not come up.
    """
    from wsbus_websockets import EdgeConfig, serve

    children: list[Child] = []
    try:
        chosen: Any
        if bus == "pyro":
            chosen = await _pyro(children)
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
                print(f"wsbus demo running at {url} (bus: {bus}); Ctrl-C stops it", flush=True)
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


async def _pyro(children: list[Child]) -> Any:
    from wsbus_pyro import PyroBus, PyroConfig

    ns_port = free_port()
    config = PyroConfig(ns_port=ns_port)
    args = ["--ns-port", str(ns_port)]
    children.append(await asyncio.to_thread(Child, ["nameserver", *args]))
    children.append(await asyncio.to_thread(Child, ["bus", *args]))
    for spec in DEMO_SERVICES:
        children.append(await asyncio.to_thread(Child, ["service", spec, *args]))
    return PyroBus(config)
