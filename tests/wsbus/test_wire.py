"""The client wire protocol v1 (SPEC section 3): codecs, strict validation, error codes."""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsbus import wire
from wsbus.wire import (
    ClientFrame,
    Codec,
    ErrorCode,
    Rejection,
    ServerFrame,
    WireLimits,
    decode_client_frame,
    encode_server_frame,
    frame_decoder,
    negotiate,
)
from wsbus_testing import strategies as wst

J = Codec.JSON
M = Codec.MSGPACK
BOTH = pytest.mark.parametrize("codec", [J, M], ids=["json", "msgpack"])

# The codes decode_client_frame may produce; the others belong to the gateway and the bus.
WIRE_CODES = frozenset(
    {
        ErrorCode.MALFORMED,
        ErrorCode.INVALID_MESSAGE,
        ErrorCode.UNKNOWN_FIELD,
        ErrorCode.RESERVED_TYPE,
        ErrorCode.LIMIT_EXCEEDED,
        ErrorCode.BAD_VALUE,
    }
)
TYPE_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# What decode_client_frame answers when its own code raised: it must never be seen.
INTERNAL_BUG_MESSAGE = "the frame could not be read"


def enc(obj: Any, codec: Codec) -> str | bytes:
    """Encode like a client would: text for JSON, bytes for msgpack."""
    if codec is J:
        return msgspec.json.encode(obj).decode()
    return msgspec.msgpack.encode(obj)


def plain_decode(data: str | bytes, codec: Codec) -> Any:
    """Decode without any of wsbus's checks: the oracle for what a client wrote."""
    raw = data.encode() if isinstance(data, str) else data
    return msgspec.json.decode(raw) if codec is J else msgspec.msgpack.decode(raw)


def nest(depth: int) -> Any:
    """``depth`` nested arrays around a 0."""
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def nest_objects(depth: int) -> Any:
    """``depth`` nested objects around a 0."""
    value: Any = 0
    for _ in range(depth):
        value = {"a": value}
    return value


def assert_clean_message(rejection: Rejection) -> None:
    """Error messages are short, printable ASCII and carry no internals."""
    message = rejection.message
    assert message
    assert len(message) < 120, message
    assert message.isascii() and message.isprintable(), message
    assert "Traceback" not in message
    assert 'File "' not in message
    assert ".py" not in message
    assert "/" not in message
    assert message != INTERNAL_BUG_MESSAGE


def check_outcome(data: str | bytes, codec: Codec, result: object) -> None:
    """The invariants of every answer of decode_client_frame, whatever it was given."""
    assert isinstance(result, ClientFrame | Rejection)
    if isinstance(result, Rejection):
        assert result.code in WIRE_CODES
        assert result.message
        assert len(result.message) < 120, result.message
        assert result.message.isascii() and result.message.isprintable(), result.message
        assert result.message != INTERNAL_BUG_MESSAGE
        if result.ref is not None:
            # Never echo junk: a ref is always the frame's own, valid id.
            assert 0 < len(result.ref) <= 64
            written = plain_decode(data, codec)
            assert type(written) is dict
            assert written["id"] == result.ref
    else:
        assert TYPE_RE.fullmatch(result.type)
        assert not result.type.startswith("wsbus.")
        for value in (result.id, result.reply_to):
            assert value is None or (type(value) is str and 0 < len(value) <= 64)


# --- Never raises, always a documented code -------------------------------------------------

surrogate_text = st.text(
    st.characters(categories=["Cs"]) | st.characters(codec="utf-8"), max_size=50
)


@BOTH
@settings(max_examples=300)
@given(data=st.binary(max_size=300) | wst.raw_bytes())
def test_arbitrary_bytes_get_a_frame_or_a_documented_rejection(codec: Codec, data: bytes) -> None:
    check_outcome(data, codec, decode_client_frame(data, codec))


@BOTH
@settings(max_examples=300)
@given(data=st.text(max_size=300) | surrogate_text)
def test_arbitrary_text_get_a_frame_or_a_documented_rejection(codec: Codec, data: str) -> None:
    result = decode_client_frame(data, codec)
    if any(0xD800 <= ord(c) <= 0xDFFF for c in data):
        assert isinstance(result, Rejection)
        assert result.code is ErrorCode.BAD_VALUE
    else:
        check_outcome(data, codec, result)


@settings(max_examples=150)
@given(
    before=st.text('ab:"', max_size=3),
    surrogate=st.characters(categories=["Cs"]),
    after=st.text("ab", max_size=3),
    where=st.sampled_from(["type", "content", "id", "key"]),
)
def test_lone_surrogates_anywhere_are_bad_values(
    before: str, surrogate: str, after: str, where: str
) -> None:
    def frame(text: str) -> str:
        if where == "key":
            return '{"type":"a","content":{"' + text + '":1}}'
        return '{"type":"a","' + where + '":"' + text + '"}'

    # As a JSON escape: the escaped text is otherwise plain, so this is valid JSON but for it.
    escaped = before.replace('"', '\\"') + f"\\u{ord(surrogate):04x}" + after
    result = decode_client_frame(frame(escaped), J)
    assert isinstance(result, Rejection)
    assert result.code is ErrorCode.BAD_VALUE
    # As the character itself in a Python str, as a text frame may deliver it, on both codecs.
    literal = frame(before.replace('"', '\\"') + surrogate + after)
    for codec in (J, M):
        assert decode_client_frame(literal, codec) == Rejection(
            ErrorCode.BAD_VALUE, "text contains a lone UTF-16 surrogate"
        )


@BOTH
@settings(max_examples=400)
@given(data=st.data())
def test_adversarial_frames_get_a_frame_or_a_documented_rejection(
    codec: Codec, data: st.DataObject
) -> None:
    frame = data.draw(wst.adversarial_frames(codec=codec))
    # The strategy promises frames of the codec's own kind.
    assert isinstance(frame, str if codec is J else bytes)
    check_outcome(frame, codec, decode_client_frame(frame, codec))


# --- Valid frames round-trip ------------------------------------------------------------------


@BOTH
@settings(max_examples=200)
@given(data=st.data())
def test_client_frames_decode_to_what_was_encoded(codec: Codec, data: st.DataObject) -> None:
    frame = data.draw(wst.client_frames(codec=codec))
    written = plain_decode(frame, codec)
    result = decode_client_frame(frame, codec)
    assert result == ClientFrame(
        type=written["type"],
        content=written.get("content"),
        id=written.get("id"),
        reply_to=written.get("reply_to"),
    )


ids = st.text(st.characters(codec="utf-8"), min_size=1, max_size=64)


@BOTH
@settings(max_examples=200)
@given(
    type_=wst.message_types(),
    content=wst.json_values(),
    id_=st.none() | ids,
    reply_to=st.none() | ids,
)
def test_frames_built_here_decode_to_their_fields(
    codec: Codec, type_: str, content: Any, id_: str | None, reply_to: str | None
) -> None:
    frame: dict[str, Any] = {"type": type_, "content": content}
    if id_ is not None:
        frame["id"] = id_
    if reply_to is not None:
        frame["reply_to"] = reply_to
    result = decode_client_frame(enc(frame, codec), codec)
    assert isinstance(result, ClientFrame)
    assert (result.type, result.content, result.id, result.reply_to) == (
        type_,
        content,
        id_,
        reply_to,
    )


# --- One or more explicit cases per error code -----------------------------------------------

