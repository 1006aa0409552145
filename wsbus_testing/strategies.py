"""Hypothesis strategies for wsbus: frames, envelopes, recipients, registry operations.

Plural nouns, each returning a ``SearchStrategy``; options are keyword-only::

    from hypothesis import given
    from wsbus_testing import strategies as wst

    @given(wst.adversarial_frames(codec=Codec.JSON))
    def test_never_crashes(frame): ...
"""

from __future__ import annotations

import math
import struct
from typing import Any

import msgspec
from hypothesis import strategies as st

from wsbus.envelope import (
    Address,
    ClientAddress,
    ConnId,
    Envelope,
    EnvelopeId,
    GatewayAddress,
    NodeId,
    Recipients,
    ServiceAddress,
)
from wsbus.wire import MAX_SAFE_INTEGER, MAX_TRACESTATE, Codec, is_traceparent, is_tracestate

__all__ = [
    "addresses",
    "adversarial_frames",
    "client_frames",
    "conn_ids",
    "envelopes",
    "json_values",
    "message_types",
    "names",
    "raw_bytes",
    "recipients",
    "registry_operations",
    "spoof_keys",
    "traceparents",
    "tracestates",
]

_TYPE_ALPHABET = "ABCXYZabcxyz0123456789._:-"
_NAME_ALPHABET = "abcxyzABC0129_.@-"


def message_types(*, reserved: bool = False) -> st.SearchStrategy[str]:
    """Valid message types; with ``reserved``, only ``wsbus.*`` ones."""
    body = st.text(_TYPE_ALPHABET, min_size=1, max_size=40)
    if reserved:
        return body.map(lambda t: ("wsbus." + t)[:128])
    return body.filter(lambda t: not t.startswith("wsbus."))


def names(*, pool: int | None = None) -> st.SearchStrategy[str]:
    """Alias, user and group names that the default name pattern accepts.

    Args:
        pool: draw from this many fixed names instead, so that collisions are common.
    """
    if pool is not None:
        return st.sampled_from([f"n{i}" for i in range(pool)])
    return st.text(_NAME_ALPHABET, min_size=1, max_size=64)


def conn_ids(*, node: str = "node", pool: int | None = None) -> st.SearchStrategy[ConnId]:
    """Connection ids of one node; with ``pool``, from that many fixed ids."""
    if pool is not None:
        return st.sampled_from([ConnId(f"{node}.{i:x}") for i in range(1, pool + 1)])
    return st.integers(1, 2**32).map(lambda i: ConnId(f"{node}.{i:x}"))


# Aliases for functions whose names are also keyword options below.
_conn_ids = conn_ids
_names = names


def json_values(
    *, max_leaves: int = 20, max_integer: int = MAX_SAFE_INTEGER
) -> st.SearchStrategy[Any]:
    """JSON-compatible values inside the wire protocol's caps (finite, safe integers)."""
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(-max_integer, max_integer)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=30)
    )
    return st.recursive(
        scalars,
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=10), children, max_size=4)
        ),
        max_leaves=max_leaves,
    )


def _encode(frame: dict[str, Any], codec: Codec) -> str | bytes:
    if codec is Codec.JSON:
        return msgspec.json.encode(frame).decode()
    return msgspec.msgpack.encode(frame)


_ids = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=64)


def client_frames(*, codec: Codec = Codec.JSON) -> st.SearchStrategy[str | bytes]:
    """Valid client frames, encoded for ``codec`` (``str`` for JSON, ``bytes`` for msgpack)."""

    @st.composite
    def build(draw: st.DrawFn) -> str | bytes:
        frame: dict[str, Any] = {"type": draw(message_types())}
        if draw(st.booleans()):
            frame["content"] = draw(json_values())
        if draw(st.booleans()):
            frame["id"] = draw(_ids)
        if draw(st.booleans()):
            frame["reply_to"] = draw(_ids)
        return _encode(frame, codec)

    return build()


def spoof_keys() -> st.SearchStrategy[str]:
    """Keys a client might add to pass itself off as someone else: none is allowed."""
    return st.sampled_from(
        [
            "sender",
            "Sender",
            "SENDER",
            "sender ",
            " sender",
            "\u0455ender",  # Cyrillic dze looks like a Latin s
            "s\u0435nder",  # Cyrillic ie looks like a Latin e
            "from",
            "From",
            "conn_id",
            "user",
            "alias",
            "recipients",
            "to",
            "headers",
            "Traceparent",
            "baggage",
            "created",
            "type\u0000",
            "",
        ]
    )


