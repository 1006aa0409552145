"""What validating one client frame costs, per frame shape and codec (a benchmark, not a test).

Each shape maximizes some kind of work per byte within the 64 KiB frame cap: empty arrays
and maps (one container per byte in MessagePack), one-pair maps, tiny integers,
non-canonical MessagePack (which defeats the re-encoding shortcut for duplicate keys), deep
nesting, and one long string as the control. Frames that are refused (rate limited) only
have their id looked up: that cost is measured too.

    python -m bench.validation_cost            # this checkout
    PYTHONPATH=/path/to/other/checkout python -m bench.validation_cost

Prints microseconds per frame (the median of several runs of many iterations each), next
to msgspec's plain decode of the same bytes, which is the floor: the gateway needs the
decoded content anyway.
"""

from __future__ import annotations

import functools
import gc
import statistics
import time
from collections.abc import Callable

import msgspec

from wsbus.wire import ClientFrame, Codec, decode_client_frame

CAP = 64 * 1024
HEAD_J = '{"type":"x","id":"k1","content":'
HEAD_M = b"\x83\xa4type\xa1x\xa2id\xa2k1\xa7content"


def _json_array(item: str) -> str:
    n = (CAP - len(HEAD_J) - 3) // (len(item) + 1)
    return HEAD_J + "[" + ",".join([item] * n) + "]}"


def _msgpack_array(item: bytes) -> bytes:
    n = (CAP - len(HEAD_M) - 5) // len(item)
    return HEAD_M + b"\xdc" + n.to_bytes(2, "big") + item * n


def _deep_json() -> str:
    chain = "[" * 30 + "]" * 30
    return _json_array(chain)


def _deep_msgpack() -> bytes:
    return _msgpack_array(b"\x91" * 29 + b"\x90")


def _json_dup() -> str:
    n = (CAP - len(HEAD_J) - 40) // 3
    return HEAD_J + "[[" + ",".join(["[]"] * n) + '],{"a":1,"a":1}]}'


def _msgpack_dup() -> bytes:
    n = CAP - len(HEAD_M) - 40
    return HEAD_M + b"\x92\xdc" + n.to_bytes(2, "big") + b"\x90" * n + b"\x82\xa1a\x01\xa1a\x01"


SHAPES: dict[str, tuple[str, bytes]] = {
    "empty arrays": (_json_array("[]"), _msgpack_array(b"\x90")),
    "empty maps": (_json_array("{}"), _msgpack_array(b"\x80")),
    "one-pair maps": (_json_array('{"":0}'), _msgpack_array(b"\x81\xa0\x00")),
    "tiny ints": (_json_array("1"), _msgpack_array(b"\x01")),
    "non-canonical": (_json_array('{"" :0}'), _msgpack_array(b"\x81\xa0\xcc\x00")),
    "non-canonical ints": (_json_array("1"), _msgpack_array(b"\xcc\x01")),
    "deep nesting": (_deep_json(), _deep_msgpack()),
    "one duplicate": (_json_dup(), _msgpack_dup()),
    "long string (control)": (
        HEAD_J + '"' + "x" * (CAP - len(HEAD_J) - 3) + '"}',
        HEAD_M
        + b"\xdb"
        + (CAP - len(HEAD_M) - 5).to_bytes(4, "big")
        + b"x" * (CAP - len(HEAD_M) - 5),
    ),
}


def per_call(fn: Callable[[], object], budget: float = 0.2, runs: int = 5) -> float:
    """Median microseconds per call over ``runs`` runs of about ``budget`` seconds each."""
    fn()
    start = time.perf_counter()
    n = 0
    while time.perf_counter() - start < budget / 4:
        fn()
        n += 1
    n = max(1, n * 4)
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - start) / n * 1e6)
    return statistics.median(samples)


def _row(name: str, codec: Codec, data: str | bytes) -> None:
    raw = data.encode() if isinstance(data, str) else data
    assert len(raw) <= CAP, (name, len(raw))
    result = decode_client_frame(data, codec)
    outcome = "accepted" if isinstance(result, ClientFrame) else str(result.code)
    plain = msgspec.json.Decoder() if codec is Codec.JSON else msgspec.msgpack.Decoder()
    floor = per_call(functools.partial(plain.decode, raw))
    cost = per_call(functools.partial(decode_client_frame, data, codec))
    label = "json" if codec is Codec.JSON else "msgpack"
    print(
        f"{name:24}{label:9}{len(raw):7}{outcome:>16}{floor:11.1f}{cost:13.1f}{cost / floor:7.2f}"
    )


def main() -> None:
    """Print the table."""
    from wsbus.gateway import _ref

    print(
        f"{'shape':24}{'codec':9}{'bytes':>7}{'outcome':>16}"  # one row per shape and codec
        f"{'decode us':>11}{'validate us':>13}{'ratio':>7}"
    )
    for name, (text, blob) in SHAPES.items():
        for codec, data in ((Codec.JSON, text), (Codec.MSGPACK, blob)):
            _row(name, codec, data)
    for codec, data in (
        (Codec.JSON, _json_array("[]")[:4000]),
        (Codec.MSGPACK, _msgpack_array(b"\x90")[:4000]),
    ):
        label = "json" if codec is Codec.JSON else "msgpack"
        cost = per_call(functools.partial(_ref, data, codec))
        print(f"refused 4 KiB frame, id lookup ({label}): {cost:.1f} us")
    print(f"gc enabled: {gc.isenabled()}; msgspec {msgspec.__version__}")


if __name__ == "__main__":
    main()