# Objects that are rejected the same way whichever codec carries them.
OBJECT_CASES = [
    pytest.param([], ErrorCode.MALFORMED, id="array"),
    pytest.param([{"type": "a"}], ErrorCode.MALFORMED, id="array-of-frame"),
    pytest.param("type", ErrorCode.MALFORMED, id="string"),
    pytest.param(1, ErrorCode.MALFORMED, id="number"),
    pytest.param(None, ErrorCode.MALFORMED, id="null"),
    pytest.param({}, ErrorCode.INVALID_MESSAGE, id="empty-object"),
    pytest.param({"content": 1}, ErrorCode.INVALID_MESSAGE, id="missing-type"),
    pytest.param({"type": None}, ErrorCode.INVALID_MESSAGE, id="type-null"),
    pytest.param({"type": 1}, ErrorCode.INVALID_MESSAGE, id="type-int"),
    pytest.param({"type": ["a"]}, ErrorCode.INVALID_MESSAGE, id="type-array"),
    pytest.param({"type": ""}, ErrorCode.INVALID_MESSAGE, id="type-empty"),
    pytest.param({"type": "a\n"}, ErrorCode.INVALID_MESSAGE, id="type-trailing-newline"),
    pytest.param({"type": "bad type!"}, ErrorCode.INVALID_MESSAGE, id="type-bad-chars"),
    pytest.param({"type": "x" * 129}, ErrorCode.INVALID_MESSAGE, id="type-129"),
    pytest.param({"type": "a", "id": "x" * 65}, ErrorCode.INVALID_MESSAGE, id="id-65"),
    pytest.param({"type": "a", "id": ""}, ErrorCode.INVALID_MESSAGE, id="id-empty"),
    pytest.param({"type": "a", "id": None}, ErrorCode.INVALID_MESSAGE, id="id-null"),
    pytest.param({"type": "a", "id": 7}, ErrorCode.INVALID_MESSAGE, id="id-int"),
    pytest.param({"type": "a", "reply_to": 1}, ErrorCode.INVALID_MESSAGE, id="reply_to-int"),
    pytest.param({"type": "a", "reply_to": "x" * 65}, ErrorCode.INVALID_MESSAGE, id="reply_to-65"),
    pytest.param({"type": "a", "sender": "auth"}, ErrorCode.UNKNOWN_FIELD, id="sender"),
    pytest.param({"type": "a", "Sender": "auth"}, ErrorCode.UNKNOWN_FIELD, id="Sender"),
    pytest.param({"type": "a", "sender ": "auth"}, ErrorCode.UNKNOWN_FIELD, id="sender-space"),
    pytest.param(
        {"type": "a", "\u0455ender": "auth"}, ErrorCode.UNKNOWN_FIELD, id="cyrillic-sender"
    ),
    pytest.param({"type": "a", "from": "auth"}, ErrorCode.UNKNOWN_FIELD, id="from"),
    pytest.param(
        {"type": "a", "sender": {"type": "service", "name": "auth"}},
        ErrorCode.UNKNOWN_FIELD,
        id="sender-address",
    ),
    pytest.param({"type": "a", "": 1}, ErrorCode.UNKNOWN_FIELD, id="empty-key"),
    pytest.param({"type": "a", "type\x00": 1}, ErrorCode.UNKNOWN_FIELD, id="type-nul"),
    pytest.param({"sender": "auth"}, ErrorCode.UNKNOWN_FIELD, id="sender-without-type"),
    pytest.param({"type": "wsbus.anything"}, ErrorCode.RESERVED_TYPE, id="wsbus-anything"),
    pytest.param({"type": "wsbus.auth"}, ErrorCode.RESERVED_TYPE, id="wsbus-auth-not-allowed"),
    pytest.param({"type": "wsbus."}, ErrorCode.RESERVED_TYPE, id="wsbus-dot"),
    pytest.param({"type": "wsbus.ack"}, ErrorCode.RESERVED_TYPE, id="wsbus-ack"),
    pytest.param(
        {"type": "a", "content": nest(32)}, ErrorCode.LIMIT_EXCEEDED, id="depth-33-arrays"
    ),
    pytest.param(
        {"type": "a", "content": nest_objects(32)},
        ErrorCode.LIMIT_EXCEEDED,
        id="depth-33-objects",
    ),
    pytest.param(
        {"type": "a", "content": {"a": [{"b": nest(29)}]}},
        ErrorCode.LIMIT_EXCEEDED,
        id="depth-33-mixed",
    ),
    pytest.param({"type": "a", "content": 2**53}, ErrorCode.BAD_VALUE, id="2**53"),
    pytest.param({"type": "a", "content": -(2**53)}, ErrorCode.BAD_VALUE, id="-2**53"),
    pytest.param({"type": "a", "content": 2**63 - 1}, ErrorCode.BAD_VALUE, id="int64-max"),
    pytest.param({"type": "a", "content": 2**64 - 1}, ErrorCode.BAD_VALUE, id="uint64-max"),
    pytest.param({"type": "a", "content": -(2**63)}, ErrorCode.BAD_VALUE, id="int64-min"),
    pytest.param(
        {"type": "a", "content": {"k": [1, 2**53]}}, ErrorCode.BAD_VALUE, id="2**53-nested"
    ),
]


@BOTH
@pytest.mark.parametrize(("obj", "code"), OBJECT_CASES)
def test_rejected_objects(codec: Codec, obj: Any, code: ErrorCode) -> None:
    result = decode_client_frame(enc(obj, codec), codec)
    assert isinstance(result, Rejection), result
    assert result.code is code, result
    assert result.ref is None
    assert_clean_message(result)


JSON_CASES = [
    pytest.param("not json", ErrorCode.MALFORMED, id="not-json"),
    pytest.param("", ErrorCode.MALFORMED, id="empty"),
    pytest.param(" ", ErrorCode.MALFORMED, id="space"),
    pytest.param('{"type":"a"', ErrorCode.MALFORMED, id="truncated"),
    pytest.param('{"type":"a",}', ErrorCode.MALFORMED, id="trailing-comma"),
    pytest.param("{'type':'a'}", ErrorCode.MALFORMED, id="single-quotes"),
    pytest.param('{"type":"a"}{"type":"b"}', ErrorCode.MALFORMED, id="two-objects"),
    pytest.param('{"type":"a","type":"b"}', ErrorCode.MALFORMED, id="dup-top"),
    pytest.param('{"type":"a","type":"wsbus.admin"}', ErrorCode.MALFORMED, id="dup-top-reserved"),
    pytest.param('{"type":"a","\\u0074ype":"b"}', ErrorCode.MALFORMED, id="dup-escaped-key"),
    pytest.param('{"type":"a","content":{"k":1,"k":2}}', ErrorCode.MALFORMED, id="dup-nested"),
    pytest.param(
        '{"type":"a","content":[{"k":{"j":1}},{"k":1,"k":2}]}',
        ErrorCode.MALFORMED,
        id="dup-in-array",
    ),
    pytest.param(
        '{"type":"a","content":{"x:y":1,"k":1,"k":2}}',
        ErrorCode.MALFORMED,
        id="dup-with-colon-in-string",
    ),
    pytest.param(
        '{"type":"a","content":{"p":{"q":1}},"content":{"r":1}}',
        ErrorCode.MALFORMED,
        id="dup-hides-an-object",
    ),
    pytest.param('{"type":"a","content":NaN}', ErrorCode.MALFORMED, id="NaN-literal"),
    pytest.param('{"type":"a","content":Infinity}', ErrorCode.MALFORMED, id="Infinity-literal"),
    pytest.param('{"type":"a","content":-Infinity}', ErrorCode.MALFORMED, id="-Infinity-literal"),
    pytest.param('{"type":"a","content":1e999}', ErrorCode.BAD_VALUE, id="1e999"),
    pytest.param('{"type":"a","content":-1e999}', ErrorCode.BAD_VALUE, id="-1e999"),
    pytest.param('{"type":"a","content":[0.5,1E400]}', ErrorCode.BAD_VALUE, id="1E400-nested"),
    pytest.param(
        '{"type":"a","content":' + "9" * 5000 + "}", ErrorCode.BAD_VALUE, id="5000-digits"
    ),
    pytest.param(
        '{"type":"a","content":-' + "9" * 5000 + "}", ErrorCode.BAD_VALUE, id="-5000-digits"
    ),
    pytest.param('{"type":"a","content":18446744073709551616}', ErrorCode.BAD_VALUE, id="2**64"),
    pytest.param('{"type":"a","content":"\\ud800"}', ErrorCode.BAD_VALUE, id="escape-ud800"),
    pytest.param('{"type":"a","content":"\\udc00x"}', ErrorCode.BAD_VALUE, id="escape-udc00"),
    pytest.param('{"type":"a","content":{"\\ud800":1}}', ErrorCode.BAD_VALUE, id="key-ud800"),
    pytest.param('{"type":"a","content":"\ud800"}', ErrorCode.BAD_VALUE, id="text-ud800"),
    pytest.param(b'{"type":"a","content":"\xff"}', ErrorCode.MALFORMED, id="bytes-invalid-utf8"),
    # Not one object comes before the values, however deep: the documented order.
    pytest.param("[" * 20000 + "]" * 20000, ErrorCode.MALFORMED, id="depth-20000-bare"),
    pytest.param(
        '{"type":"a","content":' + "[" * 20000 + "]" * 20000 + "}",
        ErrorCode.LIMIT_EXCEEDED,
        id="depth-20000",
    ),
    pytest.param(
        '{"type":"a","content":' + '{"a":' * 20000 + "1" + "}" * 20000 + "}",
        ErrorCode.LIMIT_EXCEEDED,
        id="depth-20000-objects",
    ),
]

MSGPACK_HEAD = b"\x82\xa4type\xa1a\xa7content"  # {"type": "a", "content": <next item>}

