"""``wsbus serve --edge picows`` in a real process: found by its entry point, serving a
real client, stopping cleanly."""

from __future__ import annotations

import asyncio
import sys

from wsbus_cli.supervisor import Child, free_port
from wsbus_websockets import connect

COMMAND = [sys.executable, "-m", "wsbus_cli"]


async def test_serve_with_the_picows_edge() -> None:
    port = free_port()
    child = Child(
        [
            "serve", "--edge", "picows", "--port", str(port),
            "--service", "wsbus_cli.demo_services:Echo",
        ],
        ready="listening on",
        command=COMMAND,
    )  # fmt: skip
    try:
        assert f"ws://127.0.0.1:{port}/" in child.text
        async with asyncio.timeout(30), connect(f"ws://127.0.0.1:{port}/") as client:
            reply = await client.request("echo", "via picows")
            assert reply["content"]["content"] == "via picows"
    finally:
        assert child.stop() == 0, child.text
