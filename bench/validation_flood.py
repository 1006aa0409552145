"""Attack 3 of issue 10, measured: 64 KiB MessagePack frames of empty arrays at the rate limit.

    python -m bench.validation_flood [--seconds 4] [--rate 100] [--pythonpath DIR]

The gateway runs in its own process (``bench/edge_server.py``, the edge attack benchmark's
server, with its loop-lag monitor), importing wsbus from ``--pythonpath`` (this checkout
by default), so the same flood runs against an older checkout::

    python -m bench.validation_flood --pythonpath /work/before   # before the fixes
    python -m bench.validation_flood                              # this checkout

One client sends valid frames of about 64 KiB, each a list of 65,000 empty arrays (one
container per byte, the most validation work per byte), of a type nothing handles, at
``--rate`` frames a second (the default rate limit) for ``--seconds``; a second client
asks for an echo every 10 ms meanwhile. Prints the server's worst event-loop stall and
resident memory growth, how many frames it read and answered, and the echo round trips.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection, connect
from websockets.typing import Subprotocol

SERVER = Path(__file__).resolve().parent / "edge_server.py"
ITEMS = 64 * 1024 - 64


def flood_frame() -> bytes:
    """A valid frame of about 64 KiB: ``nobody.handles`` with 65,000 empty arrays."""
    head = b"\x82\xa4type\xaenobody.handles\xa7content\xdc" + ITEMS.to_bytes(2, "big")
    return head + b"\x90" * ITEMS


def _ask(server: subprocess.Popen[str], command: str) -> dict[str, Any]:
    assert server.stdin is not None and server.stdout is not None
    server.stdin.write(command + "\n")
    server.stdin.flush()
    answer: dict[str, Any] = json.loads(server.stdout.readline())
    return answer


def _flood(url: str, seconds: float, rate: float, result: dict[str, int]) -> None:
    frame = flood_frame()
    with connect(url, subprotocols=[Subprotocol("wsbus.v1.msgpack")], max_size=None) as ws:
        ws.recv()  # the welcome
        answered = [0]

        def drain(conn: ClientConnection) -> None:
            for _ in conn:
                answered[0] += 1

        reader = threading.Thread(target=drain, args=(ws,), daemon=True)
        reader.start()
        start = time.monotonic()
        sent = 0
        while time.monotonic() - start < seconds:
            ws.send(frame)
            sent += 1
            time.sleep(max(0.0, start + sent / rate - time.monotonic()))
        deadline = time.monotonic() + 60
        while answered[0] < sent and time.monotonic() < deadline:
            time.sleep(0.05)
        result.update(sent=sent, answered=answered[0])


def _echoes(url: str, stop: threading.Event, times: list[float]) -> None:
    with connect(url) as ws:
        ws.recv()  # the welcome
        i = 0
        while not stop.is_set():
            i += 1
            ref = f"e{i}"
            started = time.monotonic()
            ws.send(json.dumps({"type": "echo", "content": ref, "id": ref}))
            while True:
                frame = json.loads(ws.recv(timeout=60))
                if frame["type"] == "echo.reply":
                    break
            times.append(time.monotonic() - started)
            time.sleep(0.01)


def main() -> None:
    """Run the flood against a fresh server and print what it did."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--pythonpath", default=str(Path(__file__).resolve().parent.parent))
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": args.pythonpath}
    server = subprocess.Popen(
        [sys.executable, str(SERVER)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert server.stdout is not None
        port = json.loads(server.stdout.readline())["port"]
        url = f"ws://127.0.0.1:{port}/"
        _ask(server, "reset")
        before = _ask(server, "stats")
        flooded: dict[str, int] = {}
        round_trips: list[float] = []
        stop = threading.Event()
        echo = threading.Thread(target=_echoes, args=(url, stop, round_trips), daemon=True)
        echo.start()
        _flood(url, args.seconds, args.rate, flooded)
        stop.set()
        echo.join(60)
        after = _ask(server, "stats")
    finally:
        assert server.stdin is not None
        server.stdin.write("quit\n")
        server.stdin.flush()
        server.wait(30)
    grew = (after["rss"] - before["rss"]) / 2**20
    peak = (after["peak_rss"] - before["rss"]) / 2**20
    print(f"wsbus from {args.pythonpath}")
    print(
        f"flood: {flooded.get('sent', 0)} frames sent in {args.seconds:g} s at up to "
        f"{args.rate:g}/s, {flooded.get('answered', 0)} answered"
    )
    print(f"worst event-loop stall: {after['max_lag'] * 1000:.1f} ms")
    print(f"resident memory growth: {grew:.1f} MiB now, {peak:.1f} MiB at peak")
    if round_trips:
        ordered = sorted(round_trips)
        print(
            f"echo round trips during the flood: {len(ordered)}, median "
            f"{statistics.median(ordered) * 1000:.1f} ms, 90th percentile "
            f"{ordered[int(len(ordered) * 0.9)] * 1000:.1f} ms, worst {ordered[-1] * 1000:.1f} ms"
        )


if __name__ == "__main__":
    main()