MSGPACK_CASES = [
    pytest.param(b"", ErrorCode.MALFORMED, id="empty"),
    pytest.param(b"\xc1", ErrorCode.MALFORMED, id="never-used-byte"),
    pytest.param(b"\x82\xa4type\xa1a\xa7cont", ErrorCode.MALFORMED, id="truncated"),
    pytest.param(MSGPACK_HEAD, ErrorCode.MALFORMED, id="truncated-value"),
    pytest.param(b"\x81\xa4type\xa1a\x81\xa4type\xa1b", ErrorCode.MALFORMED, id="two-maps"),
    pytest.param(b'{"type":"a"}', ErrorCode.MALFORMED, id="json-bytes"),
    pytest.param(b"\x82\xa4type\xa1a\xa4type\xa1b", ErrorCode.MALFORMED, id="dup-top"),
    pytest.param(
        b"\xde\x00\x02\xa4type\xa1a\xa4type\xa1b", ErrorCode.MALFORMED, id="dup-top-map16"
    ),
    pytest.param(
        b"\xdf\x00\x00\x00\x02\xa4type\xa1a\xa4type\xa1b",
        ErrorCode.MALFORMED,
        id="dup-top-map32",
    ),
    pytest.param(MSGPACK_HEAD + b"\x82\xa1k\x01\xa1k\x02", ErrorCode.MALFORMED, id="dup-nested"),
    pytest.param(
        MSGPACK_HEAD + b"\xde\x00\x02\xa1k\x01\xa1k\x02", ErrorCode.MALFORMED, id="dup-map16"
    ),
    pytest.param(
        MSGPACK_HEAD + b"\x91\x82\xd9\x01k\x01\xa1k\x02", ErrorCode.MALFORMED, id="dup-str8-key"
    ),
    # A map is not a string: the key rule, as for any other key (msgspec cannot hash it).
    pytest.param(MSGPACK_HEAD + b"\x81\x80\x01", ErrorCode.INVALID_MESSAGE, id="map-as-key"),
    pytest.param(b"\x81\x01\x02", ErrorCode.INVALID_MESSAGE, id="int-key"),
    pytest.param(b"\x82\xa4type\xa1a\x01\x02", ErrorCode.INVALID_MESSAGE, id="int-key-with-type"),
    pytest.param(
        MSGPACK_HEAD + b"\x81\xc4\x01k\x01", ErrorCode.INVALID_MESSAGE, id="bin-key-nested"
    ),
    pytest.param(b"\x81\xc4\x04type\xa1a", ErrorCode.INVALID_MESSAGE, id="bin-type-key"),
    pytest.param(b"\x81\xa4type\xc4\x01a", ErrorCode.INVALID_MESSAGE, id="bin-type-value"),
    pytest.param(MSGPACK_HEAD + b"\xcb\x7f\xf8" + b"\x00" * 6, ErrorCode.BAD_VALUE, id="f64-nan"),
    pytest.param(MSGPACK_HEAD + b"\xcb\x7f\xf0" + b"\x00" * 6, ErrorCode.BAD_VALUE, id="f64-inf"),
    pytest.param(
        MSGPACK_HEAD + b"\xcb\xff\xf0" + b"\x00" * 6, ErrorCode.BAD_VALUE, id="f64-minus-inf"
    ),
    pytest.param(MSGPACK_HEAD + b"\xca\x7f\xc0\x00\x00", ErrorCode.BAD_VALUE, id="f32-nan"),
    pytest.param(MSGPACK_HEAD + b"\xcf" + b"\xff" * 8, ErrorCode.BAD_VALUE, id="uint64-max"),
    pytest.param(MSGPACK_HEAD + b"\xc7\x01\x05\x00", ErrorCode.BAD_VALUE, id="ext8"),
    pytest.param(MSGPACK_HEAD + b"\xc8\x00\x01\x05\x00", ErrorCode.BAD_VALUE, id="ext16"),
    pytest.param(MSGPACK_HEAD + b"\xd4\x05\x00", ErrorCode.BAD_VALUE, id="fixext1"),
    pytest.param(MSGPACK_HEAD + b"\xd6\xff\x00\x00\x00\x01", ErrorCode.BAD_VALUE, id="timestamp32"),
    pytest.param(MSGPACK_HEAD + b"\xd7\xff" + b"\x00" * 8, ErrorCode.BAD_VALUE, id="timestamp64"),
    pytest.param(
        MSGPACK_HEAD + b"\x91\x81\xa1k\xd6\xff\x00\x00\x00\x01",
        ErrorCode.BAD_VALUE,
        id="timestamp-nested",
    ),
    pytest.param(MSGPACK_HEAD + b"\xa3\xed\xa0\x80", ErrorCode.BAD_VALUE, id="utf8-surrogate"),
    pytest.param(MSGPACK_HEAD + b"\xa2\xff\xfe", ErrorCode.BAD_VALUE, id="invalid-utf8"),
    pytest.param(b"\x91" * 20000 + b"\xc0", ErrorCode.MALFORMED, id="depth-20000-bare"),
    pytest.param(
        MSGPACK_HEAD + b"\x91" * 20000 + b"\xc0", ErrorCode.LIMIT_EXCEEDED, id="depth-20000"
    ),
    pytest.param(
        MSGPACK_HEAD + b"\x81\xa1a" * 20000 + b"\xc0",
        ErrorCode.LIMIT_EXCEEDED,
        id="depth-20000-maps",
    ),
]


@pytest.mark.parametrize(("data", "code"), JSON_CASES)
def test_rejected_json(data: str | bytes, code: ErrorCode) -> None:
    result = decode_client_frame(data, J)
    assert isinstance(result, Rejection), result
    assert result.code is code, result
    assert result.ref is None
    assert_clean_message(result)


@pytest.mark.parametrize(("data", "code"), MSGPACK_CASES)
def test_rejected_msgpack(data: bytes, code: ErrorCode) -> None:
    result = decode_client_frame(data, M)
    assert isinstance(result, Rejection), result
    assert result.code is code, result
    assert result.ref is None
    assert_clean_message(result)


def test_each_wire_code_is_covered_by_an_explicit_case() -> None:
    covered = {param.values[-1] for param in [*OBJECT_CASES, *JSON_CASES, *MSGPACK_CASES]}
    assert covered == WIRE_CODES


@pytest.mark.parametrize(
    ("data", "content"),
    [
        pytest.param('{"type":"a","content":{"x:y":1,"x":2}}', {"x:y": 1, "x": 2}, id="colon"),
        pytest.param('{"type":"a:b:c","content":{"x:y":"::"}}', {"x:y": "::"}, id="colons"),
        pytest.param(
            '{"type":"a","content":{"x\\":":1,"x":2}}', {'x":': 1, "x": 2}, id="escaped-quote"
        ),
        pytest.param('{"type":"a","content":{"x\\\\":1,"x":2}}', {"x\\": 1, "x": 2}, id="bslash"),
        pytest.param('{"type":"a","content":[{"k":1},{"k":2}]}', [{"k": 1}, {"k": 2}], id="same"),
        pytest.param('{"type":"a","content":"\\ud83d\\ude00"}', "\U0001f600", id="pair"),
        pytest.param('{"type":"a","content":9007199254740991}', 2**53 - 1, id="2**53-1"),
        pytest.param('{"type":"a","content":-9007199254740991}', -(2**53 - 1), id="-(2**53-1)"),
        pytest.param('{"type":"a","content":1e308}', 1e308, id="1e308"),
        pytest.param('{"type":"a","content":1e-999}', 0.0, id="underflow"),
        pytest.param(' {"type":"a"} ', None, id="whitespace"),
    ],
)
def test_accepted_json(data: str, content: Any) -> None:
    result = decode_client_frame(data, J)
    assert isinstance(result, ClientFrame), result
    assert result.content == content


@BOTH
@pytest.mark.parametrize(
    "content",
    [
        pytest.param(2**53 - 1, id="2**53-1"),
        pytest.param(-(2**53 - 1), id="-(2**53-1)"),
        pytest.param(nest(31), id="depth-32-arrays"),
        pytest.param(nest_objects(31), id="depth-32-objects"),
        pytest.param({"a": [{"b": nest(28)}]}, id="depth-32-mixed"),
        pytest.param({"k": "v", "K": "v", "k ": "v"}, id="near-duplicates"),
    ],
)
def test_accepted_content(codec: Codec, content: Any) -> None:
    result = decode_client_frame(enc({"type": "a", "content": content}, codec), codec)
    assert result == ClientFrame("a", content)


def test_msgpack_bin_and_float32_are_accepted() -> None:
    assert decode_client_frame(MSGPACK_HEAD + b"\xc4\x02ab", M) == ClientFrame("a", b"ab")
    assert decode_client_frame(MSGPACK_HEAD + b"\xca\x3f\xc0\x00\x00", M) == ClientFrame("a", 1.5)


@BOTH
def test_depth_counts_the_frame_object_as_level_one(codec: Codec) -> None:
    # The frame is level 1, so ``content`` may hold 31 more levels: 32 in all.
    for depth in range(1, 32):
        frame = enc({"type": "a", "content": nest(depth)}, codec)
        assert isinstance(decode_client_frame(frame, codec), ClientFrame), depth
    too_deep = decode_client_frame(enc({"type": "a", "content": nest(32)}, codec), codec)
    assert isinstance(too_deep, Rejection)
    assert too_deep.code is ErrorCode.LIMIT_EXCEEDED


@BOTH
def test_depth_limit_is_configurable(codec: Codec) -> None:
    limits = WireLimits(max_depth=2)
    assert decode_client_frame(enc({"type": "a", "content": [1]}, codec), codec, limits) == (
        ClientFrame("a", [1])
    )
    result = decode_client_frame(enc({"type": "a", "content": [[1]]}, codec), codec, limits)
    assert isinstance(result, Rejection)
    assert result.code is ErrorCode.LIMIT_EXCEEDED
    flat = decode_client_frame(enc({"type": "a"}, codec), codec, WireLimits(max_depth=1))
    assert flat == ClientFrame("a")


@BOTH
def test_integer_limit_is_configurable(codec: Codec) -> None:
    limits = WireLimits(max_integer=100)
    for ok in (100, -100, 0):
        frame = enc({"type": "a", "content": ok}, codec)
        assert decode_client_frame(frame, codec, limits) == ClientFrame("a", ok)
    for bad in (101, -101):
        result = decode_client_frame(enc({"type": "a", "content": bad}, codec), codec, limits)
        assert isinstance(result, Rejection)
        assert result.code is ErrorCode.BAD_VALUE


def test_integer_limit_message_names_the_configured_limit() -> None:
    result = decode_client_frame('{"type":"a","content":101}', J, WireLimits(max_integer=100))
    assert isinstance(result, Rejection)
    assert "100" in result.message
    assert "2**53" not in result.message


def frame_of_size(size: int, codec: Codec) -> str | bytes:
    """A valid frame of exactly ``size`` bytes, padded in its content string."""
    for pad in range(size - 40, size + 1):
        frame = enc({"type": "a", "content": "x" * pad}, codec)
        if len(frame) == size:
            return frame
    raise AssertionError(f"no padding gives {size} bytes")  # pragma: no cover


def _values_frame(content: Any, codec: Codec) -> str | bytes:
    return enc({"type": "a", "id": "q1", "content": content}, codec)


