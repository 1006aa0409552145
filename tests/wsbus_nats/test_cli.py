"""The NATS bus on the command line, as real processes: ``wsbus nats-config``, ``wsbus service
--bus nats``, ``wsbus serve --bus nats`` and ``wsbus demo --bus nats``, on real nats-servers."""

from __future__ import annotations

import asyncio
import os
import re
import stat
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest

from tests.loops import run_in_own_loop
from wsbus.envelope import (
    ConnId,
    Envelope,
    EnvelopeId,
    Recipients,
    ServiceAddress,
    encode_envelope,
)
from wsbus_cli.supervisor import Child, free_port
from wsbus_nats import NatsConfig
from wsbus_nats.adapter import PASSWORD_ENV
from wsbus_nats.buckets import make_buckets
from wsbus_nats.permissions import SERVER_CONFIG
from wsbus_nats.servers import NatsServer, find_nats_server
from wsbus_nats.subjects import Subjects
from wsbus_websockets import connect

ECHO = "wsbus_cli.demo_services:Echo"
SUBJECTS = Subjects("wsbus")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wsbus_cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


def one_line(result: subprocess.CompletedProcess[str], status: int) -> str:
    assert result.returncode == status, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat_line = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat_line.rpartition(")")[2].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def _environ(pid: int) -> dict[str, str]:
    items = Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
    return dict(item.split("=", 1) for item in items if "=" in item)


def _gone(pid: int) -> bool:
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat_line.rpartition(")")[2].split()[0] == "Z"  # ended, not yet reaped


async def _handshake(url: str, options: dict[str, Any]) -> bytes:
    host, port = url.removeprefix("nats://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        async with asyncio.timeout(10):
            await reader.readline()  # INFO
            connect_options = {"verbose": False, "pedantic": False, **options}
            writer.write(b"CONNECT " + msgspec.json.encode(connect_options) + b"\r\nPING\r\n")
            await writer.drain()
            return await reader.readline()
    finally:
        writer.close()
        await writer.wait_closed()


# -- wsbus nats-config ------------------------------------------------------------------------


def test_nats_config_prints_a_configuration_nats_server_accepts(tmp_path: Path) -> None:
    result = run(
        "nats-config",
        "--service",
        "echo",
        "--service",
        ECHO.replace("Echo", "Chat"),
        "--gateway",
        "g1",
        "--any-gateway",
    )
    assert result.returncode == 0, result.stderr
    for user in ("svc-echo", "svc-chat", "gw-g1", "gateways"):
        assert f'user: "{user}"' in result.stdout
    # The users' settings are at the end, as comments.
    assert "# ---- svc-chat.toml ----" in result.stdout
    conf = tmp_path / "printed.conf"
    conf.write_text(result.stdout)
    check = subprocess.run(
        [find_nats_server(), "-t", "-c", str(conf)], capture_output=True, timeout=30, check=False
    )
    assert check.returncode == 0, check


def test_nats_config_writes_private_files_that_wsbus_reads(tmp_path: Path) -> None:
    out = tmp_path / "deploy"
    servers = ["--server", "nats://10.0.0.1:4222", "--server", "nats://10.0.0.2:4222"]
    result = run("nats-config", "--service", "echo", "--gateway", "g1", "--out", str(out), *servers)
    assert result.returncode == 0, result.stderr
    assert f"wsbus serve --config {out / 'gw-g1.toml'}" in result.stdout
    files = sorted(path.name for path in out.iterdir())
    assert files == sorted([SERVER_CONFIG, "svc-echo.toml", "gw-g1.toml"])
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    checked = run("config", "check", str(out / "svc-echo.toml"))
    assert checked.returncode == 0, checked.stderr
    assert 'user = "svc-echo"' in checked.stdout and 'bus = "nats"' in checked.stdout
    gateway = run("config", "check", str(out / "gw-g1.toml"))
    assert gateway.returncode == 0, gateway.stderr
    assert 'node = "g1"' in gateway.stdout
    assert '"nats://10.0.0.1:4222"' in checked.stdout
    password = re.search(r'password = "([^"]+)"', (out / "svc-echo.toml").read_text())
    assert password is not None and password.group(1) not in checked.stdout  # redacted


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--service", "a.b", "--gateway", "g"], ["service 'a.b'", "one subject token"]),
        (["--service", "echo", "--gateway", "g>"], ["gateway node 'g>'", "one subject token"]),
        (["--gateway", "g"], ["at least one service"]),
        (["--service", "echo"], ["--gateway NODE", "--any-gateway"]),
        (["--service", "nosuch.mod:Todo", "--gateway", "g"], ["no module named 'nosuch'"]),
        (["--service", "echo", "--service", "echo", "--any-gateway"], ["given twice"]),
        (["--service", "echo", "--presence", "chat", "--any-gateway"], ["--presence 'chat'"]),
    ],
)
def test_nats_config_says_what_is_wrong(args: list[str], words: list[str]) -> None:
    line = one_line(run("nats-config", *args), 2)
    for word in words:
        assert word in line, line