def raw_bytes() -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, biased towards bytes that look like JSON or MessagePack."""
    return st.one_of(
        st.binary(max_size=200),
        st.lists(
            st.sampled_from([b"{", b"}", b"[", b"]", b'"', b":", b",", b"1", b"\\u", b"type"])
        ).map(b"".join),
        st.lists(
            st.sampled_from([b"\x81", b"\x82", b"\x91", b"\xa4type", b"\xc1", b"\xd6\xff", b"\xcb"])
        ).map(b"".join),
    )


def adversarial_frames(*, codec: Codec = Codec.JSON) -> st.SearchStrategy[str | bytes]:
    """Frames built to break the gateway: spoofed senders, duplicates, bad values, junk.

    Every one is a frame of the right kind for ``codec`` (text for JSON, binary for
    msgpack), so the gateway must answer it with an error code, never a close or a crash.
    Some are valid by accident; that is fine: the gateway must then take them.
    """
    texts = codec is Codec.JSON

    def fit(data: bytes) -> str | bytes:
        if texts:
            return data.decode("utf-8", "replace")
        return data

    spoofed = st.builds(
        lambda key, value, type_: _encode({"type": type_, key: value}, codec),
        spoof_keys(),
        st.sampled_from(["service:auth", {"type": "service", "name": "auth"}, None, 1]),
        message_types(),
    )
    reserved = st.builds(lambda t: _encode({"type": t}, codec), message_types(reserved=True))
    wrong_types = st.builds(
        lambda field, value: _encode(
            {"type": "ok", field: value} if field != "type" else {field: value}, codec
        ),
        st.sampled_from(["type", "id", "reply_to"]),
        st.sampled_from([None, 1, 1.5, True, [], {}, "", "x" * 65, "bad type!"]),
    )
    not_objects = st.builds(
        lambda v: _encode(v, codec), st.sampled_from([[], "type", 1, None, True])
    )
    huge_ints = st.builds(
        lambda n: _encode({"type": "n", "content": n}, codec),
        st.sampled_from([2**53, -(2**53), 2**63 - 1, -(2**63), 2**64 - 1]),
    )
    deep = st.builds(
        lambda depth: _encode({"type": "deep", "content": _nest(depth)}, codec),
        st.integers(25, 120),
    )
    strategies: list[st.SearchStrategy[str | bytes]] = [
        spoofed,
        reserved,
        wrong_types,
        not_objects,
        huge_ints,
        deep,
        raw_bytes().map(fit),
        client_frames(codec=codec),
    ]
    if texts:
        strategies.append(
            st.sampled_from(
                [
                    '{"type":"a","type":"wsbus.admin"}',
                    '{"type":"a","content":{"k":1,"k":2}}',
                    '{"type":"a","content":NaN}',
                    '{"type":"a","content":Infinity}',
                    '{"type":"a","content":1e999}',
                    '{"type":"a","content":-1e999}',
                    '{"type":"a","content":"\\ud800"}',
                    '{"type":"a","content":"\\udc00x"}',
                    '{"type":"a","content":' + "9" * 5000 + "}",
                    '{"type":"a","content":18446744073709551616}',
                    "[" * 20000 + "]" * 20000,
                    '{"type":"a"',
                    "",
                    " ",
                    '{"type":"a"}{"type":"b"}',
                ]
            )
        )
    else:
        strategies.append(
            st.sampled_from(
                [
                    b"\x82\xa4type\xa1a\xa4type\xa1b",  # duplicate key
                    b"\x82\xa4type\xa1a\xa7content\xd6\xff\x00\x00\x00\x01",  # timestamp ext
                    b"\x82\xa4type\xa1a\xa7content\xc7\x01\x05\x00",  # ext8
                    b"\x82\xa4type\xa1a\xa7content\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00",  # NaN
                    b"\x82\xa4type\xa1a\xa7content\xcb\x7f\xf0\x00\x00\x00\x00\x00\x00",  # inf
                    b"\x82\xa4type\xa1a\xa7content\xa3\xed\xa0\x80",  # surrogate in UTF-8
                    b"\x82\xa4type\xa1a\xa7cont",  # truncated
                    b"\x81\x01\x02",  # integer key
                    b"\x91" * 20000 + b"\xc0",
                    b"",
                ]
            )
        )
    return st.one_of(strategies)


def noncanonical_msgpack() -> st.SearchStrategy[bytes]:
    """MessagePack frames written with wider headers than needed, some with a key twice.

    msgspec writes the narrowest header for every item; these frames use the others too
    (``str8`` for a short string, ``map16`` for a small map, ``uint8`` for a small integer),
    so that a check which relies on a frame re-encoding to its own bytes is bypassed.
    """

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        frame: dict[str, Any] = {"type": draw(message_types())}
        if draw(st.booleans()):
            frame["content"] = draw(json_values())
        if draw(st.booleans()):
            frame["id"] = draw(_ids)
        return _write_msgpack(frame, draw)

    return build()


def _write_msgpack(value: Any, draw: st.DrawFn) -> bytes:
    """Encode ``value`` as MessagePack, each header chosen by ``draw`` among the valid ones."""
    wide = draw(st.booleans())
    if isinstance(value, dict):
        pairs = [_write_msgpack(k, draw) + _write_msgpack(v, draw) for k, v in value.items()]
        if pairs and draw(st.integers(0, 9)) == 0:
            pairs.append(pairs[draw(st.integers(0, len(pairs) - 1))])  # a key twice
        n = len(pairs)
        head = bytes([0x80 + n]) if n < 16 and not wide else b"\xde" + n.to_bytes(2, "big")
        return head + b"".join(pairs)
    if isinstance(value, list):
        n = len(value)
        head = bytes([0x90 + n]) if n < 16 and not wide else b"\xdc" + n.to_bytes(2, "big")
        return head + b"".join(_write_msgpack(v, draw) for v in value)
    if isinstance(value, str):
        data = value.encode()
        if len(data) < 32 and not wide:
            return bytes([0xA0 + len(data)]) + data
        if len(data) < 256:
            return b"\xd9" + bytes([len(data)]) + data
        return b"\xda" + len(data).to_bytes(2, "big") + data
    if type(value) is int and 0 <= value < 256 and wide:
        return b"\xcc" + bytes([value])
    if type(value) is float and wide and abs(value) < 3e38:
        single = struct.pack("!f", value)
        if struct.unpack("!f", single)[0] == value:
            return b"\xca" + single
    return msgspec.msgpack.encode(value)


def _nest(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def addresses() -> st.SearchStrategy[Address]:
    """Sender addresses of every kind."""
    return st.one_of(
        st.builds(
            ClientAddress,
            conn_ids(),
            st.none() | names(),
            st.none() | names(),
        ),
        st.builds(ServiceAddress, names()),
        st.builds(GatewayAddress, st.text("abcdef0123456789", min_size=1, max_size=8).map(NodeId)),
    )


def recipients(
    *,
    conn_ids: st.SearchStrategy[ConnId] | None = None,
    aliases: st.SearchStrategy[str] | None = None,
    users: st.SearchStrategy[str] | None = None,
    groups: st.SearchStrategy[str] | None = None,
    everyone: bool | None = None,
) -> st.SearchStrategy[Recipients]:
    """Recipients of every kind, with excludes.

    Pass small pools (``conn_ids(pool=5)``, ``names(pool=4)``) to make recipients that
    match a registry's connections often.
    """
    ids = conn_ids if conn_ids is not None else _conn_ids(pool=8)
    alias_st = aliases if aliases is not None else names(pool=6)
    user_st = users if users is not None else names(pool=6)
    group_st = groups if groups is not None else names(pool=6)
    everyone_st = st.booleans() if everyone is None else st.just(everyone)
    return st.builds(
        Recipients,
        conn_ids=st.lists(ids, max_size=3).map(tuple),
        aliases=st.lists(alias_st, max_size=3).map(tuple),
        users=st.lists(user_st, max_size=3).map(tuple),
        groups=st.lists(group_st, max_size=3).map(tuple),
        everyone=everyone_st,
        exclude=st.lists(ids, max_size=3).map(tuple),
    )


def envelopes(*, content: st.SearchStrategy[Any] | None = None) -> st.SearchStrategy[Envelope]:
    """Envelopes as they travel on the bus."""
    return st.builds(
        Envelope,
        id=_ids.map(EnvelopeId),
        type=message_types(),
        sender=addresses(),
        content=content if content is not None else json_values(),
        recipients=st.none() | recipients(),
        reply_to=st.none() | _ids,
        headers=st.dictionaries(st.text(max_size=10), st.text(max_size=20), max_size=3),
        created=st.floats(0, 2e9).filter(math.isfinite),
        to=st.none() | st.builds(ServiceAddress, names()),
    )


def registry_operations(
    *,
    conn_ids: st.SearchStrategy[ConnId] | None = None,
    names: st.SearchStrategy[str] | None = None,
) -> st.SearchStrategy[tuple[Any, ...]]:
    """Registry operations as tuples, to apply in order.

    ``("connect", conn_id, user)``, ``("disconnect", conn_id)``, ``("set_alias", conn_id,
    alias)``, ``("clear_alias", conn_id)``, ``("join", conn_id, group)``, ``("leave",
    conn_id, group)``.

    Draw from small pools (the defaults) so operations hit the same ids and names often.
    """
    ids = conn_ids if conn_ids is not None else _conn_ids(pool=6)
    name_st = names if names is not None else _names(pool=5)
    return st.one_of(
        st.tuples(st.just("connect"), ids, st.none() | name_st),
        st.tuples(st.just("disconnect"), ids),
        st.tuples(st.just("set_alias"), ids, name_st),
        st.tuples(st.just("clear_alias"), ids),
        st.tuples(st.just("join"), ids, name_st),
        st.tuples(st.just("leave"), ids, name_st),
    )


def _hex(size: int) -> st.SearchStrategy[str]:
    return st.text("0123456789abcdef", min_size=size, max_size=size)


def traceparents(*, valid: bool = True) -> st.SearchStrategy[str]:
    """W3C ``traceparent`` values a gateway takes; with ``valid=False``, ones it refuses.

    The invalid ones are what a broken or hostile client sends: near misses (a character
    changed, dropped or added, upper-case hex, other separators, all-zero ids, version
    ``ff``, look-alike digits from other scripts) and strings far from any (empty, long,
    any text).
    """
    good = st.builds(
        lambda version, trace_id, parent_id, flags: f"{version}-{trace_id}-{parent_id}-{flags}",
        _hex(2).filter(lambda v: v != "ff"),
        _hex(32).filter(lambda t: t != "0" * 32),
        _hex(16).filter(lambda p: p != "0" * 16),
        _hex(2),
    )
    if valid:
        return good
    near = st.one_of(
        st.builds(
            lambda value, at, char: value[:at] + char + value[at + 1 :],
            good,
            st.integers(0, 54),
            st.characters(codec="utf-8"),
        ),
        st.builds(lambda value, at: value[:at] + value[at + 1 :], good, st.integers(0, 54)),
        st.builds(lambda value, char: value + char, good, st.characters(codec="utf-8")),
        good.map(str.upper),
        good.map(lambda value: value.replace("-", "_")),
        good.map(lambda value: "ff" + value[2:]),
        good.map(lambda value: value[:3] + "0" * 32 + value[35:]),
        good.map(lambda value: value[:36] + "0" * 16 + value[52:]),
        # Arabic-Indic and full-width digits: str.isdigit() says yes to them.
        good.map(lambda value: value.replace("1", "\u0661").replace("2", "\uff12")),
    )
    far = st.one_of(
        st.just(""),
        st.text(max_size=80),
        st.text("0123456789abcdef-", min_size=56, max_size=4096),
    )
    return st.one_of(near, far).filter(lambda value: not is_traceparent(value))


def tracestates(*, valid: bool = True) -> st.SearchStrategy[str]:
    """W3C ``tracestate`` values a gateway takes; with ``valid=False``, ones it refuses."""
    key = st.one_of(
        st.from_regex(r"[a-z][a-z0-9_*/-]{0,20}", fullmatch=True),
        st.from_regex(r"[a-z0-9][a-z0-9_*/-]{0,10}@[a-z][a-z0-9_*/-]{0,12}", fullmatch=True),
    )
    value = st.from_regex(
        r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,20}[\x21-\x2b\x2d-\x3c\x3e-\x7e]", fullmatch=True
    )
    good = (
        st.dictionaries(key, value, min_size=1, max_size=32)
        .map(lambda members: ",".join(f"{k}={v}" for k, v in members.items()))
        .filter(lambda state: len(state) <= MAX_TRACESTATE)
    )
    if valid:
        return good
    bad = st.one_of(
        good.map(lambda state: state + "," + state),  # every key twice
        good.map(str.upper),
        good.map(lambda state: state + "="),
        st.just("k=" + "v" * MAX_TRACESTATE),
        st.just(",".join(f"k{i}=v" for i in range(33))),
        st.text(max_size=80),
    )
    return bad.filter(lambda state: not is_tracestate(state))
