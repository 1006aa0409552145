"""The Pyro bus against a bus crash, worker-pool floods and the keep-serialized path.

Every process is real (``python -m wsbus_cli ...`` on 127.0.0.1, ended by its own pid): a name
server, the message bus, services; the gateway runs in this process with in-memory
clients. Every wait is bounded; no duration is compared with a constant.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import marshal
import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
import serpent
from Pyro5 import protocol
from Pyro5.client import Proxy
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed as WsClosed
from websockets.typing import Subprotocol

from tests.conftest import assert_balanced
from tests.wsbus_pyro.test_faults import (
    ECHO,
    WAIT,
    Kit,
    args_for,
    daemon_address,
    env_for,
    kit,
    ns_lookup,
    proof,
    pyro_bus,
)
from wsbus import (
    ConnectionClosed,
    ConnId,
    Context,
    Envelope,
    Gateway,
    Recipients,
    Service,
    ServiceAddress,
    handles,
)
from wsbus.edge import MemoryClient
from wsbus.envelope import EnvelopeId
from wsbus_cli.demo_services import Echo
from wsbus_pyro import PyroConfig, ServiceHost
from wsbus_pyro.transport import encode_batch, lookup, make_proxy
from wsbus_testing.children import Child, free_port
from wsbus_testing.services import Director

__all__ = ["kit"]  # the fixture, imported for the tests here

SERPENT_ID = 1
SETTLE = 40.0
"""Seconds answers may take to arrive after traffic stops (a retried reply included)."""
SLOW_ECHO = "tests.wsbus_pyro.test_hardening:SlowEcho"


class SlowEcho(Service):
    """Echo that answers each ``echo`` a quarter second later, many at once.

    So that at any moment many acked requests wait for their reply, as under real load:
    a bus crash then meets replies in every place they can be.
    """

    name = "echo"

    def __init__(self) -> None:
        self._later: set[asyncio.Task[None]] = set()

    @handles("echo")
    async def echo(self, message: Envelope, ctx: Context) -> None:
        """Reply in 0.25 s, without holding up the next message."""
        task = asyncio.create_task(self._reply(message, ctx))
        self._later.add(task)
        task.add_done_callback(self._later.discard)

    async def _reply(self, message: Envelope, ctx: Context) -> None:
        await asyncio.sleep(0.25)
        ctx.reply({"content": message.content})


# -- clients that count every answer ------------------------------------------------------


@dataclass
class Tally:
    """What one client sent and every answer it got, by frame id."""

    client: MemoryClient | WsClient
    sent: list[str] = field(default_factory=list)
    first: dict[str, str] = field(default_factory=dict)
    """The first answer to each frame: ``ack`` or the error code."""
    errors: dict[str, list[tuple[str, bool]]] = field(default_factory=dict)
    """Every error (code, retry) per ref, including errors that follow an ack."""
    replies: dict[str, int] = field(default_factory=dict)
    no_ref: list[dict[str, Any]] = field(default_factory=list)
    others: list[dict[str, Any]] = field(default_factory=list)
    closed: int | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def read(self) -> None:
        while True:
            try:
                frame = await self.client.receive(1.0)
            except TimeoutError:
                continue
            except ConnectionClosed as exc:
                self.closed = exc.code
                self.changed.set()
                return
            kind = frame["type"]
            content: Any = frame.get("content")
            if kind in ("wsbus.ack", "wsbus.error"):
                ref = content.get("ref")
                if ref is None:
                    self.no_ref.append(frame)
                elif kind == "wsbus.ack":
                    self.first.setdefault(ref, "ack")
                else:
                    self.first.setdefault(ref, content["code"])
                    self.errors.setdefault(ref, []).append((content["code"], content["retry"]))
            elif kind == "echo.reply":
                ref = frame["reply_to"]
                self.replies[ref] = self.replies.get(ref, 0) + 1
            else:
                self.others.append(frame)
            self.changed.set()

    @property
    def acked(self) -> list[str]:
        return [f for f in self.sent if self.first.get(f) == "ack"]

    def unanswered(self) -> list[str]:
        """Acked frames with neither a reply nor an error after the ack."""
        return [f for f in self.acked if f not in self.replies and len(self.errors.get(f, [])) == 0]

    def settled(self) -> bool:
        return all(f in self.first for f in self.sent) and not self.unanswered()

    async def until(self, check: Callable[[], bool], timeout: float) -> None:  # noqa: ASYNC109
        async with asyncio.timeout(timeout):
            while not check():
                if self.closed is not None:
                    raise AssertionError(f"closed with {self.closed}")
                self.changed.clear()
                await self.changed.wait()


async def tallies(kit: Kit, gateway: Gateway, count: int) -> tuple[list[Tally], list[Any]]:
    out: list[Tally] = []
    readers: list[Any] = []
    for _ in range(count):
        client = kit.open(gateway)
        welcome = await client.receive(WAIT)
        assert welcome["type"] == "wsbus.welcome", welcome
        tally = Tally(client)
        out.append(tally)
        readers.append(asyncio.create_task(tally.read()))
    return out, readers


async def stream(tally: Tally, name: str, stop: asyncio.Event, gap: float) -> None:
    """Send echo frames every ``gap`` seconds (not waiting for answers) until ``stop``."""
    n = 0
    while not stop.is_set():
        fid = f"{name}.{n}"
        n += 1
        tally.sent.append(fid)
        sent = tally.client.send("echo", {"n": n}, id=fid)
        if inspect.isawaitable(sent):
            await sent
        await asyncio.sleep(gap)


class WsClient:
    """A plain WebSocket client (the ``websockets`` library) that a :class:`Tally` reads."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws

    async def receive(self, timeout: float) -> dict[str, Any]:  # noqa: ASYNC109
        try:
            async with asyncio.timeout(timeout):
                data = await self.ws.recv()
        except WsClosed as exc:
            raise ConnectionClosed(exc.rcvd.code if exc.rcvd else 1006, "") from None
        frame: dict[str, Any] = json.loads(data)
        return frame

    async def send(self, type: str, content: Any, *, id: str) -> None:
        await self.ws.send(json.dumps({"type": type, "content": content, "id": id}))


