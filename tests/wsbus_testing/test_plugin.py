"""The pytest plugin's fixtures (wsbus_testing/plugin.py), run in a pytest of their own."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("websockets")

INNER = """
import asyncio

import pytest
import websockets.asyncio.client
from wsbus.wire import Codec

CLOSES = []


@pytest.fixture
async def close_seen():
    # Requested before wsbus_server: set up before it, torn down after it and the gateway.
    found = {}
    yield found
    async with asyncio.timeout(10):
        await found["ws"].wait_closed()
    CLOSES.append((found["ws"].close_code, found["ws"].close_reason))


async def test_connected_at_teardown(close_seen, wsbus_server):
    ws = await websockets.asyncio.client.connect(wsbus_server.url, subprotocols=[Codec.JSON.value])
    async with asyncio.timeout(10):
        first = await ws.recv()
    assert "wsbus.welcome" in first
    close_seen["ws"] = ws


def test_the_gateway_closed_the_connection():
    assert CLOSES == [(1001, "server shutting down")]
"""


def test_wsbus_server_closes_the_gateway_then_the_edge(tmp_path: Path) -> None:
    # The gateway closes its connections itself (1001, with its reason) while the edge is
    # still up; an edge closed first would cut them (1001, no reason) before it drained.
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(INNER))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "asyncio_mode=auto",
            "-o",
            "asyncio_default_fixture_loop_scope=function",
            "test_inner.py",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
