"""What validating one client frame costs, per frame shape and codec (a benchmark, not a test).

Each shape maximizes some kind of work per byte within the 64 KiB frame cap: empty arrays
and maps (one container per byte in MessagePack), one-pair maps, tiny integers,
non-canonical MessagePack (which defeats the re-encoding shortcut for duplicate keys), deep
nesting, and one long string as the control. Each is measured with the default limits
(since the item cap, these frames are refused for it) and with the cap raised out of the
way (``max_items`` 2**20: what the checks of a valid frame that large cost). Then frames
msgspec cannot decode, the same runs ended by a fault (a string that is not UTF-8, a byte
MessagePack never uses, a cut), whose refusal is worked out from the bytes. Frames that
are refused unread (rate limited) only have their id looked up: that cost is measured too.

    python -m bench.validation_cost            # this checkout
    PYTHONPATH=/path/to/other/checkout python -m bench.validation_cost

Prints microseconds per frame (the median of several runs of many iterations each), next
to msgspec's plain decode of the same bytes, which is the floor: the gateway needs the
decoded content anyway.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import statistics
import time
from collections.abc import Callable

import msgspec

from wsbus.wire import ClientFrame, Codec, WireLimits, decode_client_frame

CAP = 64 * 1024
HEAD_J = '{"type":"x","id":"k1","content":'
HEAD_M = b"\x83\xa4type\xa1x\xa2id\xa2k1\xa7content"


def _json_array(item: str) -> str:
    n = (CAP - len(HEAD_J) - 3) // (len(item) + 1)
    return HEAD_J + "[" + ",".join([item] * n) + "]}"


def _msgpack_array(item: bytes, tail: bytes = b"") -> bytes:
    n = (CAP - len(HEAD_M) - 5 - len(tail)) // len(item)
    count = n + 1 if tail else n  # the tail is one more item (or a fault where one starts)
    return HEAD_M + b"\xdc" + count.to_bytes(2, "big") + item * n + tail


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


def _with_max_items(max_items: int) -> WireLimits:
    """The default limits with this item cap; the defaults on a checkout without it."""
    try:
        return WireLimits(max_items=max_items)  # type: ignore[call-arg,unused-ignore]
    except TypeError:
        return WireLimits()  # before the item cap: no cap at all


DEFAULT = WireLimits()
RAISED = _with_max_items(1 << 20)

# Runs of small MessagePack items ended by a fault: msgspec refuses them.
REFUSED: dict[str, bytes] = {
    f"{name} + {fault}": _msgpack_array(item, tail)
    for name, item in [
        ("empty arrays", b"\x90"),
        ("one-item arrays", b"\x91\x90"),
        ("one-pair maps", b"\x81\xa0\x00"),
        ("empty strings", b"\xa0"),
        ("short strings", b"\xa1a"),
        ("non-canonical maps", b"\x81\xa0\xcc\x00"),
        ("deep nesting", b"\x91" * 29 + b"\x90"),
    ]
    for fault, tail in [("bad UTF-8", b"\xa1\xff"), ("bad byte", b"\xc1")]
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


def _decode_or_refuse(
    decoder: msgspec.json.Decoder[object] | msgspec.msgpack.Decoder[object], raw: bytes
) -> None:
    with contextlib.suppress(Exception):  # refused: msgspec read up to the fault, the floor
        decoder.decode(raw)


def _row(name: str, codec: Codec, data: str | bytes, limits: WireLimits) -> None:
    raw = data.encode() if isinstance(data, str) else data
    assert len(raw) <= CAP, (name, len(raw))
    result = decode_client_frame(data, codec, limits)
    outcome = "accepted" if isinstance(result, ClientFrame) else str(result.code)
    plain = msgspec.json.Decoder() if codec is Codec.JSON else msgspec.msgpack.Decoder()
    floor = per_call(functools.partial(_decode_or_refuse, plain, raw))
    cost = per_call(functools.partial(decode_client_frame, data, codec, limits))
    label = "json" if codec is Codec.JSON else "msgpack"
    cap = "raised" if limits is RAISED and RAISED != DEFAULT else "default"
    print(
        f"{name[:30]:31}{label:8}{cap:>8}{len(raw):7}{outcome:>16}{floor:11.1f}{cost:13.1f}"
        f"{cost / floor:7.2f}"
    )


def main() -> None:
    """Print the table."""
    from wsbus.session import _ref

    print(
        f"{'shape':31}{'codec':8}{'cap':>8}{'bytes':>7}{'outcome':>16}"  # a row per case
        f"{'decode us':>11}{'validate us':>13}{'ratio':>7}"
    )
    for limits in (DEFAULT, RAISED) if RAISED != DEFAULT else (DEFAULT,):
        for name, (text, blob) in SHAPES.items():
            for codec, data in ((Codec.JSON, text), (Codec.MSGPACK, blob)):
                _row(name, codec, data, limits)
    for name, blob in REFUSED.items():
        _row(name, Codec.MSGPACK, blob, DEFAULT)
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