# -- 5. SIGKILL of the bus mid-traffic -----------------------------------------------------


async def test_bus_killed_mid_traffic_every_acked_request_is_answered(
    kit: Kit, wsbus_message_bus: Child, wsbus_pyro_config: PyroConfig
) -> None:
    await kit.spawn(SLOW_ECHO)
    gateway = await kit.gateway("g1")
    clients, readers = await tallies(kit, gateway, 6)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # 6 clients, one frame each every 15 ms: under the 100 frames/s rate limit.
    streams = [asyncio.create_task(stream(t, f"c{i}", stop, 0.015)) for i, t in enumerate(clients)]
    bus: Child | None = None
    try:
        await clients[0].until(lambda: len(clients[0].replies) >= 100, WAIT)
        killed_at = loop.time()
        await asyncio.to_thread(wsbus_message_bus.kill)
        bus = await asyncio.to_thread(
            Child, ["bus", *args_for(wsbus_pyro_config)], env=env_for(wsbus_pyro_config)
        )
        ready_at = loop.time()
        # Traffic goes on while the gateway and the echo service re-register, and until
        # it flows again for every client.
        acked_at_ready = [len(t.acked) for t in clients]
        for tally, before in zip(clients, acked_at_ready, strict=True):
            await tally.until(lambda: len(tally.acked) >= before + 100, WAIT)  # noqa: B023
        stop.set()
        await asyncio.gather(*streams)
        for tally in clients:
            with contextlib.suppress(TimeoutError):  # what is missing is counted below
                await tally.until(tally.settled, SETTLE)
    finally:
        stop.set()
        await asyncio.gather(*streams, return_exceptions=True)
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        if bus is not None:
            await asyncio.to_thread(bus.stop)
    sent, acked, replied, told = report(clients)
    codes = sorted({e for t in clients for errs in t.errors.values() for e in errs})
    print(
        f"\nbus killed {ready_at - killed_at:.2f} s before its restart was ready: "
        f"{sent} sent, {acked} acked, {replied} of them replied, {told} told by an error; "
        f"errors {codes}"
    )
    for tally in clients:
        assert tally.no_ref == [] and tally.others == [] and tally.closed is None
        # Every frame got its answer, and every acked one its reply (or an error).
        assert set(tally.first) == set(tally.sent)
        lost = tally.unanswered()
        assert lost == [], f"{len(lost)} acked requests never answered: {lost[:5]}"
        # A reply is delivered once, even when a service sent it again after the crash.
        assert {f: n for f, n in tally.replies.items() if n > 1} == {}
        # While the bus was gone and its services re-registered: "unavailable", retry.
        assert {e for errs in tally.errors.values() for e in errs} <= {("unavailable", True)}
    assert acked == replied + told
    assert_balanced(gateway.stats())


