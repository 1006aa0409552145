"""``wsbus demo`` as real processes: its Pyro processes share a secret no other process has."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import msgspec
import pytest

from wsbus import GatewayConfig, Service
from wsbus.edge import MemoryClient
from wsbus_cli.demo import ROOM_GROUPS, demo_config
from wsbus_cli.demo_services import Chat
from wsbus_cli.supervisor import Child, free_port

pytest.importorskip("Pyro5")
pytest.importorskip("websockets")

from Pyro5 import errors as pyro_errors
from Pyro5.api import Proxy, locate_ns

from wsbus_pyro import PyroConfig
from wsbus_pyro.transport import make_proxy, name_server
from wsbus_websockets import RESYNC, connect


@contextlib.contextmanager
def _without_secret() -> Iterator[None]:
    """Start the demo the way a user does, with no WSBUS_SECRET in the environment."""
    saved = os.environ.pop("WSBUS_SECRET", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["WSBUS_SECRET"] = saved


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The parent pid is the 4th field, after the command name in parentheses.
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def _cmdline(pid: int) -> list[str]:
    return (Path(f"/proc/{pid}/cmdline").read_bytes().decode()).split("\0")


def _environ(pid: int) -> dict[str, str]:
    items = Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
    return dict(item.split("=", 1) for item in items if "=" in item)


class Demo:
    def __init__(self, child: Child, port: int) -> None:
        self.child = child
        self.url = f"ws://127.0.0.1:{port}/"
        self.children = _children(child.pid)
        # Found from the children's command lines, as any local process could.
        args = _cmdline(self.children[0])
        self.ns_port = int(args[args.index("--ns-port") + 1])


@pytest.fixture(scope="module")
def demo() -> Iterator[Demo]:
    port = free_port()
    with _without_secret():
        child = Child(["demo", "--no-browser", "--port", str(port)], ready="running at", timeout=60)
    try:
        yield Demo(child, port)
    finally:
        assert child.stop() == 0, child.text


def _rogue(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "WSBUS_SECRET"}
    return subprocess.run(
        [sys.executable, "-m", "wsbus_cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def test_the_demo_processes_share_a_secret_in_their_environment_only(demo: Demo) -> None:
    assert len(demo.children) == 4, demo.child.text  # name server, bus, echo, chat
    secrets = {_environ(pid).get("WSBUS_SECRET") for pid in demo.children}
    assert len(secrets) == 1
    secret = secrets.pop()
    assert secret is not None and len(secret) >= 32
    # Never on a command line, which `ps` shows every local user.
    for pid in [demo.child.pid, *demo.children]:
        assert all(secret not in arg for arg in _cmdline(pid))


def test_a_rogue_service_without_the_secret_cannot_register(demo: Demo) -> None:
    result = _rogue(["service", "wsbus_cli.demo_services:Echo", "--ns-port", str(demo.ns_port)])
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "do not share a secret" in lines[0] and "WSBUS_SECRET" in lines[0]


def test_a_rogue_pyro_client_cannot_register_nor_deliver(demo: Demo) -> None:
    # Plain Pyro, as any local process could: the name server refuses it at the handshake.
    with pytest.raises(pyro_errors.PyroError):
        locate_ns("127.0.0.1", demo.ns_port).list()
    secret = _environ(demo.children[1])["WSBUS_SECRET"]
    config = PyroConfig(ns_port=demo.ns_port, secret=secret)
    with name_server(config) as ns:
        names = ns.list()
    bus_uri = names["wsbus.bus"]
    gateways = [uri for name, uri in names.items() if name.startswith("wsbus.gateway.")]
    assert len(gateways) == 1
    # Plain Pyro, as any local process could: no proof of the secret.
    with Proxy(bus_uri) as bus, pytest.raises(pyro_errors.PyroError):
        bus.register_service("spy", ["chat.message", "chat.say"], "PYRO:spy@127.0.0.1:1")
    with Proxy(gateways[0]) as gateway, pytest.raises(pyro_errors.PyroError):
        gateway.deliver(b"")
    # The control: with the demo's secret the same bus answers, and the spy is not there.
    with make_proxy(bus_uri, config) as bus:
        assert bus.registered("service", "spy", "PYRO:spy@127.0.0.1:1") is False


async def test_the_demo_still_works_with_its_secret(demo: Demo) -> None:
    async with asyncio.timeout(30):
        async with connect(demo.url) as client:
            reply = await client.request("echo", "hi")
            assert reply["content"]["content"] == "hi"


def test_no_secret_needs_a_flag_and_warns() -> None:
    port = free_port()
    with _without_secret():
        child = Child(
            ["demo", "--no-browser", "--no-secret", "--port", str(port)],
            ready="running at",
            timeout=60,
        )
    try:
        assert "WARNING" in child.text and "no shared secret" in child.text
        for pid in _children(child.pid):
            assert "WSBUS_SECRET" not in _environ(pid)
    finally:
        assert child.stop() == 0, child.text


def test_a_taken_port_is_said_before_the_bus_starts() -> None:
    # Found before the bus's processes start: no Pyro stack is started (nor its line
    # printed) for a demo that cannot serve its page.
    port = free_port()
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", port))
        taken.listen()
        result = subprocess.run(
            [sys.executable, "-m", "wsbus_cli", "demo", "--no-browser", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 1, result
    assert result.stderr.strip().startswith(f"wsbus demo: cannot listen on 127.0.0.1:{port} ("), (
        result.stderr
    )
    assert "another demo running? Pick another with --port" in result.stderr
    assert "Pyro" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


# -- the chat service (in-process, on the memory bus) ----------------------------------------

Connect = Callable[..., Awaitable[MemoryClient]]
ROOM_RULE = "a room name is 1-48 of A-Z a-z 0-9 _ -"
NOT_IN_LOBBY = {"ok": False, "room": "lobby", "error": "you are not in #lobby: join it first"}


async def test_chat_refuses_a_post_to_a_room_the_sender_is_not_in(
    wsbus_connect: Connect, wsbus_services: list[Service]
) -> None:
    ann = await wsbus_connect()
    ann.send("chat.say", {"room": "lobby", "text": "never joined"}, id="1")
    assert (await ann.receive_until("chat.say.reply"))["content"] == NOT_IN_LOBBY
    ann.send("chat.join", {"room": "lobby"})
    await ann.receive_until("chat.join.reply")
    ann.send("chat.say", {"room": "lobby", "text": "in"})
    assert (await ann.receive_until("chat.message"))["content"]["text"] == "in"
    ann.send("chat.leave", {"room": "lobby"})
    await ann.receive_until("chat.leave.reply")
    ann.send("chat.say", {"room": "lobby", "text": "left"})
    assert (await ann.receive_until("chat.say.reply"))["content"] == NOT_IN_LOBBY
    # A room name out of the rule: the reply states the rule.
    ann.send("chat.join", {"room": "bad room!"})
    reply = await ann.receive_until("chat.join.reply")
    assert reply["content"]["ok"] is False and ROOM_RULE in reply["content"]["error"]


async def test_chat_asks_the_gateway_about_members_it_did_not_see_join(
    wsbus_connect: Connect, wsbus_services: list[Service]
) -> None:
    bob = await wsbus_connect()
    bob.send("chat.join", {"room": "lobby"})
    await bob.receive_until("chat.join.reply")
    # As after a restart of the service: it remembers nobody, the gateway's groups hold.
    chat = next(service for service in wsbus_services if isinstance(service, Chat))
    chat._members.clear()
    bob.send("chat.say", {"room": "lobby", "text": "still here"})
    assert (await bob.receive_until("chat.message"))["content"]["text"] == "still here"


@pytest.fixture
def wsbus_config() -> GatewayConfig:
    """The demo's gateway configuration (rooms keep history, send presence frames)."""
    return msgspec.structs.replace(demo_config(), node="test")