# Contents of n values in all with the frame's three fields (type, id, content).
ITEM_SHAPES = [
    pytest.param(lambda n: [0] * (n - 3), id="ints"),
    pytest.param(lambda n: [[]] * (n - 3), id="empty-arrays"),
    pytest.param(lambda n: [{}] * (n - 3), id="empty-objects"),
    pytest.param(lambda n: [""] * (n - 3), id="empty-strings"),
    pytest.param(lambda n: [{"": 0}] * ((n - 3) // 2) + [0] * ((n - 3) % 2), id="one-pair"),
    pytest.param(lambda n: {str(i): [i] for i in range((n - 3) // 2)} | {"x": 0}, id="mixed"),
    pytest.param(lambda n: [nest(19)] * ((n - 3) // 20) + [0] * ((n - 3) % 20), id="deep"),
]


@BOTH
@pytest.mark.parametrize("shape", ITEM_SHAPES)
def test_a_frame_holds_at_most_max_items_values(codec: Codec, shape: Any) -> None:
    # Every value counts, whatever its kind and depth: 64 KiB of empty arrays decoded to
    # 65,000 lists (73 times the bytes in memory), published as a valid frame.
    for cap in (8, 64, 4096):
        limits = WireLimits(max_items=cap)
        at_cap = _values_frame(shape(cap), codec)
        assert msgspec.json.decode(msgspec.json.encode(plain_decode(at_cap, codec)))
        result = decode_client_frame(at_cap, codec, limits)
        assert isinstance(result, ClientFrame), (cap, result)
        over = _values_frame(shape(cap + 1), codec)
        refused = decode_client_frame(over, codec, limits)
        assert refused == Rejection(
            ErrorCode.LIMIT_EXCEEDED, f"the frame holds more than {cap} values", "q1"
        ), cap
        assert_clean_message(refused)


@BOTH
def test_the_default_item_cap_refuses_a_frame_of_small_containers(codec: Codec) -> None:
    assert WireLimits().max_items == 4096
    ok = decode_client_frame(_values_frame([[]] * 4093, codec), codec)
    assert isinstance(ok, ClientFrame)
    contents: list[list[Any]] = [[[]] * 4094, [[]] * 20_000, [{"": 0}] * 3000, [1] * 4094]
    for content in contents:
        refused = decode_client_frame(_values_frame(content, codec), codec)
        assert isinstance(refused, Rejection)
        assert (refused.code, refused.ref) == (ErrorCode.LIMIT_EXCEEDED, "q1")


@BOTH
def test_the_item_cap_counts_the_frame_fields_and_comes_before_value_faults(
    codec: Codec,
) -> None:
    limits = WireLimits(max_items=4)
    frame = enc({"type": "a", "id": "q", "reply_to": "r", "content": 1}, codec)
    assert decode_client_frame(frame, codec, limits) == ClientFrame("a", 1, "q", "r")
    frame = enc({"type": "a", "id": "q", "reply_to": "r", "content": [1]}, codec)
    result = decode_client_frame(frame, codec, limits)
    assert isinstance(result, Rejection) and result.code is ErrorCode.LIMIT_EXCEEDED
    # A frame over the cap is refused for it, whatever else is wrong further in.
    for bad in (2**60, nest(40)):
        frame = enc({"type": "a", "id": "q", "content": [0, 0, bad]}, codec)
        result = decode_client_frame(frame, codec, limits)
        assert result == Rejection(
            ErrorCode.LIMIT_EXCEEDED, "the frame holds more than 4 values", "q"
        ), bad


def test_refused_json_and_msgpack_frames_over_the_item_cap_keep_their_ref() -> None:
    limits = WireLimits(max_items=16)
    for tail in (",1E400", ',"\\ud800"', ",1e999"):
        text = '{"type":"a","content":[' + ",".join(["[]"] * 20) + tail + '],"id":"q"}'
        result = decode_client_frame(text, J, limits)
        assert isinstance(result, Rejection)
        assert (result.code, result.ref) == (ErrorCode.LIMIT_EXCEEDED, "q"), tail
    head = b"\x83\xa4type\xa1a\xa7content\xdc\x00\x15"
    for fault in (b"\xa1\xff", b"\xd4\x01\x00", b"\x91" * 2000 + b"\x90"):
        for id_first in (True, False):
            body = b"\x90" * 20 + fault
            frame = (
                b"\x83\xa2id\xa1q" + head[1:] + body if id_first else head + body + b"\xa2id\xa1q"
            )
            result = decode_client_frame(frame, M, limits)
            assert isinstance(result, Rejection)
            assert (result.code, result.ref) == (ErrorCode.LIMIT_EXCEEDED, "q"), (fault, id_first)


@BOTH
@pytest.mark.parametrize(
    "item",
    [[], {}, {"": 0}, -20, 1.5, "ab", [0]],
    ids=["empty-arrays", "empty-objects", "one-pair", "negative-int", "float", "str", "array"],
)
def test_an_accepted_frame_decodes_to_a_bounded_multiple_of_its_bytes(
    codec: Codec, item: Any
) -> None:
    # The bound follows from the caps: the frame's bytes, and about a hundred bytes of
    # Python objects per value. A 64 KiB frame of 65,000 empty arrays took 4.7 MB.
    import gc
    import tracemalloc

    limits = WireLimits()
    values = 2 if isinstance(item, dict | list) and item else 1
    frames = [
        _values_frame([item] * n, codec)
        # At the cap, and as many as 64 KiB holds (refused: nothing is held then).
        for n in (limits.max_items // values - 4, 65_000 // (len(enc(item, codec)) + 1))
    ]
    for frame in frames:
        raw = frame.encode() if isinstance(frame, str) else frame
        assert len(raw) <= limits.max_frame_bytes
        gc.collect()
        tracemalloc.start()
        try:
            result = decode_client_frame(frame, codec, limits)
            held = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        bound = 2 * len(raw) + 128 * limits.max_items
        assert held < bound, (len(raw), held, bound, type(result).__name__)


@BOTH
def test_frame_size_limit_is_inclusive(codec: Codec) -> None:
    at_limit = frame_of_size(65_536, codec)
    assert isinstance(decode_client_frame(at_limit, codec), ClientFrame)
    over = frame_of_size(65_537, codec)
    result = decode_client_frame(over, codec)
    assert isinstance(result, Rejection)
    assert result.code is ErrorCode.LIMIT_EXCEEDED
    assert_clean_message(result)
    # Configurable, and checked before anything else is looked at.
    small = decode_client_frame(frame_of_size(101, codec), codec, WireLimits(max_frame_bytes=100))
    assert isinstance(small, Rejection)
    assert small.code is ErrorCode.LIMIT_EXCEEDED
    junk = b"\xc1" * 65_537 if codec is M else "}" * 65_537
    assert decode_client_frame(junk, codec) == Rejection(
        ErrorCode.LIMIT_EXCEEDED, "frame is 65537 bytes; the limit is 65536"
    )


def test_text_frame_size_counts_utf8_bytes_not_characters() -> None:
    frame = '{"type":"a","content":"' + "\u00e9" * 32_800 + '"}'
    assert len(frame) < 65_536 < len(frame.encode())
    result = decode_client_frame(frame, J)
    assert isinstance(result, Rejection)
    assert result.code is ErrorCode.LIMIT_EXCEEDED


# --- Reserved types and control types --------------------------------------------------------


@BOTH
def test_wsbus_auth_is_accepted_only_when_allowed(codec: Codec) -> None:
    frame = enc({"type": "wsbus.auth", "content": {"token": "t"}}, codec)
    refused = decode_client_frame(frame, codec)
    assert isinstance(refused, Rejection)
    assert refused.code is ErrorCode.RESERVED_TYPE
    allowed = frozenset({"wsbus.auth"})
    assert decode_client_frame(frame, codec, allowed_control=allowed) == ClientFrame(
        "wsbus.auth", {"token": "t"}
    )
    # Allowing one control type allows no other.
    other = decode_client_frame(enc({"type": "wsbus.admin"}, codec), codec, allowed_control=allowed)
    assert isinstance(other, Rejection)
    assert other.code is ErrorCode.RESERVED_TYPE


@BOTH
@settings(max_examples=50)
@given(type_=wst.message_types(reserved=True))
def test_every_reserved_type_is_refused(codec: Codec, type_: str) -> None:
    result = decode_client_frame(enc({"type": type_}, codec), codec)
    assert isinstance(result, Rejection)
    assert result.code is ErrorCode.RESERVED_TYPE
    assert_clean_message(result)


def test_reserved_type_message_is_short_for_the_longest_type() -> None:
    result = decode_client_frame('{"type":"wsbus.' + "a" * 122 + '"}', J)
    assert isinstance(result, Rejection)
    assert result.code is ErrorCode.RESERVED_TYPE
    assert len(result.message) < 120


@pytest.mark.parametrize(
    "data",
    [
        pytest.param('{"type":"a","content":"\\ud83d\\ude00",}', id="pair-trailing-comma"),
        pytest.param('{"type":"a","content":"\\\\ud800",}', id="escaped-backslash"),
    ],
)
def test_invalid_json_without_a_lone_surrogate_is_malformed(data: str) -> None:
    result = decode_client_frame(data, J)
    assert isinstance(result, Rejection)
    assert result.code is ErrorCode.MALFORMED


# --- The ref of a rejection ------------------------------------------------------------------

REF_CASES = [
    pytest.param({"type": "a", "id": "abc", "sender": "x"}, id="unknown-field"),
    pytest.param({"type": "wsbus.x", "id": "abc"}, id="reserved-type"),
    pytest.param({"type": "bad type", "id": "abc"}, id="bad-type"),
    pytest.param({"id": "abc"}, id="missing-type"),
    pytest.param({"type": "a", "id": "abc", "reply_to": 5}, id="bad-reply_to"),
    pytest.param({"type": "a", "id": "abc", "content": 2**53}, id="huge-int"),
    pytest.param({"type": "a", "id": "abc", "content": nest(40)}, id="too-deep"),
]


@BOTH
@pytest.mark.parametrize("obj", REF_CASES)
@pytest.mark.parametrize("id_", ["abc", "x" * 64, "\u00e9\U0001f600 \n"])
def test_rejection_ref_is_the_valid_id(codec: Codec, obj: dict[str, Any], id_: str) -> None:
    result = decode_client_frame(enc({**obj, "id": id_}, codec), codec)
    assert isinstance(result, Rejection)
    assert result.ref == id_


@BOTH
@pytest.mark.parametrize("obj", REF_CASES)
@pytest.mark.parametrize("bad_id", ["", "x" * 65, 5, None, ["abc"], {"id": "abc"}])
def test_rejection_ref_is_none_for_an_invalid_id(
    codec: Codec, obj: dict[str, Any], bad_id: Any
) -> None:
    result = decode_client_frame(enc({**obj, "id": bad_id}, codec), codec)
    assert isinstance(result, Rejection)
    assert result.ref is None


def test_rejection_ref_of_duplicates_and_extensions() -> None:
    dup = decode_client_frame('{"type":"a","id":"abc","content":{"k":1,"k":2}}', J)
    assert dup == Rejection(ErrorCode.MALFORMED, "an object has a duplicate key", "abc")
    ext = decode_client_frame(b"\x83\xa4type\xa1a\xa2id\xa3abc\xa7content\xd4\x05\x00", M)
    assert isinstance(ext, Rejection)
    assert (ext.code, ext.ref) == (ErrorCode.BAD_VALUE, "abc")


@pytest.mark.parametrize(
    ("data", "codec"),
    [
        pytest.param('{"id":"abc","type":"a"', J, id="json-truncated"),
        pytest.param('{"id":"abc","type":"a",}', J, id="json-trailing-comma"),
        pytest.param('{"id":"abc","type":"a","content":NaN}', J, id="json-NaN"),
        pytest.param('[{"id":"abc","type":"a"}]', J, id="json-array"),
        pytest.param(b"\x82\xa2id\xa3abc\xa4type\xa1", M, id="msgpack-truncated"),
        pytest.param(b"\x82\xa2id\xa3abc\xa4type\xa1a\xc0", M, id="msgpack-trailing"),
        pytest.param(b"\x91\x82\xa2id\xa3abc\xa4type\xa1a", M, id="msgpack-array"),
    ],
)
def test_no_ref_when_the_frame_could_not_be_parsed(data: str | bytes, codec: Codec) -> None:
    result = decode_client_frame(data, codec)
    assert isinstance(result, Rejection)
    assert result.code is ErrorCode.MALFORMED
    assert result.ref is None


# Every value fault, in both codecs, with the id before and after it: (JSON content, the
# same content in MessagePack bytes, code). Each needs a frame that msgspec cannot decode,
# or one it decodes and wsbus refuses.
_MP_BAD_UTF8 = [b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"a\xf8\x88\x80\x80\x80"]
REF_EVERY_CODE = [
    pytest.param('"\\ud800"', None, ErrorCode.BAD_VALUE, id="lone-surrogate"),
    pytest.param('{"\\udc00":1}', None, ErrorCode.BAD_VALUE, id="lone-surrogate-key"),
    pytest.param("1E400", b"\xcb\x7f\xf0" + b"\x00" * 6, ErrorCode.BAD_VALUE, id="inf"),
    pytest.param("[-1e999]", b"\x91\xcb\x7f\xf8" + b"\x00" * 6, ErrorCode.BAD_VALUE, id="nan"),
    pytest.param("9" * 5000, b"\xcf" + b"\xff" * 8, ErrorCode.BAD_VALUE, id="huge-int"),
    pytest.param(None, b"\xd4\x05\x00", ErrorCode.BAD_VALUE, id="ext"),
    pytest.param(None, b"\xd6\xff\x00\x00\x00\x01", ErrorCode.BAD_VALUE, id="timestamp"),
    pytest.param(
        "[" * 40 + "]" * 40, b"\x91" * 39 + b"\x90", ErrorCode.LIMIT_EXCEEDED, id="depth-40"
    ),
    pytest.param(
        "[" * 20000 + "]" * 20000,
        b"\x91" * 19999 + b"\x90",
        ErrorCode.LIMIT_EXCEEDED,
        id="depth-20000",
    ),
    pytest.param('{"k":1,"k":2}', b"\x82\xa1k\x01\xa1k\x02", ErrorCode.MALFORMED, id="duplicate"),
    pytest.param(None, b"\x81\x01\x02", ErrorCode.INVALID_MESSAGE, id="int-key"),
    pytest.param(None, b"\x81\x80\x02", ErrorCode.INVALID_MESSAGE, id="map-key"),
    *(
        pytest.param(
            None,
            bytes([0xA0 + len(bad)]) + bad,
            ErrorCode.BAD_VALUE,
            id=f"bad-utf8-value-{bad.hex()}",
        )
        for bad in _MP_BAD_UTF8
    ),
    *(
        pytest.param(
            None,
            b"\x81" + bytes([0xA0 + len(bad)]) + bad + b"\x01",
            ErrorCode.BAD_VALUE,
            id=f"bad-utf8-key-{bad.hex()}",
        )
        for bad in _MP_BAD_UTF8
    ),
    *(
        pytest.param(
            None,
            b"\x91\xd9" + bytes([len(bad)]) + bad,
            ErrorCode.BAD_VALUE,
            id=f"bad-utf8-str8-{bad.hex()}",
        )
        for bad in _MP_BAD_UTF8
    ),
]


def _json_with_id(content: str, id_first: bool) -> str:
    if id_first:
        return '{"id":"abc","type":"a","content":' + content + "}"
    return '{"type":"a","content":' + content + ',"id":"abc"}'


def _msgpack_with_id(content: bytes, id_first: bool) -> bytes:
    if id_first:
        return b"\x83\xa2id\xa3abc\xa4type\xa1a\xa7content" + content
    return b"\x83\xa4type\xa1a\xa7content" + content + b"\xa2id\xa3abc"


@pytest.mark.parametrize("id_first", [True, False], ids=["id-first", "id-last"])
@pytest.mark.parametrize(("json_content", "msgpack_content", "code"), REF_EVERY_CODE)
def test_every_refusal_of_a_frame_with_a_valid_id_carries_its_ref(
    json_content: str | None, msgpack_content: bytes | None, code: ErrorCode, id_first: bool
) -> None:
    frames: list[tuple[str | bytes, Codec]] = []
    if json_content is not None:
        text = _json_with_id(json_content, id_first)
        frames += [(text, J), (text.encode("utf-8", "surrogatepass"), J)]
    if msgpack_content is not None:
        frames.append((_msgpack_with_id(msgpack_content, id_first), M))
    for data, codec in frames:
        result = decode_client_frame(data, codec)
        assert isinstance(result, Rejection), (data, result)
        assert (result.code, result.ref) == (code, "abc"), (codec, result)
        assert_clean_message(result)


def test_a_surrogate_in_the_text_itself_keeps_the_ref() -> None:
    text = '{"id":"abc","type":"a","content":"\ud800"}'  # the character, not an escape
    assert decode_client_frame(text, J) == Rejection(
        ErrorCode.BAD_VALUE, "text contains a lone UTF-16 surrogate", "abc"
    )
    in_the_id = '{"id":"ab\ud800","type":"a"}'
    assert decode_client_frame(in_the_id, J).ref is None  # type: ignore[union-attr]


@pytest.mark.parametrize("bad", _MP_BAD_UTF8, ids=[b.hex() for b in _MP_BAD_UTF8])
def test_invalid_utf8_in_a_msgpack_id_is_refused_without_a_ref(bad: bytes) -> None:
    data = b"\x82\xa4type\xa1a\xa2id" + bytes([0xA0 + len(bad)]) + bad
    assert decode_client_frame(data, M) == Rejection(
        ErrorCode.BAD_VALUE, "a string is not valid UTF-8"
    )


def test_invalid_utf8_in_json_bytes_is_malformed_with_the_ref() -> None:
    result = decode_client_frame(b'{"id":"abc","type":"a","content":"\xff"}', J)
    assert (result.code, result.ref) == (ErrorCode.MALFORMED, "abc")  # type: ignore[union-attr]
    bad_id = decode_client_frame(b'{"id":"ab\xff","type":"a"}', J)
    assert (bad_id.code, bad_id.ref) == (ErrorCode.MALFORMED, None)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("data", "codec"),
    [
        pytest.param('{"id":"\\ud800","type":"a","content":1E400}', J, id="json-surrogate-id"),
        pytest.param('{"id":"","type":"a","content":1E400}', J, id="json-empty-id"),
        pytest.param('{"id":5,"type":"a","content":' + "[" * 50 + "]" * 50 + "}", J, id="json"),
        pytest.param(b"\x82\xa2id\x05\xa7content" + b"\x91" * 50 + b"\x90", M, id="msgpack-int"),
    ],
)
def test_an_invalid_id_is_never_echoed(data: str | bytes, codec: Codec) -> None:
    result = decode_client_frame(data, codec)
    assert isinstance(result, Rejection)
    assert result.code is not ErrorCode.MALFORMED
    assert result.ref is None


@pytest.mark.parametrize(
    ("data", "codec", "ref"),
    [
        pytest.param('{"type":"a","id":"r1","content":[1,2]}', J, "r1", id="json"),
        pytest.param('{"id":"r1","x":' + "[" * 100 + "]" * 100 + "}", J, "r1", id="json-deep"),
        pytest.param('{"id":"r1","content":"\\ud800"}', J, None, id="json-bad-string-skipped"),
        pytest.param('{"id":"\\ud800"}', J, None, id="json-surrogate-id"),
        pytest.param('{"id":5}', J, None, id="json-int-id"),
        pytest.param('{"id":""}', J, None, id="json-empty-id"),
        pytest.param('{"id":"' + "x" * 65 + '"}', J, None, id="json-long-id"),
        pytest.param('[{"id":"r1"}]', J, None, id="json-array"),
        pytest.param("not json", J, None, id="json-junk"),
        pytest.param(b"\x82\xa2id\xa2r1\xa1x\x90", M, "r1", id="msgpack"),
        pytest.param(b"\x81\xa2id\xa2\xff\xfe", M, None, id="msgpack-bad-utf8"),
        pytest.param(b"\x81\xa2id\xc4\x02r1", M, None, id="msgpack-bin-id"),
        pytest.param(b"\xc1", M, None, id="msgpack-junk"),
    ],
)
def test_frame_id_reads_only_the_id(data: str | bytes, codec: Codec, ref: str | None) -> None:
    from wsbus.wire import frame_id

    assert frame_id(data, codec) == ref


# --- Codec negotiation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offered", "codec"),
    [
        ([], J),
        (["wsbus.v1.msgpack"], M),
        (["wsbus.v1.json"], J),
        (["x", "wsbus.v1.json"], J),
        (["wsbus.v1.msgpack", "wsbus.v1.json"], M),
        (["wsbus.v1.json", "wsbus.v1.msgpack"], J),
        (["x"], None),
        (["x", "wsbus.v2.json", "WSBUS.V1.JSON"], None),
    ],
)
def test_negotiate(offered: list[str], codec: Codec | None) -> None:
    assert negotiate(offered) is codec


def test_codec_kinds() -> None:
    assert J.is_text
    assert not M.is_text
    assert J == "wsbus.v1.json"
    assert M == "wsbus.v1.msgpack"


# --- Server frames ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        pytest.param(
            ServerFrame("t", None, "i"), {"type": "t", "content": None, "id": "i"}, id="minimal"
        ),
        pytest.param(
            ServerFrame("t", [1], "i", reply_to="r"),
            {"type": "t", "content": [1], "id": "i", "reply_to": "r"},
            id="reply_to",
        ),
        pytest.param(
            ServerFrame("t", {"a": 1}, "i", from_="chat"),
            {"type": "t", "content": {"a": 1}, "id": "i", "from": "chat"},
            id="from",
        ),
        pytest.param(
            ServerFrame("t", "c", "i", reply_to="r", from_="chat"),
            {"type": "t", "content": "c", "id": "i", "reply_to": "r", "from": "chat"},
            id="both",
        ),
    ],
)
def test_server_frame_keys(frame: ServerFrame, expected: dict[str, Any]) -> None:
    data = encode_server_frame(frame, J)
    data.decode("utf-8")  # a text frame
    decoded = msgspec.json.decode(data)
    assert decoded == expected
    assert list(decoded) == list(expected)
    assert "from_" not in decoded
    assert msgspec.msgpack.decode(encode_server_frame(frame, M)) == expected


@BOTH
@settings(max_examples=100)
@given(
    type_=wst.message_types() | wst.message_types(reserved=True),
    content=wst.json_values(),
    id_=ids,
    reply_to=st.none() | ids,
    from_=st.none() | wst.names(),
)
def test_server_frames_round_trip(
    codec: Codec, type_: str, content: Any, id_: str, reply_to: str | None, from_: str | None
) -> None:
    frame = ServerFrame(type_, content, id_, reply_to, from_)
    data = encode_server_frame(frame, codec)
    if codec is J:
        assert msgspec.json.decode(data, type=ServerFrame) == frame
    else:
        assert msgspec.msgpack.decode(data, type=ServerFrame) == frame
    keys = set(plain_decode(data, codec))
    assert keys == {"type", "content", "id"} | {
        name for name, value in (("reply_to", reply_to), ("from", from_)) if value is not None
    }


def test_a_long_run_of_backslashes_is_refused_quickly() -> None:
    # It used to take seconds (a backtracking regular expression); it must stay linear.
    for text in ("\\" * 65_000, '{"type":"x","content":"' + "\\" * 65_000):
        rejection = decode_client_frame(text, Codec.JSON)
        assert isinstance(rejection, Rejection)
        assert rejection.code == "malformed"


@settings(max_examples=600, deadline=None)
@given(
    frame=st.one_of(wst.client_frames(codec=Codec.JSON), wst.adversarial_frames(codec=Codec.JSON)),
    limits=st.sampled_from(
        [
            WireLimits(),
            WireLimits(max_items=3),
            WireLimits(max_items=5),
            WireLimits(max_items=12),
            WireLimits(max_depth=1),
            WireLimits(max_depth=2, max_integer=100),
            WireLimits(max_frame_bytes=60),
        ]
    ),
)
def test_the_fast_path_accepts_only_what_the_full_path_accepts(
    frame: str | bytes, limits: WireLimits
) -> None:
    from wsbus.wire import _decode, _Reject

    fast = decode_client_frame(frame, Codec.JSON, limits)
    try:
        full: ClientFrame | Rejection = _decode(frame, Codec.JSON, limits, frozenset())
    except _Reject as exc:
        full = exc.rejection
    assert fast == full
    # The decoder the gateway's sessions use, built once per codec, gives the same.
    assert frame_decoder(Codec.JSON, limits)(frame) == full


def _edge_scalars(bound: int) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.none(),
        st.booleans(),
        st.sampled_from([bound, bound + 1, -bound, -bound - 1, 0, 2**64, -(2**63) - 1]),
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=8),
    )


@st.composite
def _flat_frames(draw: st.DrawFn) -> str:
    """JSON frames near the flat path's edges: caps, ids, nulls, duplicate keys."""
    bound = draw(st.sampled_from([100, 2**53 - 1, 2**63 - 1, 2**64]))
    pairs: list[tuple[str, Any]] = [("type", draw(st.sampled_from(["t.x", "wsbus.x", "1x"])))]
    if draw(st.booleans()):
        content = draw(
            st.one_of(
                _edge_scalars(bound),
                st.lists(st.tuples(st.sampled_from("abcd"), _edge_scalars(bound)), max_size=7),
            )
        )
        if isinstance(content, list):
            body = ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in content)
            pairs.append(("content", msgspec.Raw(("{" + body + "}").encode())))
        else:
            pairs.append(("content", content))
    for field in ("id", "reply_to"):
        if draw(st.booleans()):
            pairs.append((field, draw(st.sampled_from([None, "", "a", "b" * 64, "c" * 65, 1]))))
    if draw(st.booleans()):
        pairs.append(draw(st.sampled_from([("type", "t.y"), ("id", "z"), ("extra", 1)])))
    order = draw(st.permutations(pairs))
    return (
        "{" + ",".join(f"{json.dumps(k)}:{msgspec.json.encode(v).decode()}" for k, v in order) + "}"
    )


