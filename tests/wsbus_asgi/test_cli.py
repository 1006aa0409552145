"""``wsbus serve --edge asgi`` in a real process: found by its entry point, the gateway's
ASGI application under uvicorn on the command's own loop, serving a real client, stopping
cleanly (the gateway first: the client gets 1001, not uvicorn's 1012)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import urllib.request

import msgspec
import pytest

from wsbus import ConnectionClosed
from wsbus_cli.supervisor import Child, free_port
from wsbus_websockets import connect

COMMAND = [sys.executable, "-m", "wsbus_cli"]


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read()


async def test_serve_with_the_asgi_edge() -> None:
    port = free_port()
    child = await asyncio.to_thread(
        Child,
        [
            "serve", "--edge", "asgi", "--port", str(port),
            "--service", "wsbus_cli.demo_services:Echo",
        ],
        ready="listening on",
        command=COMMAND,
    )  # fmt: skip
    stopped: asyncio.Task[int] | None = None
    try:
        assert f"ws://127.0.0.1:{port}/" in child.text
        status, body = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/healthz")
        assert status == 200 and msgspec.json.decode(body)["status"] == "ok"
        url = f"ws://127.0.0.1:{port}/"
        async with asyncio.timeout(30), connect(url, reconnect=False) as client:
            reply = await client.request("echo", "via asgi")
            assert reply["content"]["content"] == "via asgi"
            stopped = asyncio.create_task(asyncio.to_thread(child.stop))
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await client.receive()
            assert closed.value.code == 1001
        assert await stopped == 0, child.text
    finally:
        if stopped is None:
            await asyncio.to_thread(child.stop)
    assert "Traceback" not in child.text, child.text


def test_the_edge_imports_no_uvicorn_until_it_is_used() -> None:
    code = (
        "import sys; from wsbus_cli.cli import build_parser; build_parser();"
        "import wsbus_asgi, wsbus_asgi.adapter;"
        "assert 'uvicorn' not in sys.modules, 'uvicorn imported';"
        # Without uvicorn, its names say which extra to install.
        "sys.modules['uvicorn'] = None;"
        "from wsbus.errors import MissingExtra\n"
        "try:\n    wsbus_asgi.serve\n"
        "except MissingExtra as exc:\n    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "this needs the 'asgi' extra: pip install 'wsbus[asgi]'"