def report(clients: list[Tally]) -> tuple[int, int, int, int]:
    """(sent, acked, acked and replied, acked and told by an error) over all clients."""
    sent = sum(len(t.sent) for t in clients)
    acked = sum(len(t.acked) for t in clients)
    replied = sum(sum(1 for f in t.acked if f in t.replies) for t in clients)
    told = sum(sum(1 for f in t.acked if f not in t.replies and t.errors.get(f)) for t in clients)
    return sent, acked, replied, told


async def test_bus_killed_under_a_gateway_process_and_websocket_clients(
    wsbus_spawn_service: Callable[[str], Child],
    wsbus_message_bus: Child,
    wsbus_pyro_config: PyroConfig,
) -> None:
    # Every part its own process, as deployed: name server, bus, service, `wsbus serve`;
    # the clients speak WebSocket to it. The bus is killed mid-traffic and restarted.
    await asyncio.to_thread(wsbus_spawn_service, SLOW_ECHO)
    args = args_for(wsbus_pyro_config)
    port = free_port()
    gateway = await asyncio.to_thread(
        Child,
        ["serve", "--bus", "pyro", "--port", str(port), *args],
        ready="listening",
        env=env_for(wsbus_pyro_config),
    )
    bus: Child | None = None
    stop = asyncio.Event()
    clients: list[Tally] = []
    tasks: list[asyncio.Task[None]] = []
    sockets: list[Any] = []
    try:
        for _ in range(4):
            ws = await ws_connect(
                f"ws://127.0.0.1:{port}/", subprotocols=[Subprotocol("wsbus.v1.json")]
            )
            sockets.append(ws)
            client = WsClient(ws)
            welcome = await client.receive(WAIT)
            assert welcome["type"] == "wsbus.welcome", welcome
            clients.append(Tally(client))
        tasks = [asyncio.create_task(t.read()) for t in clients]
        streams = [
            asyncio.create_task(stream(t, f"w{i}", stop, 0.02)) for i, t in enumerate(clients)
        ]
        await clients[0].until(lambda: len(clients[0].replies) >= 50, WAIT)
        await asyncio.to_thread(wsbus_message_bus.kill)
        bus = await asyncio.to_thread(Child, ["bus", *args], env=env_for(wsbus_pyro_config))
        acked_at_ready = [len(t.acked) for t in clients]
        for tally, before in zip(clients, acked_at_ready, strict=True):
            await tally.until(lambda: len(tally.acked) >= before + 50, WAIT)  # noqa: B023
        stop.set()
        await asyncio.gather(*streams)
        for tally in clients:
            with contextlib.suppress(TimeoutError):  # what is missing is counted below
                await tally.until(tally.settled, SETTLE)
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ws in sockets:
            await ws.close()
        await asyncio.to_thread(gateway.stop)
        if bus is not None:
            await asyncio.to_thread(bus.stop)
    sent, acked, replied, told = report(clients)
    print(f"\n{sent} sent, {acked} acked, {replied} of them replied, {told} told by an error")
    for tally in clients:
        assert tally.no_ref == [] and tally.others == [] and tally.closed is None
        assert set(tally.first) == set(tally.sent)
        lost = tally.unanswered()
        assert lost == [], f"{len(lost)} acked requests never answered: {lost[:5]}"
        assert {f: n for f, n in tally.replies.items() if n > 1} == {}
        assert {e for errs in tally.errors.values() for e in errs} <= {("unavailable", True)}
    assert acked == replied + told