def test_the_demo_config_resumes_keeps_room_history_and_sends_presence() -> None:
    config = demo_config()
    assert config.history.keeps("room.lobby") and not config.history.keeps("lobby")
    assert config.presence_frames == ROOM_GROUPS
    assert config.resume.enabled and config.resume.secret is not None
    # A new key per run unless given: what every gateway of one run must share.
    assert demo_config().resume.secret != config.resume.secret
    assert demo_config("ab" * 32).resume.secret == "ab" * 32


async def test_chat_lists_who_is_in_a_room_and_members_hear_joins_and_leaves(
    wsbus_connect: Connect, wsbus_services: list[Service]
) -> None:
    ann = await wsbus_connect()
    bob = await wsbus_connect()
    ann.send("chat.nick", {"nick": "ann"})
    await ann.receive_until("chat.nick.reply")
    ann.send("chat.join", {"room": "lobby"})
    await ann.receive_until("chat.join.reply")
    bob.send("chat.join", {"room": "lobby"})
    await bob.receive_until("chat.join.reply")
    joined = await ann.receive_until("wsbus.presence")
    assert joined["content"] == {
        "group": "room.lobby",
        "event": "join",
        "conn_id": bob.conn_id,
        "alias": None,
        "user": None,
    }
    bob.send("chat.members", {"room": "lobby"})
    reply = (await bob.receive_until("chat.members.reply"))["content"]
    assert reply["ok"] is True and reply["room"] == "lobby"
    members = {member["conn_id"]: member for member in reply["members"]}
    assert members == {
        ann.conn_id: {"conn_id": ann.conn_id, "alias": "ann", "user": None},
        bob.conn_id: {"conn_id": bob.conn_id, "alias": None, "user": None},
    }
    bob.send("chat.leave", {"room": "lobby"})
    await bob.receive_until("chat.leave.reply")
    left = await ann.receive_until("wsbus.presence")
    assert left["content"]["event"] == "leave" and left["content"]["conn_id"] == bob.conn_id
    # A room out of the rule: the reply states it.
    bob.send("chat.members", {"room": "no room"})
    refused = (await bob.receive_until("chat.members.reply"))["content"]
    assert refused["ok"] is False and ROOM_RULE in refused["error"]


