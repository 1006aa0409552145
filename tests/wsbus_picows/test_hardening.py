"""The picows edge against hostile clients, on a real server on 127.0.0.1: what the
websockets edge's hardening tests check, where it applies to this edge (the slow
consumer's close is in the edge conformance suite both edges run, from test_server.py), and
what picows needs of its own (reads bounded per pass, pings answered in one write, requests
other than GET)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

import pytest

from bench.edge_attacks import ping_flood, real_client
from tests.conftest import assert_balanced
from wsbus import Gateway
from wsbus_picows import PicowsConfig, PicowsServer
from wsbus_picows._protocol import FEED_BYTES
from wsbus_picows.server import _Connection
from wsbus_testing.raw import masked_frame, open_upgraded, read_head, upgrade_request


async def _poll(condition: Any, timeout: float = 30.0) -> None:  # noqa: ASYNC109
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def test_ping_flood_from_a_peer_that_never_reads_is_closed_with_memory_bounded(
    wsbus_server: PicowsServer, wsbus_gateway: Gateway, wsbus_ws_connect: Any
) -> None:
    config = wsbus_server.config
    bound = config.write_limit + wsbus_gateway.config.outbound_bytes
    fast = await wsbus_ws_connect()
    worst = 0
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal worst
        while not done.is_set():
            for connection in list(wsbus_server._connections):
                raw = connection._raw
                if raw is not None:
                    worst = max(worst, raw.get_write_buffer_size())
            await asyncio.sleep(0.001)

    sampler = asyncio.create_task(sample())
    try:
        async with asyncio.timeout(120):
            sent, closed = await asyncio.to_thread(ping_flood, wsbus_server.port, 16 * bound)
    finally:
        done.set()
        await sampler
    assert closed, f"the server never closed a peer that read none of {sent} bytes of pongs"
    # One read's pongs (FEED_BYTES of pings, each pong the size of its ping less the mask)
    # may overshoot the bound before the check.
    assert worst <= bound + 1024 + FEED_BYTES, f"{worst} bytes of pongs waited (bound {bound})"
    assert (await fast.request("echo", "still here"))["content"]["content"] == "still here"
    await _poll(lambda: wsbus_gateway.stats().closes_by_code.get(1008) == 1)
    assert_balanced(wsbus_gateway.stats())


async def test_a_flood_of_empty_pings_is_parsed_a_bounded_read_at_a_time(
    wsbus_server: PicowsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # picows parses a whole read in one call and doubles its buffer when a read fills it:
    # unbounded, 4 MB of empty pings sent at once would be one pass of 700,000 frames.
    # The edge reads at most FEED_BYTES per pass, and answers a read's pings in one write.
    batches: list[int] = []
    write_pongs = _Connection._write_pongs

    def counting(self: _Connection) -> None:
        batches.append(len(self._pongs or ()))
        write_pongs(self)

    monkeypatch.setattr(_Connection, "_write_pongs", counting)
    sock, _ = await asyncio.to_thread(open_upgraded, wsbus_server.port)
    total = 4 * 1024 * 1024 // 6
    received = 0

    def flood_and_read() -> None:
        nonlocal received
        sock.settimeout(30)
        chunk = masked_frame(0x9, b"") * 8192
        for _ in range(total // 8192):
            sock.sendall(chunk)
            with contextlib.suppress(BlockingIOError, TimeoutError, socket.timeout):
                sock.setblocking(False)
                try:
                    while True:
                        data = sock.recv(1 << 20)
                        if not data:
                            return
                        received += len(data)
                except BlockingIOError:
                    pass
                finally:
                    sock.settimeout(30)

    try:
        async with asyncio.timeout(120):
            await asyncio.to_thread(flood_and_read)
            await _poll(lambda: sum(batches) >= total // 2)
    finally:
        sock.close()
    assert batches, "no pong was written"
    # A read may finish a ping the read before began.
    assert max(batches) <= FEED_BYTES // 6 + 1, max(batches)


@pytest.mark.parametrize("wsbus_edge_config", [PicowsConfig(max_handshakes=32, open_timeout=30)])
async def test_stalled_half_handshakes_are_capped_and_real_clients_get_in(
    wsbus_server: PicowsServer,
) -> None:
    guard = wsbus_server.handshakes
    stallers = []
    try:
        for _ in range(200):
            reader, writer = await asyncio.open_connection("127.0.0.1", wsbus_server.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
            stallers.append((reader, writer))
        await _poll(lambda: guard.evicted >= 200 - 32)
        assert guard.pending <= 32
        results = await asyncio.gather(*(real_client(wsbus_server.port) for _ in range(10)))
        assert all(results), f"{results.count(False)} of 10 real clients did not get in"
    finally:
        for _, writer in stallers:
            writer.close()


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "HEAD", "TRACE"])
async def test_requests_other_than_get_get_405_before_picows_parses_them(
    wsbus_server: PicowsServer, method: str
) -> None:
    def exchange() -> bytes:
        with socket.create_connection(("127.0.0.1", wsbus_server.port), timeout=10) as sock:
            sock.sendall(f"{method} /healthz HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            return data

    response = await asyncio.to_thread(exchange)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 405 "), head
    assert b"\r\nAllow: GET\r\n" in head and b"\r\nConnection: close" in head
    assert body == b"method not allowed: use GET\n"


async def test_health_and_426_over_plain_http(wsbus_server: PicowsServer) -> None:
    def get(path: str) -> bytes:
        with socket.create_connection(("127.0.0.1", wsbus_server.port), timeout=10) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            return data

    health = await asyncio.to_thread(get, "/healthz?x=1")
    assert health.startswith(b"HTTP/1.1 200 "), health
    assert health.endswith(b'{"status":"ok","connections":0}')
    other = await asyncio.to_thread(get, "/")
    assert other.startswith(b"HTTP/1.1 426 "), other
    assert b"Server:" not in other


async def test_a_browsers_connection_header_is_upgraded(wsbus_server: PicowsServer) -> None:
    # Firefox sends "Connection: keep-alive, Upgrade"; picows alone accepts only "Upgrade".
    request = upgrade_request("127.0.0.1", wsbus_server.port).replace(
        b"Connection: Upgrade", b"Connection: keep-alive, Upgrade"
    )

    def exchange() -> bytes:
        with socket.create_connection(("127.0.0.1", wsbus_server.port), timeout=10) as sock:
            sock.sendall(request)
            head, _ = read_head(sock)
            return head

    head = await asyncio.to_thread(exchange)
    assert b"keep-alive, Upgrade" in request
    assert head.startswith(b"HTTP/1.1 101 "), head


@pytest.mark.parametrize(
    ("value", "refusal"),
    [
        (", ".join(f"p{i}" for i in range(17)), b"too many subprotocols offered: 17, at most 16"),
        ("x" * 5000, b"Sec-WebSocket-Protocol headers too long: 5000 bytes, at most 4096"),
    ],
    ids=["17-names", "5000-bytes"],
)
async def test_absurd_subprotocol_offers_get_400(
    wsbus_server: PicowsServer, wsbus_gateway: Gateway, value: str, refusal: bytes
) -> None:
    request = upgrade_request("127.0.0.1", wsbus_server.port, [("Sec-WebSocket-Protocol", value)])

    def exchange() -> bytes:
        with socket.create_connection(("127.0.0.1", wsbus_server.port), timeout=10) as sock:
            sock.sendall(request)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            return data

    response = await asyncio.to_thread(exchange)
    assert response.startswith(b"HTTP/1.1 400 "), response[:80]
    assert refusal in response
    assert wsbus_gateway.stats().connections_total == 0


@pytest.mark.parametrize("wsbus_edge_config", [PicowsConfig(open_timeout=0.5)])
async def test_a_request_that_never_ends_is_dropped_after_open_timeout(
    wsbus_server: PicowsServer,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", wsbus_server.port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
        async with asyncio.timeout(30):
            with contextlib.suppress(ConnectionResetError):
                assert await reader.read() == b""
        await _poll(lambda: wsbus_server.handshakes.pending == 0)
    finally:
        writer.close()
