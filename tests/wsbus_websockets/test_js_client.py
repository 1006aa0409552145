"""wsbus.js against a real gateway on 127.0.0.1, run by Node (skipped without Node 20+).

Node's built-in WebSocket (a flag in Node 20, on by default from 22) is the browser API the
module is written for.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from websockets.asyncio.server import serve as ws_serve
from websockets.typing import Subprotocol

from tests.wsbus_websockets.test_client import HandGateway, Room, _acked, _message, _recv
from wsbus import ConnId, Gateway, GatewayConfig, ResumeSettings, Service
from wsbus.history import HistoryConfig
from wsbus.wire import Codec
from wsbus_cli.demo_services import Echo
from wsbus_cli.supervisor import free_port
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


# -- resume, resync and acknowledgements, against a gateway played by hand -------------------

# A page driven line by line: each stdin line is a command (JSON), each stdout line an
# event. "new" makes a new client on the same storage, as a reloaded page would (the old
# one is dropped without close(), its socket closed as a leaving page's is, by "leave" or
# by "new" itself).
HARNESS = """
import { WsbusClient } from %(module)s;
import { createInterface } from "node:readline";

const out = (line) => console.log(JSON.stringify(line));
const items = new Map();
const storage = {
  getItem: (key) => (items.has(key) ? items.get(key) : null),
  setItem: (key, value) => items.set(key, String(value)),
  removeItem: (key) => items.delete(key),
};
const waiting = new Map();  // frame id -> resolve of its handler's promise
let client = null;

function make(options) {
  const defaults = { storage, backoff: [10, 50], maxAttempts: 1000 };
  const made = new WsbusClient(%(url)s, { ...defaults, ...options });
  for (const name of ["welcome", "resumed", "resync", "close", "reconnecting"]) {
    made.addEventListener(name, (e) => out({ event: name, detail: e.detail }));
  }
  made.on("*", (frame) => {
    out({ event: "frame", frame });
    if (frame.type === "task.run") return new Promise((resolve) => waiting.set(frame.id, resolve));
  });
  return made;
}

function state() {
  return {
    event: "state", positions: client.positions, token: client.resumeToken,
    resumes: client.resumes, resyncs: client.resyncs, duplicates: client.duplicates,
    stored: storage.getItem("wsbus.session " + %(url)s),
  };
}

for await (const line of createInterface({ input: process.stdin })) {
  const command = JSON.parse(line);
  if (command.do === "leave") {
    client._closing = true;
    client._ws.close(4000, "page left");
  } else if (command.do === "new") {
    if (client && !client._closing) {
      client._closing = true;
      client._ws.close(4000, "page left");
    }
    client = make(command.options || {});
    client.connect().catch((err) => out({ event: "refused", code: err.code }));
  } else if (command.do === "state") {
    out(state());
  } else if (command.do === "finish") {
    waiting.get(command.id)();
  } else if (command.do === "processed") {
    client.processed({ id: command.id, ack: true });
  } else if (command.do === "url") {
    client.url = command.url;
  } else if (command.do === "request") {
    client.request(command.type, command.content ?? null).then(
      (reply) => out({ event: "reply", reply }),
      (err) => out({ event: "reply", error: String(err) }),
    );
  } else if (command.do === "send") {
    client.send(command.type, command.content ?? null);
  } else if (command.do === "close") {
    client.close();
    out({ event: "closed", stored: storage.getItem("wsbus.session " + %(url)s) });
    process.exit(0);
  }
}
"""


class Page:
    """The harness in Node: commands in, events out."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.seen: list[dict[str, Any]] = []  # every event read, for a failure's report

    async def do(self, command: str, **args: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"do": command, **args}).encode() + b"\n")
        await self.proc.stdin.drain()

    async def event(self, name: str) -> dict[str, Any]:
        """The next event named ``name``; the ones before it are skipped."""
        assert self.proc.stdout is not None
        while True:
            line = await _line(self.proc.stdout)
            self.seen.append(line)
            if line["event"] == name:
                return line

    async def state(self) -> dict[str, Any]:
        await self.do("state")
        return await self.event("state")