@settings(max_examples=1500, deadline=None)
@given(
    frame=_flat_frames(),
    limits=st.sampled_from(
        [
            WireLimits(),
            WireLimits(max_integer=100),
            WireLimits(max_items=5),
            WireLimits(max_items=7, max_integer=100),
            WireLimits(max_depth=2),
            # Past int64: msgspec's constraints cannot hold it, the Python checks do.
            WireLimits(max_integer=2**64),
            WireLimits(max_integer=2**63 - 1),
        ]
    ),
)
def test_the_flat_path_accepts_only_what_the_full_path_accepts(
    frame: str, limits: WireLimits
) -> None:
    # The flat path checks its caps in C (msgspec constraints): integers at and past the
    # bound, ids at and past 64 characters, explicit nulls, duplicate keys, content at
    # and past the item cap must all come out as the full path says.
    from wsbus.wire import _decode, _Reject

    try:
        full: ClientFrame | Rejection = _decode(frame, Codec.JSON, limits, frozenset())
    except _Reject as exc:
        full = exc.rejection
    assert frame_decoder(Codec.JSON, limits)(frame) == full
    assert frame_decoder(Codec.JSON, limits)(frame.encode()) == full


@settings(max_examples=600, deadline=None)
@given(
    frame=st.one_of(
        wst.client_frames(codec=Codec.MSGPACK),
        wst.adversarial_frames(codec=Codec.MSGPACK),
        wst.noncanonical_msgpack(),
    ),
    limits=st.sampled_from(
        [
            WireLimits(),
            WireLimits(max_depth=2, max_integer=100),
            WireLimits(max_items=3),
            WireLimits(max_items=12),
        ]
    ),
)
def test_the_msgpack_fast_path_accepts_only_what_the_full_path_accepts(
    frame: str | bytes, limits: WireLimits
) -> None:
    from wsbus.wire import _decode, _Reject

    fast = decode_client_frame(frame, Codec.MSGPACK, limits)
    try:
        full: ClientFrame | Rejection = _decode(frame, Codec.MSGPACK, limits, frozenset())
    except _Reject as exc:
        full = exc.rejection
    assert fast == full
    # The decoder the gateway's sessions use, built once per codec, gives the same.
    assert frame_decoder(Codec.MSGPACK, limits)(frame) == full