async def test_type_served_before_a_bus_restart_is_unavailable_not_no_route(
    kit: Kit, wsbus_message_bus: Child, wsbus_pyro_config: PyroConfig
) -> None:
    await kit.spawn(ECHO)
    gateway = await kit.gateway("g1")
    (tally,), readers = await tallies(kit, gateway, 1)
    bus: Child | None = None
    try:
        tally.sent.append("before")
        tally.client.send("echo", None, id="before")
        await tally.until(lambda: "before" in tally.replies, WAIT)
        await asyncio.to_thread(wsbus_message_bus.kill)
        bus = await asyncio.to_thread(
            Child, ["bus", *args_for(wsbus_pyro_config)], env=env_for(wsbus_pyro_config)
        )
        # At once, before the echo service (re-registering every second) is back.
        for n in range(10**6):
            fid = f"after.{n}"
            tally.sent.append(fid)
            tally.client.send("echo", None, id=fid)
            await tally.until(lambda: fid in tally.first, WAIT)  # noqa: B023
            if tally.first[fid] == "ack":
                await tally.until(lambda: fid in tally.replies, WAIT)  # noqa: B023
                break
            await asyncio.sleep(0.05)
        # A type nothing ever served is no_route at once, bus restarted or not.
        tally.sent.append("nobody")
        tally.client.send("nobody.handles.this", None, id="nobody")
        await tally.until(lambda: "nobody" in tally.first, WAIT)
    finally:
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        if bus is not None:
            await asyncio.to_thread(bus.stop)
    refused = [tally.errors[f] for f in tally.sent if f.startswith("after.") and f in tally.errors]
    print(f"\n{len(refused)} refusals while the echo service re-registered: {refused[:3]}")
    assert all(errs == [("unavailable", True)] for errs in refused), refused
    assert tally.errors["nobody"] == [("no_route", False)]


# -- 6. idle and half-handshake floods on the Pyro ports -----------------------------------


def pyro_connect_message(object_id: str, handshake: Any = "hello") -> bytes:
    data = serpent.dumps({"handshake": handshake, "object": object_id})
    return bytes(protocol.SendingMessage(protocol.MSG_CONNECT, 0, 0, SERPENT_ID, data).data)