@contextlib.asynccontextmanager
async def _page(url: str, tmp_path: Path) -> AsyncIterator[Page]:
    """The harness in Node, speaking to ``url``; killed by its pid at the end."""
    node = _node()
    script = tmp_path / "page.mjs"
    script.write_text(HARNESS % {"module": json.dumps(JS.as_uri()), "url": json.dumps(url)})
    proc = await asyncio.create_subprocess_exec(
        node,
        "--experimental-websocket",
        "--no-warnings",
        str(script),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    page = Page(proc)
    try:
        yield page
    except BaseException:
        print("the page's events:", *page.seen, sep="\n")
        raise
    finally:
        if proc.returncode is None:
            proc.kill()  # this test's own process, by its pid
            await proc.wait()


@pytest_asyncio.fixture
async def hand(tmp_path: Path) -> AsyncIterator[tuple[HandGateway, Page]]:
    gateway = HandGateway()
    async with ws_serve(
        gateway.handler, "127.0.0.1", 0, subprotocols=[Subprotocol(Codec.JSON.value)]
    ) as server:
        url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
        async with _page(url, tmp_path) as page:
            yield gateway, page


def _resumed(resume: dict[str, Any], **content: Any) -> str:
    return json.dumps(
        {"type": "wsbus.resumed", "id": "g1", "reply_to": resume["id"], "content": content}
    )


async def test_a_reloaded_page_resumes_with_the_stored_token_and_positions(
    hand: tuple[HandGateway, Page],
) -> None:
    gateway, page = hand
    await page.do("new")
    first = await gateway.accept("gw.1", token="t1")
    await page.event("welcome")
    for n in (1, 2):
        await first.send(_message(n))
    assert (await page.event("frame"))["frame"]["pos"] == "e1:1"
    assert (await page.event("frame"))["frame"]["pos"] == "e1:2"
    state = await page.state()
    assert state["positions"] == {"room.1": "e1:2"} and state["token"] == "t1"
    assert json.loads(state["stored"])["positions"] == {"room.1": "e1:2"}
    # The page reloads: a new client, the same sessionStorage.
    await page.do("new")
    second = await gateway.accept("gw.2", token="t2")
    resume = await _recv(second)
    assert resume["type"] == "wsbus.resume"
    assert resume["content"] == {"token": "t1", "positions": {"room.1": "e1:2"}}
    await second.send(
        _resumed(resume, groups=["room.1"], recovered=["room.1"], resync=[], token="t3")
    )
    assert (await page.event("resumed"))["detail"]["token"] == "t3"
    await page.event("welcome")
    await second.send(_message(3))
    assert (await page.event("frame"))["frame"]["pos"] == "e1:3"
    state = await page.state()
    assert state["positions"] == {"room.1": "e1:3"} and state["token"] == "t3"
    assert (state["resumes"], state["resyncs"]) == (1, 0)
    # A close for good forgets the stored session.
    await page.do("close")
    assert (await page.event("closed"))["stored"] is None


async def test_the_page_hears_resync_when_a_group_or_the_session_is_lost(
    hand: tuple[HandGateway, Page],
) -> None:
    gateway, page = hand
    await page.do("new")
    first = await gateway.accept("gw.1", token="t1")
    await first.send(_message(1))
    await first.send(_message(4, group="room.2"))
    await page.event("frame")
    await page.event("frame")
    # The server goes away: the client reconnects and resumes.
    await first.close(1012, "restart")
    second = await gateway.accept("gw.2", token="t2")
    resume = await _recv(second)
    await second.send(
        _resumed(
            resume, groups=["room.1", "room.2"], resync=["room.2"], alias_lost="ann", token="t3"
        )
    )
    resync = (await page.event("resync"))["detail"]
    assert resync["groups"] == ["room.2"] and resync["restored"] is True
    assert resync["reason"] == "resync" and resync["alias_lost"] == "ann"
    assert (await page.state())["positions"] == {"room.1": "e1:1"}
    # Lost again, and this time refused: nothing restored.
    await second.close(4507, "slow consumer: messages were missed")
    third = await gateway.accept("gw.3", token="t4")
    resume = await _recv(third)
    assert resume["content"]["token"] == "t3"
    await third.send(
        json.dumps(
            {
                "type": "wsbus.error",
                "id": "g2",
                "content": {
                    "code": "resume_failed",
                    "message": "expired",
                    "ref": resume["id"],
                    "retry": False,
                },
            }
        )
    )
    resync = (await page.event("resync"))["detail"]
    assert resync["restored"] is False and resync["reason"] == "resume_failed"
    assert resync["groups"] == ["room.1", "room.2"]
    state = await page.state()
    assert state["positions"] == {} and state["token"] == "t4" and state["resyncs"] == 2


async def test_the_page_acknowledges_on_arrival_or_when_its_handler_is_done(
    hand: tuple[HandGateway, Page],
) -> None:
    gateway, page = hand
    await page.do("new", options={"ackTypes": ["task.run"]})
    ws = await gateway.accept("gw.1", token="t1")
    await ws.send(json.dumps({"type": "note", "content": 1, "id": "n1", "ack": True}))
    assert await _acked(ws) == ["n1"]
    # task.run's handler returns a promise: the ack waits for it.
    await ws.send(_message(1, type="task.run", ack=True))
    await ws.send(_message(2, type="task.run", ack=True))
    seen = [(await page.event("frame"))["frame"]["id"] for _ in range(3)]
    assert seen == ["n1", "m1", "m2"]
    await page.do("send", type="probe")
    assert (await _recv(ws))["type"] == "probe"
    await page.do("finish", id="m2")
    assert await _acked(ws) == ["m2"]
    await page.do("finish", id="m1")
    assert await _acked(ws) == ["m1"]
    # Lost; resumed with m1 and m2 redelivered, m3 replayed twice: all dropped but m3 once,
    # and m1 and m2 acknowledged again.
    await ws.close(1012, "restart")
    second = await gateway.accept("gw.2", token="t2")
    resume = await _recv(second)
    assert resume["content"]["positions"] == {"room.1": "e1:2"}
    await second.send(_resumed(resume, groups=["room.1"], resync=[], redelivered=2, token="t3"))
    for n in (1, 2, 3, 3):
        await second.send(_message(n, type="task.run", ack=True))
    await second.send(json.dumps({"type": "marker", "content": None, "id": "x"}))
    seen = [(await page.event("frame"))["frame"]["id"] for _ in range(2)]
    assert seen == ["m3", "x"]
    await page.do("finish", id="m3")
    ids: list[str] = []
    while len(ids) < 3:
        ids += await _acked(second)
    assert sorted(ids) == ["m1", "m2", "m3"]
    state = await page.state()
    assert state["duplicates"] == 3 and state["positions"] == {"room.1": "e1:3"}


async def test_manual_acks_wait_for_processed(hand: tuple[HandGateway, Page]) -> None:
    gateway, page = hand
    await page.do("new", options={"ackTypes": ["*"], "manualAck": True})
    ws = await gateway.accept("gw.1")
    await ws.send(json.dumps({"type": "note", "content": 1, "id": "n1", "ack": True}))
    await page.event("frame")
    await page.do("send", type="probe")
    assert (await _recv(ws))["type"] == "probe"
    await page.do("processed", id="n1")
    assert await _acked(ws) == ["n1"]


# -- with a real gateway (memory bus, real WebSocket edge) -----------------------------------


@pytest.fixture
def wsbus_services() -> list[Service]:
    return [Echo(), Room()]


@pytest.fixture
def wsbus_config() -> GatewayConfig:
    return GatewayConfig(
        node="test", history=HistoryConfig(groups=("room.*",)), resume=ResumeSettings(window=30)
    )


async def _frames(page: Page, count: int) -> list[Any]:
    """The content of the next ``count`` room.item frames."""
    found: list[Any] = []
    while len(found) < count:
        frame = (await page.event("frame"))["frame"]
        if frame["type"] == "room.item":
            found.append(frame["content"])
    return found


async def test_wsbus_js_resumes_after_a_4507_and_after_a_reload(
    wsbus_server: EdgeServer, wsbus_gateway: Gateway, wsbus_ws_connect: Any, tmp_path: Path
) -> None:
    staff = await wsbus_ws_connect()
    async with _page(wsbus_server.url, tmp_path) as page:
        await page.do("new")
        first = (await page.event("welcome"))["detail"]["conn_id"]
        await page.do("request", type="room.join", content={"group": "room.1", "alias": "ann"})
        assert (await page.event("reply"))["reply"]["content"] == {"ok": True}
        for n in (1, 2):
            await staff.request("room.send", {"group": "room.1", "body": n})
        assert await _frames(page, 2) == [1, 2]
        # Closed 4507 and kept away (nothing listens at the URL) while the room goes on.
        await page.do("url", url=f"ws://127.0.0.1:{free_port()}/")
        # By the gateway itself: a service's ctx.disconnect would end the session for good.
        wsbus_gateway._sessions[ConnId(first)].close(4507, "slow consumer", flush=True)
        async with asyncio.timeout(10):
            while any(info.conn_id == first for info in wsbus_gateway.clients()):
                await asyncio.sleep(0.01)
        for n in (3, 4):
            await staff.request("room.send", {"group": "room.1", "body": n})
        await page.do("url", url=wsbus_server.url)
        resumed = (await page.event("resumed"))["detail"]
        assert resumed["alias"] == "ann" and resumed["groups"] == ["room.1"]
        assert await _frames(page, 2) == [3, 4]
        state = await page.state()
        assert state["resumes"] == 1 and state["resyncs"] == 0
        # A reload: the page leaves (the gateway keeps its session), a new client on the
        # same storage resumes it.
        await page.do("leave")
        async with asyncio.timeout(10):
            while any(info.alias == "ann" for info in wsbus_gateway.clients()):
                await asyncio.sleep(0.01)
            while wsbus_gateway.stats().sessions_saving:
                await asyncio.sleep(0.01)
        await page.do("new")
        await staff.request("room.send", {"group": "room.1", "body": 5})
        assert (await page.event("resumed"))["detail"]["alias"] == "ann"
        assert await _frames(page, 1) == [5]
        state = await page.state()
        epoch = state["positions"]["room.1"].split(":")[0]
        assert state["positions"] == {"room.1": f"{epoch}:5"} and state["duplicates"] == 0