def test_nats_config_lets_only_presence_services_hear_presence_events() -> None:
    # A class that declares wsbus.presence is found out; a name is given with --presence.
    result = run(
        "nats-config",
        "--service",
        "wsbus_testing.services:Watcher",
        "--service",
        ECHO,
        "--service",
        "audit",
        "--presence",
        "audit",
        "--any-gateway",
    )
    assert result.returncode == 0, result.stderr
    users = result.stdout.split("user: ")[1:]
    hears = {user.split('"')[1]: '"wsbus.ev.>"' in user for user in users}
    assert hears == {"svc-watcher": True, "svc-echo": False, "svc-audit": True, "gateways": True}


# -- wsbus service --bus nats, wsbus serve --bus nats -----------------------------------------


def test_service_refuses_a_bus_that_runs_services_in_process() -> None:
    line = one_line(run("service", ECHO, "--bus", "memory"), 2)
    assert "wsbus serve --bus memory --service" in line


def test_service_without_a_nats_server_says_what_to_start() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    line = one_line(run("service", ECHO, "--bus", "nats", "--nats-url", url), 1)
    assert "no NATS server" in line and url in line


def test_credentials_the_server_refuses_are_one_line(tmp_path: Path) -> None:
    result = run("nats-config", "--service", "echo", "--any-gateway", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    with NatsServer(tmp_path / "nats", config_file=tmp_path / SERVER_CONFIG) as server:
        wrong = one_line(
            run("service", ECHO, "--bus", "nats", "--nats-url", server.url,
                "--nats-user", "svc-echo", env={PASSWORD_ENV: "wrong"}),
            1,
        )  # fmt: skip
        assert "refused user 'svc-echo'" in wrong and server.url in wrong
        assert "wsbus nats-config" in wrong
        nobody = one_line(run("serve", "--bus", "nats", "--nats-url", server.url), 1)
        assert "refused this process (no user given)" in nobody
        # The right ones: it starts (and stops cleanly) once a gateway's user has made the
        # directory's buckets (a service's may not).
        gateways = tomllib.loads((tmp_path / "gateways.toml").read_text())["nats"]
        config = NatsConfig(
            servers=(server.url,), user=gateways["user"], password=gateways["password"]
        )
        run_in_own_loop(make_buckets(config))
        child = Child(
            [
                "service",
                ECHO,
                "--config",
                str(tmp_path / "svc-echo.toml"),
                "--nats-url",
                server.url,
            ],
            timeout=60,
        )
        assert child.stop() == 0, child.text


def test_a_password_in_a_server_url_is_never_shown(tmp_path: Path) -> None:
    result = run("nats-config", "--service", "echo", "--any-gateway", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    secret = "not-the-password-4f9c2"
    with NatsServer(tmp_path / "nats", config_file=tmp_path / SERVER_CONFIG) as server:
        host = server.url.removeprefix("nats://")
        refused = run(
            "service", ECHO, "--bus", "nats", "--nats-url", f"nats://svc-echo:{secret}@{host}"
        )
        assert refused.returncode == 1 and "Traceback" not in refused.stderr
        assert secret not in refused.stdout + refused.stderr
        assert f"nats://svc-echo:***@{host}" in refused.stderr
        assert "refused user 'svc-echo'" in refused.stderr
        # Said once, whatever happens next: the command line is anyone's to read.
        assert "ps" in refused.stderr and PASSWORD_ENV in refused.stderr
        nobody = run("service", ECHO, "--bus", "nats", "--nats-url", f"nats://{secret}@{host}")
        assert nobody.returncode == 1 and secret not in nobody.stdout + nobody.stderr
        assert f"nats://***@{host}" in nobody.stderr


def test_serve_refuses_a_node_that_is_not_a_subject_token(wsbus_nats_server: NatsServer) -> None:
    # A node id with a '-' is a fine gateway node, and a fine NATS token; a ':' is neither.
    line = one_line(
        run(
            "serve",
            "--bus",
            "nats",
            "--nats-url",
            wsbus_nats_server.url,
            "--node",
            "a:b",
            "--port",
            "0",
        ),
        2,
    )
    assert "--node" in line


class Deployment:
    """A nats-server with generated users, a service and a gateway as `wsbus` processes."""

    def __init__(self, tmp_path: Path) -> None:
        self.conf = tmp_path / "deploy"
        result = run(
            "nats-config",
            "--service",
            "echo",
            "--service",
            "chat",
            "--gateway",
            "g1",
            "--out",
            str(self.conf),
        )
        assert result.returncode == 0, result.stderr
        self.server = NatsServer(tmp_path / "nats", config_file=self.conf / SERVER_CONFIG)
        self.children: list[Child] = []

    def password(self, user: str) -> str:
        text = (self.conf / f"{user}.toml").read_text()
        found = re.search(r'password = "([^"]+)"', text)
        assert found is not None
        return found.group(1)

    def start(self) -> str:
        self.server.start()
        url = self.server.url
        # The settings files choose the bus, and the gateway's node: nothing else needed
        # but where the server is.
        # The gateway first: it makes the directory's buckets (a service's user may not).
        serve = ["serve", "--config", str(self.conf / "gw-g1.toml"), "--port", "0"]
        gateway = Child([*serve, "--nats-url", url], ready="listening on", timeout=60)
        self.children.append(gateway)
        service = ["service", ECHO, "--config", str(self.conf / "svc-echo.toml")]
        self.children.append(Child([*service, "--nats-url", url], timeout=60))
        assert "wsbus gateway g1 listening" in gateway.text, gateway.text
        found = re.search(r"listening on (ws://\S+)", gateway.text)
        assert found is not None, gateway.text
        return found.group(1)

    def stop(self) -> None:
        for child in reversed(self.children):
            assert child.stop() == 0, child.text
        self.server.stop()


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    deployment = Deployment(tmp_path)
    try:
        yield deployment
    finally:
        deployment.stop()


async def test_a_secured_deployment_runs_and_wrapping_holds_across_nats(
    deployment: Deployment,
) -> None:
    ws_url = await asyncio.to_thread(deployment.start)
    errors: list[Exception] = []

    async def error(exc: Exception) -> None:
        errors.append(exc)

    async with asyncio.timeout(60), connect(ws_url) as client:
        reply = await client.request("echo", "hi")
        assert reply["content"] == {"content": "hi", "sender": reply["content"]["sender"]}
        assert reply["content"]["sender"]["conn_id"] == client.conn_id
        conn_id = client.conn_id
        assert conn_id is not None
        # A rogue process with echo's credentials (as a compromised echo would be).
        rogue = await nats.connect(
            deployment.server.url,
            user="svc-echo",
            password=deployment.password("svc-echo"),
            error_cb=error,
            allow_reconnect=False,
        )
        try:

            def envelope(sender: str, type: str, id: str) -> bytes:
                return encode_envelope(
                    Envelope(
                        id=EnvelopeId(id),
                        type=type,
                        sender=ServiceAddress(sender),
                        content={"text": "forged"},
                        recipients=Recipients(conn_ids=(ConnId(conn_id),)),
                    )
                )

            # Under chat's name: the server refuses it.
            await rogue.publish(SUBJECTS.to_gateway("g1", "chat"), envelope("chat", "chat.x", "1"))
            await rogue.flush(timeout=10)
            while not errors:
                await asyncio.sleep(0.01)
            # Under its own name but claiming to be chat: the gateway drops it.
            await rogue.publish(SUBJECTS.to_gateway("g1", "echo"), envelope("chat", "chat.y", "2"))
            # As itself: delivered. One publisher's order holds, so either forgery would
            # have reached the client first.
            await rogue.publish(SUBJECTS.to_gateway("g1", "echo"), envelope("echo", "probe", "3"))
            await rogue.flush(timeout=10)
        finally:
            await rogue.close()
        # The first frame after the acks of the requests is the honest one.
        while (frame := await client.receive())["type"] == "wsbus.ack":
            pass
        assert frame["type"] == "probe" and frame["from"] == "echo", frame
        # And the client still gets answers.
        assert (await client.request("echo", "after"))["content"]["content"] == "after"
    # The server refused the rogue's publish, and nothing wsbus itself did: the generated
    # permissions are what the bus needs.
    violations = _violations(deployment.server.log_file)
    assert len(violations) == 1 and "svc-echo" in violations[0], violations


def _violations(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if "violation" in line.lower()]


# -- wsbus demo --bus nats --------------------------------------------------------------------


async def test_the_demo_on_nats_is_private_and_stops_everything(tmp_path: Path) -> None:
    port = free_port()
    env = {PASSWORD_ENV: None, "WSBUS_NATS_TOKEN": None}
    child = await asyncio.to_thread(
        Child,
        ["demo", "--bus", "nats", "--no-browser", "--port", str(port)],
        ready="running at",
        timeout=90,
        env=env,
    )
    try:
        children = _children(child.pid)
        commands = {pid: _cmdline(pid) for pid in children}
        servers = [pid for pid, args in commands.items() if Path(args[0]).name == "nats-server"]
        services = [pid for pid, args in commands.items() if "service" in args]
        assert len(servers) == 1 and len(services) == 2, child.text
        server_args = commands[servers[0]]
        assert server_args[server_args.index("-a") + 1] == "127.0.0.1"
        conf = Path(server_args[server_args.index("-c") + 1])
        url = re.search(r"private nats-server at (nats://\S+);", child.text)
        assert url is not None, child.text
        # Nobody without a generated user gets in.
        assert (await _handshake(url.group(1), {})).startswith(b"-ERR")
        # Each service has its own user, its password in its environment only.
        passwords = set()
        for pid in services:
            args = commands[pid]
            user = args[args.index("--nats-user") + 1]
            assert user in ("svc-echo", "svc-chat")
            password = _environ(pid)[PASSWORD_ENV]
            passwords.add(password)
            assert all(password not in arg for other in children for arg in commands[other])
            answer = await _handshake(url.group(1), {"user": user, "pass": password})
            assert answer == b"PONG\r\n"
        assert len(passwords) == 2
        async with asyncio.timeout(60), connect(f"ws://127.0.0.1:{port}/") as client:
            reply = await client.request("echo", "hi")
            assert reply["content"]["content"] == "hi"
            joined = await client.request("chat.join", {"room": "lobby"})
            assert joined["content"]["ok"] is True, joined
            nick = await client.request("chat.nick", {"nick": "ann"})
            assert nick["content"]["ok"] is True, nick
            await client.request("chat.say", {"room": "lobby", "text": "hello"}, wait="ack")
            while (frame := await client.receive())["type"] != "chat.message":
                pass
            assert frame["content"] == {"room": "lobby", "from": "ann", "text": "hello"}, frame
        # Nothing the demo's processes did was refused by the server.
        log = conf.parent.parent / "server" / "nats-server.log"
        assert await asyncio.to_thread(_violations, log) == []
    finally:
        status = await asyncio.to_thread(child.stop)
    assert status == 0, child.text
    assert all(_gone(pid) for pid in children), child.text
    # The temporary directory (passwords, store) is removed.
    assert not await asyncio.to_thread(conf.exists)


# -- the adapter costs nothing until used -----------------------------------------------------


def test_the_adapter_imports_no_nats_py_until_the_bus_is_used() -> None:
    code = (
        "import sys; from wsbus_cli.cli import build_parser; build_parser();"
        "from wsbus_cli.config import load_settings;"
        "assert load_settings(None, environ={}).nats is None;"
        "s = load_settings(None, flags={'serve.bus': ('--bus', 'nats'),"
        " 'nats.servers': ('--nats-url', ('nats://a:1', 'nats://b:2')),"
        " 'nats.user': ('--nats-user', 'me')},"
        " environ={'WSBUS_NATS_PASSWORD': 'pw'});"
        "assert s.nats.servers == ('nats://a:1', 'nats://b:2') and s.nats.password == 'pw';"
        "loaded = sorted(m for m in sys.modules if m == 'nats' or m.startswith('nats.'));"
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_service_process_serves_metrics_with_its_link_counters(
    wsbus_nats_server: NatsServer,
) -> None:
    pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    port = free_port()

    def scrape() -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            body = answer.read().decode()
        return {
            sample.name: sample.value
            for family in text_string_to_metric_families(body)
            for sample in family.samples
            if sample.labels.get("service") in ("echo", None)
        }

    child = Child(
        [
            "service",
            ECHO,
            "--bus",
            "nats",
            "--nats-url",
            wsbus_nats_server.url,
            "--metrics",
            str(port),
        ],
        timeout=60,
    )
    try:
        assert f"metrics at http://127.0.0.1:{port}/metrics" in child.text
        samples = scrape()
        assert samples["wsbus_service_bus_available"] == 1
        assert samples["wsbus_service_nats_reconnects_total"] == 0
        assert samples["wsbus_service_inbox"] == 0
        assert "process_cpu_seconds_total" in samples
        wsbus_nats_server.kill()
        wsbus_nats_server.restart()
        deadline = time.monotonic() + 60
        while scrape()["wsbus_service_nats_reconnects_total"] < 1:
            assert time.monotonic() < deadline, child.text
            time.sleep(0.1)
        assert scrape()["wsbus_service_nats_disconnects_total"] >= 1
    finally:
        assert child.stop() == 0, child.text