class Flood:
    """Keeps ``idle`` silent sockets and ``half`` half-sent handshakes open to an address.

    Each peer the daemon drops is replaced at once, as an attacker would.
    """

    def __init__(self, address: tuple[str, int], idle: int, half: int) -> None:
        self.address = address
        self.open = 0
        self.most_open = 0
        self.dropped = 0
        self.peers = idle + half
        self.started = 0
        """Peers that connected at least once."""
        self._stop = asyncio.Event()
        partial = pyro_connect_message("x")[:10]
        self._tasks = [asyncio.create_task(self._peer(b"")) for _ in range(idle)]
        self._tasks += [asyncio.create_task(self._peer(partial)) for _ in range(half)]

    async def _peer(self, first: bytes) -> None:
        counted = False
        while not self._stop.is_set():
            try:
                reader, writer = await asyncio.open_connection(*self.address)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            self.open += 1
            self.most_open = max(self.most_open, self.open)
            if not counted:
                counted = True
                self.started += 1
            try:
                if first:
                    writer.write(first)
                stop = asyncio.create_task(self._stop.wait())
                eof = asyncio.create_task(reader.read())
                await asyncio.wait({stop, eof}, return_when=asyncio.FIRST_COMPLETED)
                for task in (stop, eof):
                    task.cancel()
                await asyncio.gather(stop, eof, return_exceptions=True)
                if not self._stop.is_set():
                    self.dropped += 1
            finally:
                self.open -= 1
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()

    async def close(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def address_of(uri: str) -> tuple[str, int]:
    host, _, port = uri.rpartition("@")[2].rpartition(":")
    return host, int(port)


async def test_idle_and_half_handshake_floods_hold_no_pyro_worker(
    kit: Kit, wsbus_pyro_config: PyroConfig
) -> None:
    await kit.spawn(ECHO)
    gateway = await kit.gateway("g1")
    bus_uri = await asyncio.to_thread(ns_lookup, wsbus_pyro_config, wsbus_pyro_config.bus_name)
    assert bus_uri is not None
    pool = wsbus_pyro_config.threadpool_size
    floods = [
        Flood(daemon_address(gateway), pool + 200, 40),
        Flood(address_of(bus_uri), pool + 200, 40),
    ]
    clients, readers = await tallies(kit, gateway, 4)
    try:
        async with asyncio.timeout(WAIT):
            while any(f.started < f.peers for f in floods):
                await asyncio.sleep(0.05)
        # Traffic while every flood holds more sockets than there are workers. The bus
        # and the gateway open fresh Pyro connections to each other now (the first
        # publish, the first delivery), and again after idling.
        for round_ in range(3):
            for i, tally in enumerate(clients):
                for n in range(25):
                    fid = f"c{i}.{round_}.{n}"
                    tally.sent.append(fid)
                    tally.client.send("echo", {"n": n}, id=fid)
                    await asyncio.sleep(0.012)
            for tally in clients:
                await tally.until(tally.settled, WAIT)
            if round_ == 0:
                # Long enough for every forwarder to reconnect before its next call.
                await asyncio.sleep(wsbus_pyro_config.comm_timeout)
        held = [f.most_open for f in floods]
    finally:
        for flood in floods:
            await flood.close()
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    print(
        f"\nflood peers open at most {held} (pool {pool}); dropped by the daemons "
        f"{[f.dropped for f in floods]}"
    )
    for tally in clients:
        assert tally.no_ref == [] and tally.others == [] and tally.closed is None
        assert tally.errors == {}, tally.errors
        assert [f for f in tally.sent if tally.replies.get(f) != 1] == []
    # More silent peers than workers were open at once, and the daemons dropped them.
    assert all(f.most_open > pool for f in floods), held
    assert all(f.dropped > 0 for f in floods)
    assert_balanced(gateway.stats())


# -- 7. a keep-serialized call ---------------------------------------------------------------


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def keep_serialized_call(
    address: tuple[str, int], object_id: str, method: str, config: PyroConfig
) -> tuple[int, bytes]:
    """Shake hands on a raw socket, then send a MSG_INVOKE flagged FLAGS_KEEPSERIALIZED.

    Returns (the handshake answer's message type, all the daemon sent after the call).
    """
    location = f"{address[0]}:{address[1]}"
    handshake = proof(config.secret, f"x@{location}") if config.secret else "hello"
    with socket.create_connection(address, timeout=WAIT) as sock:
        sock.sendall(pyro_connect_message(object_id, handshake))
        header = recv_exactly(sock, protocol._header_size)
        fields = struct.unpack(protocol._header_format, header)
        answer_type, data_size, annotations_size = fields[2], fields[6], fields[7]
        recv_exactly(sock, data_size + annotations_size)
        if answer_type != protocol.MSG_CONNECTOK:
            return answer_type, b""
        # Exactly what Pyro's own proxy sends for a SerializedBlob argument: the call's
        # target travels marshal-encoded in the BLBI annotation.
        blob_info = marshal.dumps((("x",), object_id, method))
        call = protocol.SendingMessage(
            protocol.MSG_INVOKE,
            protocol.FLAGS_KEEPSERIALIZED,
            1,
            SERPENT_ID,
            serpent.dumps([1, 2, 3]),
            annotations={"BLBI": blob_info},
        )
        sock.sendall(call.data)
        rest = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                rest += chunk
        return answer_type, rest


@pytest.fixture
def marshal_calls(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every ``marshal.loads`` call Pyro5 makes in this process from now on.

    Calls from elsewhere (Python's import system loads .pyc files with it) do not count.
    The call still works, as before.
    """
    calls: list[bytes] = []
    real = marshal.loads

    def spy(data: Any, *args: Any, **kwargs: Any) -> Any:
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("Pyro5"):
            calls.append(bytes(data))
        return real(data, *args, **kwargs)

    monkeypatch.setattr(marshal, "loads", spy)
    return calls


async def test_keep_serialized_calls_are_refused_by_every_daemon(
    kit: Kit, wsbus_pyro_config: PyroConfig, marshal_calls: list[bytes]
) -> None:
    config = wsbus_pyro_config
    gateway = await kit.gateway("g1")
    single = await kit.gateway("g2", pyro=PyroConfig(**{**_fields(config), "single_thread": True}))
    service = ServiceHost(Echo(), config)
    await service.start()
    try:
        bus_uri = await asyncio.to_thread(ns_lookup, config, config.bus_name)
        assert bus_uri is not None
        targets = {
            "gateway": (daemon_address(gateway), pyro_bus(gateway).name, "deliver"),
            "gateway, single thread": (daemon_address(single), pyro_bus(single).name, "deliver"),
            "service": (address_of(service.uri), service.name, "deliver"),
            "message bus": (address_of(bus_uri), config.bus_name, "info"),
            "name server": ((config.ns_host, config.ns_port), "Pyro.NameServer", "list"),
        }
        answers = {}
        for name, (address, object_id, method) in targets.items():
            answers[name] = await asyncio.to_thread(
                keep_serialized_call, address, object_id, method, config
            )
        # The daemons still serve proper calls afterwards.
        client = kit.open(gateway)
        assert (await client.receive(WAIT))["type"] == "wsbus.welcome"
    finally:
        await service.close()
    assert marshal_calls == [], "marshal.loads was called on a peer's bytes"
    for name, (handshake, rest) in answers.items():
        assert handshake == protocol.MSG_CONNECTOK, name  # refused for the call, not before
        # Refused: the connection closed with no answer to the call.
        assert rest == b"", (name, rest[:64])


def _fields(config: PyroConfig) -> dict[str, Any]:
    return {f: getattr(config, f) for f in config.__struct_fields__}


async def test_a_service_is_told_what_a_bus_that_stays_down_did_not_take(
    wsbus_message_bus: Child, wsbus_pyro_config: PyroConfig
) -> None:
    fields = _fields(wsbus_pyro_config)
    if "retry_for" in fields:
        fields["retry_for"] = 1.0
    director = Director()
    host = ServiceHost(director, PyroConfig(**fields))
    await host.start()
    try:
        await asyncio.to_thread(wsbus_message_bus.kill)
        link = director.link
        sent = [
            link.send(Recipients(conn_ids=(ConnId("g1.1"),)), "director.item", n) for n in range(3)
        ]
        async with asyncio.timeout(WAIT):
            while len(director.missed) < len(sent):
                await asyncio.sleep(0.05)
    finally:
        await host.close()
    assert [m["reason"] for m in director.missed] == ["unavailable"] * len(sent)


# -- the name server with a shared secret ----------------------------------------------------

NS_ATTACKER = """
import sys, time
from Pyro5 import config
from Pyro5.api import Proxy
config.COMMTIMEOUT = 3.0
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
uri = f"PYRO:Pyro.NameServer@{host}:{port}"
held = []
def bind_more():
    while len(held) < count:
        proxy = Proxy(uri)
        proxy._pyroTimeout = 3.0
        try:
            proxy._pyroBind()
        except Exception:
            return
        held.append(proxy)
bind_more()
print("held", len(held), flush=True)
while True:  # keep every connection busy, and keep asking for more
    for proxy in held:
        try:
            proxy.ping()
        except Exception:
            pass
    bind_more()
    time.sleep(1.0)
"""
"""Plain Pyro, as any local process may run it: no secret. It opens ``count`` proxies to
the name server, pings each about once a second, and prints how many it holds."""


def name_server(config: PyroConfig) -> Any:
    """A proxy for the name server, proving ``config.secret`` as every wsbus process does."""
    return make_proxy(f"PYRO:Pyro.NameServer@{config.ns_host}:{config.ns_port}", config)


def _first_line(process: subprocess.Popen[str], timeout: float) -> str:
    """The first line ``process`` prints, within ``timeout`` seconds."""
    lines: queue.Queue[str] = queue.Queue()
    assert process.stdout is not None
    stdout = process.stdout
    threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(f"no line within {timeout} s") from None


def _end(process: subprocess.Popen[str]) -> None:
    """End a process this test started, by its own pid."""
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    process.wait(WAIT)
    if process.stdout is not None:
        process.stdout.close()


def test_a_process_without_the_secret_cannot_hold_the_name_servers_workers() -> None:
    # The review's attack: 140 plain Pyro proxies (more than the 128 workers) pinging the
    # name server. Before, it held every worker: a restarted bus could not register and
    # no lookup got through. With a secret, each is refused at the handshake.
    secret = "ns-secret-" + os.urandom(8).hex()
    config = PyroConfig(ns_port=free_port(), secret=secret, reregister_interval=0.2)
    env: dict[str, str | None] = {"WSBUS_SECRET": secret}
    where = ["--ns-host", config.ns_host, "--ns-port", str(config.ns_port)]
    count = config.threadpool_size + 12
    children: list[Child] = []
    attacker: subprocess.Popen[str] | None = None
    try:
        children.append(Child(["nameserver", *where], env=env))
        attacker = subprocess.Popen(
            [sys.executable, "-c", NS_ATTACKER, config.ns_host, str(config.ns_port), str(count)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={k: v for k, v in os.environ.items() if k != "WSBUS_SECRET"},
        )
        held = _first_line(attacker, WAIT).split()
        # Under the attack: a bus starts and registers (as after a crash), and is found.
        children.append(Child(["bus", *where], env=env))
        for _ in range(4):  # over several of the attacker's rounds
            with lookup(config.bus_name, config) as bus:
                assert isinstance(bus.info(), dict)
            with name_server(config) as ns:
                assert config.bus_name in ns.list()
            time.sleep(0.5)
        assert attacker.poll() is None, "the attacker stopped: nothing was tested"
    finally:
        if attacker is not None:
            _end(attacker)
        for child in reversed(children):
            child.stop()
    assert held == ["held", "0"], held


def test_the_name_server_refuses_plain_pyro_with_a_secret_and_is_open_without() -> None:
    secret = "ns-secret-" + os.urandom(8).hex()
    for with_secret in (True, False):
        config = PyroConfig(ns_port=free_port(), secret=secret if with_secret else None)
        env: dict[str, str | None] = {"WSBUS_SECRET": config.secret}
        ns_uri = f"PYRO:Pyro.NameServer@{config.ns_host}:{config.ns_port}"
        child = Child(["nameserver", "--ns-port", str(config.ns_port)], env=env)
        try:
            with name_server(config) as ns:
                ns.register("x.y", "PYRO:x@127.0.0.1:1")

            def plain(uri: str = ns_uri) -> Any:
                with Proxy(uri) as proxy:
                    proxy._pyroTimeout = WAIT
                    return proxy.list()

            def wrong(cfg: PyroConfig = config) -> Any:
                with name_server(msgspec.structs.replace(cfg, secret="a-wrong-one")) as ns:
                    return ns.list()

            if with_secret:
                # Pyro's nsc or any plain proxy, or a wrong secret: refused, nothing read.
                for call in (plain, wrong):
                    with pytest.raises(Exception):  # noqa: B017 - any refusal
                        call()
            else:
                assert "x.y" in plain()  # open, as Pyro's own name server
        finally:
            child.stop()


# -- a refused envelope is taken when sent again ----------------------------------------------


class Gate(Service):
    """Takes ``job.do`` messages and holds the first until released: its inbox fills."""

    name = "gate"

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.took: list[str] = []

    @handles("job.do")
    async def job(self, message: Envelope, ctx: Context) -> None:
        """Record the job, and wait for the release."""
        self.took.append(str(message.id))
        await self.release.wait()


_JOBS: dict[str, Envelope] = {}


def _job(id_: str) -> Envelope:
    """The envelope ``id_``: the same one each time, as a sender sends a copy again."""
    if id_ not in _JOBS:
        _JOBS[id_] = Envelope(
            id=EnvelopeId(id_),
            type="job.do",
            sender=ServiceAddress("a"),
            content={"id": id_},
            created=time.time(),
        )
    return _JOBS[id_]


async def test_an_envelope_refused_with_a_full_inbox_is_taken_when_sent_again(
    wsbus_message_bus: Child, wsbus_pyro_config: PyroConfig
) -> None:
    # What a bus does after a crash: the sender sends again what was refused
    # ("unavailable", inbox full). Before, the first refusal recorded the id as seen, so the
    # second copy was confirmed "ok" and dropped: the work was lost silently.
    gate = Gate()
    host = ServiceHost(gate, wsbus_pyro_config, inbox_size=1)
    await host.start()

    def deliver(*ids: str) -> Any:
        with make_proxy(host.uri, wsbus_pyro_config) as endpoint:
            return endpoint.deliver(encode_batch([_job(i) for i in ids]))

    async def until_taken(id_: str) -> None:
        async with asyncio.timeout(WAIT):
            while id_ not in gate.took:
                await asyncio.sleep(0.01)

    try:
        assert await asyncio.to_thread(deliver, "a-1") == ["ok"]
        await until_taken("a-1")  # the handler holds it: the inbox is empty
        assert await asyncio.to_thread(deliver, "a-2") == ["ok"]  # the inbox is full
        assert await asyncio.to_thread(deliver, "a-x") == ["unavailable"]
        gate.release.set()
        await until_taken("a-2")
        # The same envelope again (the inbox has room now), then a marker behind it.
        assert await asyncio.to_thread(deliver, "a-x") == ["ok"]
        assert await asyncio.to_thread(deliver, "a-3") == ["ok"]
        await until_taken("a-3")  # handled in order: a-x first, if it was taken
        # A second copy of what the service took is still dropped, and confirmed.
        assert await asyncio.to_thread(deliver, "a-x") == ["ok"]
        assert await asyncio.to_thread(deliver, "a-4") == ["ok"]
        await until_taken("a-4")
    finally:
        await host.close()
    assert gate.took == ["a-1", "a-2", "a-x", "a-3", "a-4"]


# -- the fixtures pass a secret in the environment ------------------------------------------


class TestFixturesWithASecret:
    @pytest.fixture
    def wsbus_pyro_config(self) -> PyroConfig:
        return PyroConfig(
            ns_port=free_port(),
            secret="fixture-secret-" + os.urandom(8).hex(),
            reregister_interval=0.2,
            comm_timeout=3.0,
        )

    def test_the_secret_is_in_the_environment_never_on_a_command_line(
        self,
        wsbus_nameserver: Child,
        wsbus_spawn_service: Callable[[str], Child],
        wsbus_message_bus: Child,
        wsbus_pyro_config: PyroConfig,
    ) -> None:
        secret = wsbus_pyro_config.secret
        assert secret is not None
        service = wsbus_spawn_service(ECHO)
        for child in (wsbus_nameserver, wsbus_message_bus, service):
            cmdline = Path(f"/proc/{child.pid}/cmdline").read_bytes().decode()
            environ = Path(f"/proc/{child.pid}/environ").read_bytes().decode().split("\0")
            assert secret not in cmdline, child.args
            assert f"WSBUS_SECRET={secret}" in environ, child.args
        # They share it: the bus registered with the name server and is found with it.
        with lookup(wsbus_pyro_config.bus_name, wsbus_pyro_config) as bus:
            assert isinstance(bus.info(), dict)
