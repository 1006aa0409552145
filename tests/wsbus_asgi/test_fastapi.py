"""The FastAPI example (examples/fastapi_app.py) under a real uvicorn process: the gateway
mounted at /ws/ beside the application's routes, the demo's echo and the chat the browser
test does, through the mount, with the Python client."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import urllib.request
from pathlib import Path

import msgspec
import pytest

from wsbus_cli.supervisor import Child, free_port
from wsbus_websockets import connect

ROOT = Path(__file__).resolve().parents[2]
UVICORN = [sys.executable, "-m", "uvicorn"]


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read()


async def test_the_fastapi_example_serves_echo_and_chat_through_the_mount() -> None:
    port = free_port()
    child = await asyncio.to_thread(
        Child,
        [
            "examples.fastapi_app:app", "--port", str(port),
            "--http", "wsbus_asgi.server:HttpProtocol",
            "--ws", "wsbus_asgi.server:WebSocketProtocol", "--ws-max-size", "65536",
        ],
        ready="Uvicorn running on",
        command=UVICORN,
        cwd=ROOT,
    )  # fmt: skip
    try:
        base = f"127.0.0.1:{port}"
        # The application's own route and the gateway's health endpoint, below the mount.
        status, body = await asyncio.to_thread(_get, f"http://{base}/")
        assert status == 200 and msgspec.json.decode(body)["websocket"] == "/ws/"
        status, body = await asyncio.to_thread(_get, f"http://{base}/ws/healthz")
        assert status == 200 and msgspec.json.decode(body)["status"] == "ok"
        url = f"ws://{base}/ws/"
        async with asyncio.timeout(30), connect(url) as ann, connect(url) as bob:
            reply = await ann.request("echo", "through FastAPI")
            assert reply["content"]["content"] == "through FastAPI"
            # The chat of the browser test: a nickname, a room, a message both members get.
            nick = await ann.request("chat.nick", {"nick": "ann"})
            assert nick["content"]["ok"] is True, nick
            for client in (ann, bob):
                joined = await client.request("chat.join", {"room": "lobby"})
                assert joined["content"]["ok"] is True, joined
            await ann.request("chat.say", {"room": "lobby", "text": "hello"}, wait="ack")
            for client in (ann, bob):
                while (frame := await client.receive())["type"] != "chat.message":
                    pass
                assert frame["content"] == {"room": "lobby", "from": "ann", "text": "hello"}
    finally:
        status = await asyncio.to_thread(child.stop)
    # SIGTERM: uvicorn stops, FastAPI's lifespan closes the gateway; then uvicorn ends the
    # process with the signal it caught (recent releases), or exits 0 (older ones).
    assert status in (0, -signal.SIGTERM), child.text
    assert "Application shutdown complete" in child.text, child.text
    assert "Traceback" not in child.text and "ERROR" not in child.text, child.text


_CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.mark.skipif(
    not os.path.exists(_CHROMIUM), reason="the browser test needs Debian's Chromium"
)
async def test_two_browser_pages_chat_through_a_gateway_mounted_in_fastapi() -> None:
    # The browser test's chat (tests/wsbus_cli/test_demo_browser.py), in a real Chromium,
    # with the demo page and the gateway mounted at /ws/ in a FastAPI application under a
    # real uvicorn process.
    from tests.wsbus_cli.test_demo_browser import CHROMIUM, CHROMIUM_ARGS, HOW_TO, _open

    playwright_api = pytest.importorskip("playwright.async_api", reason=HOW_TO)

    port = free_port()
    child = await asyncio.to_thread(
        Child,
        ["-m", "tests.wsbus_asgi.fastapi_chat", str(port)],
        ready="Uvicorn running on",
        command=[sys.executable],
        cwd=ROOT,
    )
    try:
        page_url = f"http://127.0.0.1:{port}/ws/"
        async with playwright_api.async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                ann = await _open(browser, page_url, "ann")
                bob = await _open(browser, page_url, "bob")
                await ann.fill("#text", "hello from FastAPI")
                await ann.click("#say-form button")
                for page in (ann, bob):
                    line = page.locator("#messages li", has_text="hello from FastAPI")
                    await line.wait_for(timeout=10_000)
                    assert await line.locator(".from").inner_text() == "ann"
            finally:
                await browser.close()
    finally:
        status = await asyncio.to_thread(child.stop)
    assert status in (0, -signal.SIGTERM), child.text
    assert "Traceback" not in child.text, child.text