@settings(max_examples=300, deadline=None)
@given(frame=wst.noncanonical_msgpack())
def test_noncanonical_msgpack_is_read_like_canonical(frame: bytes) -> None:
    written = msgspec.msgpack.decode(frame)
    result = decode_client_frame(frame, M)
    if isinstance(result, Rejection):
        # Only a key written twice is refused: msgspec kept one of the two.
        assert result == Rejection(
            ErrorCode.MALFORMED, "an object has a duplicate key", result.ref
        ), result
    else:
        assert result == ClientFrame(
            written["type"], written.get("content"), written.get("id"), written.get("reply_to")
        )


def _reference_pairs(raw: bytes) -> int:
    """Map entries declared in valid MessagePack, one header at a time: the slow oracle."""
    pairs, pos = 0, 0
    while pos < len(raw):
        b = raw[pos]
        if 0x80 <= b <= 0x8F:
            pairs += b & 0x0F
        if b < 0xA0:
            pos += 1
        elif 0xA0 <= b <= 0xBF:
            pos += 1 + (b & 0x1F)
        elif b >= 0xE0 or b in (0xC0, 0xC2, 0xC3):
            pos += 1
        elif b in (0xC4, 0xC5, 0xC6, 0xD9, 0xDA, 0xDB):
            width = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}[b]
            pos += 1 + width + int.from_bytes(raw[pos + 1 : pos + 1 + width], "big")
        elif b in (0xDE, 0xDF):
            width = 2 if b == 0xDE else 4
            pairs += int.from_bytes(raw[pos + 1 : pos + 1 + width], "big")
            pos += 1 + width
        elif b in (0xDC, 0xDD):
            pos += 3 if b == 0xDC else 5
        elif b in (0xCA, 0xCB, 0xCC, 0xCD, 0xCE, 0xCF, 0xD0, 0xD1, 0xD2, 0xD3):
            pos += {0xCA: 5, 0xCB: 9, 0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9}.get(b, 0) or {
                0xD0: 2,
                0xD1: 3,
                0xD2: 5,
                0xD3: 9,
            }[b]
        else:
            return -1  # an extension type
    return pairs


