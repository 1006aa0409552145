"""wsbus.js against a real gateway on 127.0.0.1, run by Node (skipped without Node 20+).

Node's built-in WebSocket (a flag in Node 20, on by default from 22) is the browser API the
module is written for.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from wsbus import Gateway
from wsbus_websockets import EdgeServer

JS = Path(__file__).parents[2] / "wsbus_websockets" / "js" / "wsbus.js"

SCRIPT = """
import { WsbusClient } from %(module)s;
import { createInterface } from "node:readline";

const out = (line) => console.log(JSON.stringify(line));
const onGap = [];
const client = new WsbusClient(%(url)s, { reconnect: false, onGap: (f) => onGap.push(f) });
const events = [];
client.addEventListener("gap", (e) => events.push(e.detail));
const handled = [];
client.on("wsbus.gap", (f) => handled.push(f));
const welcome = await client.connect();
out({ welcome: welcome.conn_id });
for await (const line of createInterface({ input: process.stdin })) {
  if (line === "check") {
    const reply = await client.request("echo", { after: "gap" });
    out({ gaps: client.gaps, events, onGap, handled, reply: reply.content.content });
    client.close();
    process.exit(0);
  }
}
"""


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node is not installed")
    probe = subprocess.run(
        [
            node,
            "--experimental-websocket",
            "-e",
            "process.exit(typeof WebSocket === 'function' ? 0 : 1)",
        ],
        capture_output=True,
        timeout=30,
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip("this Node has no WebSocket (Node 20.10 or later needed)")
    return node


async def _line(stream: asyncio.StreamReader) -> dict[str, Any]:
    async with asyncio.timeout(20):
        raw = await stream.readline()
    assert raw, "node ended without a line"
    value: dict[str, Any] = json.loads(raw)
    return value


async def test_wsbus_js_surfaces_a_gap(
    wsbus_server: EdgeServer, wsbus_gateway: Gateway, tmp_path: Path
) -> None:
    node = _node()
    script = tmp_path / "gap.mjs"
    script.write_text(
        SCRIPT % {"module": json.dumps(JS.as_uri()), "url": json.dumps(wsbus_server.url)}
    )
    proc = await asyncio.create_subprocess_exec(
        node,
        "--experimental-websocket",
        "--no-warnings",
        str(script),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        welcome = await _line(proc.stdout)
        assert welcome["welcome"].startswith(wsbus_gateway.node)
        wsbus_gateway.deliveries_lost("bus_disconnected", "test")
        proc.stdin.write(b"check\n")
        await proc.stdin.drain()
        proc.stdin.close()
        seen = await _line(proc.stdout)
        assert seen["gaps"] == 1 and seen["reply"] == {"after": "gap"}
        [gap] = seen["events"]
        assert gap["type"] == "wsbus.gap" and gap["content"]["reason"] == "bus_disconnected"
        assert seen["onGap"] == [gap] and seen["handled"] == [gap]
        async with asyncio.timeout(20):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()  # this test's own process, by its pid
            await proc.wait()
