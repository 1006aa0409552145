"""``wsbus demo``: everything on one machine with no set-up.

The bus adapter (``--bus``, ``pyro`` by default) starts what it needs and runs the demo
services (echo, chat): with ``pyro``, a name server, the message bus and the services as
their own processes; with ``memory``, the services inside this process; with any other
installed bus adapter, what its ``demo`` does. The gateway runs in this process, with the
demo page on its own HTTP port through the ``websockets`` edge (the page speaks to it with
``wsbus.js``). Ctrl-C or SIGTERM stops every process it started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import tempfile
import webbrowser
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Final

from wsbus.gateway import Gateway, GatewayConfig
from wsbus.registry import AliasPolicy

from .adapters import find_bus, find_edge
from .config import section_struct

__all__ = ["DEMO_SERVICES", "run_demo", "static_dir"]

log = logging.getLogger("wsbus.demo")

DEMO_SERVICES: Final = ("wsbus_cli.demo_services:Echo", "wsbus_cli.demo_services:Chat")
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
    # Handled from the start: a SIGTERM while the bus's processes start (or just after the
    # "running at" line) still stops everything in order, and the exit status is 0.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with adapter.demo(options, DEMO_SERVICES) as chosen:
        # Nicknames get a numeric suffix when taken, as the original login did.
        gateway = Gateway(chosen, config=GatewayConfig(alias_policy=AliasPolicy.SUFFIX))
        await gateway.start()
        try:
            with static_dir() as static:
                config = section_struct(edge.section)() if edge.section is not None else None
                try:
                    server = await edge.serve(gateway, host, port, config, static_dir=str(static))
                except OSError as exc:
                    raise OSError(
                        f"cannot listen on {host}:{port} ({exc.strerror or exc}); "
                        "is another demo running? Pick another with --port"
                    ) from None
                try:
                    url = f"http://{host}:{server.port}/"
                    print(f"wsbus demo running at {url} (bus: {bus}); Ctrl-C stops it", flush=True)
                    if open_browser:
                        webbrowser.open(url)
                    await stop.wait()
                    print("stopping…", flush=True)
                finally:
                    await gateway.close()
                    await server.close()
        finally:
            await gateway.close()