@settings(max_examples=400, deadline=None)
@given(frame=st.one_of(wst.noncanonical_msgpack(), wst.client_frames(codec=Codec.MSGPACK)))
def test_msgpack_pairs_are_counted_like_one_header_at_a_time(frame: str | bytes) -> None:
    from wsbus.wire import _msgpack_pairs

    assert isinstance(frame, bytes)
    assert _msgpack_pairs(frame) == _reference_pairs(frame)


@pytest.mark.parametrize(
    "content",
    [
        b"\xdc\x00\x03\x81\xa0\xcc\x81\x82\xa0\x01\xa1a\x8f\x80",  # 0x81 inside a uint8
        b"\x92\xa2\x81\x82\x81\xa0\x00",  # map-like bytes inside a string
        b"\x92\xd9\x02\x81\x82\x81\xa0\x00",  # and inside a str8
        b"\x91\xde\x00\x01\xa0\x00",
    ],
)
def test_msgpack_pairs_ignore_map_bytes_inside_values(content: bytes) -> None:
    from wsbus.wire import _msgpack_pairs

    frame = MSGPACK_HEAD + content
    assert _msgpack_pairs(frame) == _reference_pairs(frame)


_SMALL = WireLimits(max_frame_bytes=64, max_integer=1000)


@pytest.mark.parametrize(
    "frame",
    [
        '{"type":"a","content":{"n":1000,"s":"x"}}',
        '{"type":"a","content":{"n":1001,"s":"x"}}',
        '{"type":"a","content":{"n":-1001}}',
        '{"type":"a","content":{"n":1,"deep":{"m":1001}}}',
        '{"type":"a","content":{"n":1,"deep":[1,{"m":2}]}}',
        '{"type":"a","content":{"f":1.5,"b":true,"z":null}}',
        '{"type":"a","content":{"n":1,"n":2}}',
        '{"type":"a","content":{"s":"a:b","n":1,"n":2}}',
        '{"type":"a","content":"\ud800"}',
        '{"type":"a","content":"' + "é" * 20 + '"}',  # 40 bytes of text: fits
        '{"type":"a","content":"' + "é" * 30 + '"}',  # 30 characters, 60 bytes: too big
        '{"type":"wsbus.x"}',
        '{"type":"a b"}',
    ],
)
@pytest.mark.parametrize(
    "limits",
    [
        _SMALL,
        WireLimits(max_depth=1),
        WireLimits(max_depth=2),
        WireLimits(max_items=2),
        WireLimits(max_items=3),
        WireLimits(max_items=4),
    ],
)
def test_the_fast_path_agrees_with_the_full_path_on_edge_cases(
    frame: str, limits: WireLimits
) -> None:
    from wsbus.wire import _decode, _Reject

    for data in (frame, frame.encode("utf-8", "surrogatepass")):
        fast = decode_client_frame(data, Codec.JSON, limits)
        try:
            full: ClientFrame | Rejection = _decode(data, Codec.JSON, limits, frozenset())
        except _Reject as exc:
            full = exc.rejection
        assert fast == full


def test_per_message_objects_stay_out_of_the_cycle_collector() -> None:
    # A tracked object per message brings a collection every few hundred messages; under
    # load with many connections that was a fifth of the gateway's time.
    import gc

    from wsbus.envelope import ClientAddress, ConnId, Envelope, EnvelopeId, Recipients

    frame = decode_client_frame('{"type":"a","content":{"n":1,"s":"x"}}', Codec.JSON)
    assert isinstance(frame, ClientFrame)
    sender = ClientAddress(ConnId("n.1"))
    envelope = Envelope(EnvelopeId("1"), frame.type, sender, frame.content)
    to = Recipients(conn_ids=(ConnId("n.1"),))
    for value in (frame, sender, envelope, to, frame.content):
        assert not gc.is_tracked(value), value


# --- What validation costs ---------------------------------------------------------------

_COST_HEAD_J = '{"type":"x","id":"k1","content":'
_COST_HEAD_M = b"\x83\xa4type\xa1x\xa2id\xa2k1\xa7content"


def _json_array_frame(item: str) -> str:
    n = (65_536 - len(_COST_HEAD_J) - 3) // (len(item) + 1)
    return _COST_HEAD_J + "[" + ",".join([item] * n) + "]}"


def _msgpack_array_frame(item: bytes, tail: bytes = b"") -> bytes:
    n = (65_536 - len(_COST_HEAD_M) - 5 - len(tail)) // len(item)
    count = n + 1 if tail else n
    return _COST_HEAD_M + b"\xdc" + count.to_bytes(2, "big") + item * n + tail


# Frames of at most 64 KiB that maximize some kind of work per byte.
WORST_CASES = [
    pytest.param(_json_array_frame("[]"), J, id="json-empty-arrays"),
    pytest.param(_json_array_frame("{}"), J, id="json-empty-objects"),
    pytest.param(_json_array_frame('{"":0}'), J, id="json-one-pair-objects"),
    pytest.param(_json_array_frame("1"), J, id="json-tiny-ints"),
    pytest.param(_json_array_frame("[" * 30 + "]" * 30), J, id="json-deep"),
    pytest.param(_msgpack_array_frame(b"\x90"), M, id="msgpack-empty-arrays"),
    pytest.param(_msgpack_array_frame(b"\x80"), M, id="msgpack-empty-maps"),
    pytest.param(_msgpack_array_frame(b"\x81\xa0\x00"), M, id="msgpack-one-pair-maps"),
    pytest.param(_msgpack_array_frame(b"\x01"), M, id="msgpack-tiny-ints"),
    pytest.param(_msgpack_array_frame(b"\xcc\x01"), M, id="msgpack-non-canonical-ints"),
    pytest.param(_msgpack_array_frame(b"\x81\xa0\xcc\x00"), M, id="msgpack-non-canonical-maps"),
    pytest.param(_msgpack_array_frame(b"\x91" * 29 + b"\x90"), M, id="msgpack-deep"),
]


def _best_time(fn: Any, repeat: int = 7) -> float:
    import gc
    import time

    best = float("inf")
    for _ in range(repeat):
        gc.disable()  # the control decodes with the collector paused, as the gateway does
        try:
            # CPU time of this thread: a run preempted by other work on a busy machine is
            # not charged for the time it waited (wall time failed the ratio under load).
            start = time.thread_time()
            fn()
            best = min(best, time.thread_time() - start)
        finally:
            gc.enable()
    return best


def _assert_costs_a_small_multiple_of_decoding(
    frame: str | bytes, codec: Codec, limits: WireLimits
) -> None:
    raw = frame.encode() if isinstance(frame, str) else frame
    plain = msgspec.json.Decoder() if codec is J else msgspec.msgpack.Decoder()

    def control_decode() -> None:
        # A refused frame: msgspec read up to its fault (whatever it raises), still the floor.
        with contextlib.suppress(Exception):
            plain.decode(raw)

    control = validation = float("inf")
    for _ in range(3):  # interleaved, so that a busy moment hits both
        control = min(control, _best_time(control_decode))
        validation = min(validation, _best_time(lambda: decode_client_frame(frame, codec, limits)))
    assert validation < 15 * control, (validation, control)


# The item cap raised out of the way: what the level checks cost on their own.
_NO_ITEM_CAP = WireLimits(max_items=1 << 20)


@pytest.mark.parametrize(("frame", "codec"), WORST_CASES)
def test_validation_costs_a_small_multiple_of_decoding(frame: str | bytes, codec: Codec) -> None:
    # The control is msgspec decoding the same bytes with no checks: the gateway needs the
    # decoded content anyway, so that is the floor. A Python step per value or per
    # container (the walk this replaced) cost 13-35 times it on four of these frames.
    raw = frame.encode() if isinstance(frame, str) else frame
    assert len(raw) <= 65_536
    result = decode_client_frame(frame, codec, _NO_ITEM_CAP)
    assert isinstance(result, ClientFrame), result
    _assert_costs_a_small_multiple_of_decoding(frame, codec, _NO_ITEM_CAP)


@pytest.mark.parametrize(("frame", "codec"), WORST_CASES)
def test_the_item_cap_refuses_the_worst_frames_at_a_small_multiple_of_decoding(
    frame: str | bytes, codec: Codec
) -> None:
    result = decode_client_frame(frame, codec)
    assert isinstance(result, Rejection)
    assert (result.code, result.ref) == (ErrorCode.LIMIT_EXCEEDED, "k1")
    _assert_costs_a_small_multiple_of_decoding(frame, codec, WireLimits())


# MessagePack frames msgspec refuses, shaped to maximize the work of finding out why:
# 64 KiB of small items and a fault at the very end.
REFUSED_WORST_CASES = [
    pytest.param(_msgpack_array_frame(item, tail), id=f"{name}-{fault}")
    for name, item in [
        ("empty-arrays", b"\x90"),
        ("one-item-arrays", b"\x91\x90"),
        ("one-zero-arrays", b"\x91\x00"),
        ("one-pair-maps", b"\x81\xa0\x00"),
        ("empty-strings", b"\xa0"),
        ("short-strings", b"\xa1a"),
        ("tiny-ints", b"\x01"),
        ("non-canonical-ints", b"\xcc\x01"),
        ("non-canonical-maps", b"\x81\xa0\xcc\x00"),
        ("deep", b"\x91" * 29 + b"\x90"),
    ]
    for fault, tail in [("bad-utf8", b"\xa1\xff"), ("bad-byte", b"\xc1"), ("cut", b"\x92")]
]