async def test_the_memory_demo_resumes_a_chat_with_the_messages_missed() -> None:
    # Pyro and NATS: in a browser (test_demo_browser.py); the memory bus here, with the
    # Python client, against `wsbus demo --bus memory` as a user starts it.
    port = free_port()
    child = Child(
        ["demo", "--no-browser", "--port", str(port), "--bus", "memory"],
        ready="running at",
        timeout=60,
    )
    try:
        url = f"ws://127.0.0.1:{port}/"
        async with (
            asyncio.timeout(30),
            connect(url, backoff=(0.01, 0.05)) as ann,
            connect(url) as bob,
        ):

            async def members() -> set[str]:
                listed = await bob.request("chat.members", {"room": "lobby"})
                return {member["alias"] for member in listed["content"]["members"]}

            for client, nick in ((ann, "ann"), (bob, "bob")):
                await client.request("chat.nick", {"nick": nick})
                await client.request("chat.join", {"room": "lobby"})
            assert await members() == {"ann", "bob"}
            # A first message gives Ann a position in the room's history to resume from.
            await bob.send("chat.say", {"room": "lobby", "text": "zero"})
            while (await ann.receive())["type"] != "chat.message":
                pass
            # Ann's connection drops and stays away (nothing listens at her URL) while Bob
            # talks; then she is back.
            ann.url = f"ws://127.0.0.1:{free_port()}/"
            assert ann._ws is not None
            ann._ws.transport.abort()
            while "ann" in await members():
                await asyncio.sleep(0.01)
            for text in ("one", "two"):
                await bob.send("chat.say", {"room": "lobby", "text": text})
                while (await bob.receive()).get("content") != {
                    "room": "lobby",
                    "from": "bob",
                    "text": text,
                }:
                    pass  # until it is out to the room (Bob is in it), while Ann is away
            ann.url = url
            said: list[str] = []
            while len(said) < 2:
                message = await ann.receive()
                assert message["type"] != RESYNC, message
                if message["type"] == "chat.message":
                    said.append(message["content"]["text"])
            assert said == ["one", "two"]
            assert ann.resumes == 1 and ann.resumed["alias"] == "ann"
    finally:
        assert child.stop() == 0, child.text
