"""Attack 3 of issue 10, measured: 64 KiB MessagePack frames of empty arrays at the rate limit.

    python -m bench.validation_flood [--seconds 4] [--rate 100] [--clients 1]
        [--shape empty-arrays] [--type nobody.handles] [--pythonpath DIR]

The gateway runs in its own process (``bench/edge_server.py``, the edge attack benchmark's
server, with its loop-lag monitor), importing wsbus from ``--pythonpath`` (this checkout
by default), so the same flood runs against an older checkout::

    python -m bench.validation_flood --pythonpath /work/before   # before the fixes
    python -m bench.validation_flood                              # this checkout

Each of ``--clients`` clients sends frames of about 64 KiB of ``--type`` (by default one
nothing handles; ``echo`` has each published and sent back), at ``--rate`` frames a second
(the default rate limit) for ``--seconds``; one more client asks for an echo every 10 ms
meanwhile. A client closed by the gateway (4400 once its error budget is spent) connects
again, as an attacker would. Prints the server's worst event-loop stall and resident
memory growth, how many frames were sent and answered, the gateway's closes, and the echo
round trips. ``--shape``:

- ``empty-arrays``: 65,000 empty arrays (one container per byte, the most decoding and
  checking work per byte); valid before the item cap, refused by it since.
- ``empty-arrays-bad-utf8``, ``one-item-arrays-bad-utf8``, ``one-pair-maps-bad-utf8``,
  ``empty-strings-bad-utf8``: the same kind of run ended by a string that is not UTF-8,
  so that msgspec refuses the frame and the gateway must find out why from the bytes.
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
FRAME_BYTES = 64 * 1024 - 16
BAD_UTF8 = b"\xa1\xff"
SHAPES = {
    "empty-arrays": (b"\x90", b""),
    "empty-arrays-bad-utf8": (b"\x90", BAD_UTF8),
    "one-item-arrays-bad-utf8": (b"\x91\x90", BAD_UTF8),
    "one-pair-maps-bad-utf8": (b"\x81\xa0\x00", BAD_UTF8),
    "empty-strings-bad-utf8": (b"\xa0", BAD_UTF8),
}


def flood_frame(shape: str = "empty-arrays", type_: str = "nobody.handles") -> bytes:
    """A frame of about 64 KiB: ``type_`` with a list of the shape's items as content."""
    item, tail = SHAPES[shape]
    name = type_.encode()
    head = b"\x82\xa4type" + bytes([0xA0 + len(name)]) + name + b"\xa7content\xdc"
    count = (FRAME_BYTES - len(head) - 2 - len(tail)) // len(item)
    items = count + 1 if tail else count
    return head + items.to_bytes(2, "big") + item * count + tail


def _ask(server: subprocess.Popen[str], command: str) -> dict[str, Any]:
    assert server.stdin is not None and server.stdout is not None
    server.stdin.write(command + "\n")
    server.stdin.flush()
    answer: dict[str, Any] = json.loads(server.stdout.readline())
    return answer


def _flood(url: str, frame: bytes, seconds: float, rate: float, result: dict[str, int]) -> None:
    answered = [0]
    sent = 0
    connections = 0

    def drain(conn: ClientConnection) -> None:
        try:
            for _ in conn:
                answered[0] += 1
        except Exception:
            pass  # closed by the gateway (4400): the sender connects again

    start = time.monotonic()
    while time.monotonic() - start < seconds:
        connections += 1
        with connect(url, subprotocols=[Subprotocol("wsbus.v1.msgpack")], max_size=None) as ws:
            ws.recv()  # the welcome
            reader = threading.Thread(target=drain, args=(ws,), daemon=True)
            reader.start()
            try:
                while time.monotonic() - start < seconds:
                    ws.send(frame)
                    sent += 1
                    time.sleep(max(0.0, start + sent / rate - time.monotonic()))
            except Exception:
                continue  # closed: connect again
            deadline = time.monotonic() + 60
            while answered[0] < sent and reader.is_alive() and time.monotonic() < deadline:
                time.sleep(0.05)
    result["sent"] = result.get("sent", 0) + sent
    result["answered"] = result.get("answered", 0) + answered[0]
    result["connections"] = result.get("connections", 0) + connections


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
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="empty-arrays")
    parser.add_argument("--type", default="nobody.handles")
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
        frame = flood_frame(args.shape, args.type)
        lock = threading.Lock()

        def one_client() -> None:
            mine: dict[str, int] = {}
            _flood(url, frame, args.seconds, args.rate, mine)
            with lock:
                for key, value in mine.items():
                    flooded[key] = flooded.get(key, 0) + value

        clients = [threading.Thread(target=one_client) for _ in range(args.clients)]
        for client in clients:
            client.start()
        for client in clients:
            client.join(args.seconds + 120)
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
        f"flood ({args.shape}, {len(frame)} bytes, type {args.type}): {args.clients} "
        f"client(s), {flooded.get('sent', 0)} frames sent in {args.seconds:g} s at up to "
        f"{args.rate:g}/s each over {flooded.get('connections', 0)} connection(s), "
        f"{flooded.get('answered', 0)} answered; gateway closes {after.get('closes')}"
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