@pytest.mark.parametrize("frame", REFUSED_WORST_CASES)
def test_refused_msgpack_costs_a_small_multiple_of_decoding(frame: bytes) -> None:
    # Each was classified by a Python step per item: 20-70 times msgspec's decode (40-78
    # ms a frame), in a loop any connection could hold 20 times before its 4400 close.
    result = decode_client_frame(frame, M)
    assert isinstance(result, Rejection)
    assert result.code in (ErrorCode.LIMIT_EXCEEDED, ErrorCode.MALFORMED), result
    _assert_costs_a_small_multiple_of_decoding(frame, M, WireLimits())


# --- The refused-MessagePack walk against the walk it replaced ---------------------------

# Complete items, one each: what the runs skip, what they stop at, and faults.
_MP_SNIPPETS = [
    b"\x00",
    b"\x7f",
    b"\xe0",
    b"\xc0",
    b"\xc2",
    b"\xc3",
    b"\x80",
    b"\x90",
    b"\xa0",
    b"\xa1a",
    b"\xa2ab",
    b"\xa2\xc3\xa9",
    b"\xa1\xff",
    b"\xa2\xc3(",
    b"\xa1\xc3",
    b"\xa3\xed\xa0\x80",
    b"\xcc\x01",
    b"\xcd\x00\x01",
    b"\xca\x3f\xc0\x00\x00",
    b"\xcb" + bytes(8),
    b"\xd0\xff",
    b"\x91\x00",
    b"\x91\x90",
    b"\x91\x91\x91\x90",
    b"\x92\x00\xa1a",
    b"\x81\xa0\x00",
    b"\x81\xa1k\x90",
    b"\x82\xa0\x00\xa0\x80",
    b"\x81\x00\x00",
    b"\x81\x90\x00",
    b"\x81\xa1\xff\x00",
    b"\x81\xa0\xcc\x00",
    b"\xd9\x02ab",
    b"\xd9\x01\xff",
    b"\xc4\x01\xff",
    b"\xdc\x00\x01\x00",
    b"\xde\x00\x01\xa0\x00",
    b"\xd4\x01\x00",
    b"\x91" * 40 + b"\x90",
    b"\x91" * 5 + b"\x92\x00" + b"\x91" * 5 + b"\x90",
]


@st.composite
def _refused_msgpack(draw: st.DrawFn) -> bytes:
    items = draw(st.lists(st.sampled_from(_MP_SNIPPETS), max_size=40))
    count = len(items)
    if draw(st.booleans()):
        # A long run of one snippet, as the attacks send.
        repeat = draw(st.integers(1, 60))
        items = [draw(st.sampled_from(_MP_SNIPPETS)) * repeat, *items]
        count += repeat
    content = b"\xdc" + count.to_bytes(2, "big") + b"".join(items)
    ids = draw(st.sampled_from([b"", b"\xa2id\xa1q", b"\xa2id\x91\x91\x90"]))
    first = draw(st.booleans())
    head = bytes([0x82 + (1 if ids else 0)]) + b"\xa4type\xa1a"
    frame = head + (ids if first else b"") + b"\xa7content" + content + (b"" if first else ids)
    cut = draw(st.sampled_from(["none", "none", "none", "byte", "cut", "trailing"]))
    if cut == "byte":
        frame += b"\xc1"
    elif cut == "cut":
        frame = frame[: draw(st.integers(1, len(frame) - 1))]
    elif cut == "trailing":
        frame += b"\x00"
    return frame


@settings(max_examples=500, deadline=None)
@given(frame=_refused_msgpack(), max_depth=st.sampled_from([2, 4, 32]))
def test_the_refused_msgpack_walk_agrees_with_one_item_at_a_time(
    frame: bytes, max_depth: int
) -> None:
    # The runs skip many items at a time and stop before a fault: the answer must be the
    # walk's that took one item a step (the cap raised out of the way).
    from wsbus.wire import _classify_msgpack

    limits = WireLimits(max_depth=max_depth, max_items=1 << 20)
    assert _classify_msgpack(frame, limits) == _reference_classify(frame, max_depth)


def _reference_classify(raw: bytes, max_depth: int) -> tuple[ErrorCode, str, str | None]:
    """The walk before the runs and the item cap, one item at a time: the oracle."""
    end = len(raw)
    pos = 0
    # Per open container: [items left, True for a map, items seen].
    stack: list[list[Any]] = []
    fault: tuple[ErrorCode, str] | None = None
    has_ext = False
    ref: str | None = None
    top_key: str | None = None  # the top-level map's key whose value comes next
    while True:
        if pos >= end:
            return ErrorCode.MALFORMED, "frame is not valid MessagePack", None
        b = raw[pos]
        is_key = False
        at_top = False
        if stack:
            top = stack[-1]
            is_key = top[1] and top[2] % 2 == 0
            at_top = len(stack) == 1 and top[1]
            top[2] += 1
        text: str | None = None
        count = 0  # items in a container that opens here
        if b <= 0x7F or b >= 0xE0 or b in (0xC0, 0xC2, 0xC3):
            size = 1
            kind = "scalar"
        elif b <= 0x8F:
            size, kind, count = 1, "map", 2 * (b & 0x0F)
        elif b <= 0x9F:
            size, kind, count = 1, "array", b & 0x0F
        elif b <= 0xBF or b in wire._MSGPACK_SIZED:
            if b <= 0xBF:
                head, length = 1, b & 0x1F
            else:
                width = wire._MSGPACK_SIZED[b]
                head = 1 + width
                if pos + head > end:
                    return ErrorCode.MALFORMED, "frame is not valid MessagePack", None
                length = int.from_bytes(raw[pos + 1 : pos + head], "big")
            size = head + length
            if pos + size > end:
                return ErrorCode.MALFORMED, "frame is not valid MessagePack", None
            if b in (0xC4, 0xC5, 0xC6):
                kind = "bytes"
            else:
                kind = "str"
                try:
                    text = raw[pos + head : pos + size].decode("utf-8")
                except UnicodeDecodeError:
                    if fault is None:
                        fault = (ErrorCode.BAD_VALUE, "a string is not valid UTF-8")
        elif b in wire._MSGPACK_FIXED:
            size, kind = wire._MSGPACK_FIXED[b], "scalar"
        elif b in (0xDC, 0xDD, 0xDE, 0xDF):
            width = 2 if b in (0xDC, 0xDE) else 4
            size = 1 + width
            if pos + size > end:
                return ErrorCode.MALFORMED, "frame is not valid MessagePack", None
            count = int.from_bytes(raw[pos + 1 : pos + size], "big")
            kind = "array" if b <= 0xDD else "map"
            if kind == "map":
                count *= 2
        elif b in wire._MSGPACK_EXT:
            fixed = wire._MSGPACK_EXT[b]
            if fixed:
                size = fixed
            else:
                width = {0xC7: 1, 0xC8: 2, 0xC9: 4}[b]
                if pos + 1 + width > end:
                    return ErrorCode.MALFORMED, "frame is not valid MessagePack", None
                size = 2 + width + int.from_bytes(raw[pos + 1 : pos + 1 + width], "big")
            kind = "ext"
            has_ext = True
        else:  # 0xC1, never used
            return ErrorCode.MALFORMED, "frame is not valid MessagePack", None
        if pos + size > end:
            return ErrorCode.MALFORMED, "frame is not valid MessagePack", None
        pos += size
        if is_key and kind != "str" and fault is None:
            fault = (ErrorCode.INVALID_MESSAGE, "object keys must be strings")
        if at_top:
            if is_key:
                top_key = text
            elif top_key == "id":
                # The last id wins, as when the frame decodes; never echo an invalid one.
                ref = text if text is not None and 0 < len(text) <= wire._MAX_ID_LEN else None
        if kind == "map" or kind == "array":
            if not stack and kind != "map":
                return wire._NOT_A_MAP
            if len(stack) + 1 > max_depth and fault is None:
                fault = (ErrorCode.LIMIT_EXCEEDED, f"nesting deeper than {max_depth}")
            if count:
                stack.append([count, kind == "map", 0])
                continue
        elif not stack:
            return wire._NOT_A_MAP
        while stack and stack[-1][2] == stack[-1][0]:
            stack.pop()
        if not stack:
            break
    if pos != end:
        return ErrorCode.MALFORMED, "frame is not valid MessagePack", None
    if has_ext:
        return ErrorCode.BAD_VALUE, wire._EXT_MESSAGE, ref
    if fault is not None:
        return fault[0], fault[1], ref
    return ErrorCode.MALFORMED, "frame is not valid MessagePack", ref


@pytest.mark.parametrize("codec", list(Codec))
def test_the_built_decoder_agrees_on_large_frames_and_control_types(codec: Codec) -> None:
    big = {"type": "x", "id": "k", "content": ["y" * 100] * 60}
    reserved = {"type": "wsbus.auth", "content": {"token": "t"}}
    for value in (big, reserved, {"type": "x", "content": [[[[[[[[[[1]]]]]]]]]]}):
        data: str | bytes = (
            msgspec.json.encode(value).decode() if codec.is_text else msgspec.msgpack.encode(value)
        )
        assert frame_decoder(codec)(data) == decode_client_frame(data, codec)
    assert frame_decoder(codec, WireLimits()) is frame_decoder(codec, WireLimits())  # cached
