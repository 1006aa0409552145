"""The client wire protocol, v1: frames, codecs and strict validation.

Everything here is pure: bytes in, a :class:`ClientFrame` or a :class:`Rejection` out.
:func:`decode_client_frame` never raises, whatever the bytes; that is what lets the gateway
answer every bad frame with an error code and keep the connection open.

Two codecs share one data model (JSON's): ``wsbus.v1.json`` in text frames and
``wsbus.v1.msgpack`` in binary frames. A client frame is one object with exactly the keys
``type``, ``content``, ``id`` and ``reply_to``; see ``docs/protocol.md``.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Sequence
from typing import Any, Final

import msgspec

__all__ = [
    "CLIENT_CONTROL_TYPES",
    "ClientFrame",
    "Codec",
    "ErrorCode",
    "Rejection",
    "ServerFrame",
    "WireLimits",
    "decode_client_frame",
    "encode_server_frame",
    "negotiate",
]


class Codec(enum.StrEnum):
    """A wire codec, named by its WebSocket subprotocol."""

    JSON = "wsbus.v1.json"
    MSGPACK = "wsbus.v1.msgpack"

    @property
    def is_text(self) -> bool:
        """True when frames of this codec travel as WebSocket text frames."""
        return self is Codec.JSON


def negotiate(offered: Sequence[str]) -> Codec | None:
    """Pick the codec for a handshake from the subprotocols a client offered.

    A client that offers none gets JSON; the first known one offered wins; a client that
    offers only unknown ones gets ``None`` and must be refused at the handshake.
    """
    if not offered:
        return Codec.JSON
    for name in offered:
        try:
            return Codec(name)
        except ValueError:
            continue
    return None


class ErrorCode(enum.StrEnum):
    """The ``code`` of a ``wsbus.error`` frame. The connection stays open after each."""

    MALFORMED = "malformed"
    INVALID_MESSAGE = "invalid_message"
    UNKNOWN_FIELD = "unknown_field"
    RESERVED_TYPE = "reserved_type"
    LIMIT_EXCEEDED = "limit_exceeded"
    BAD_VALUE = "bad_value"
    NO_ROUTE = "no_route"
    FORBIDDEN = "forbidden"
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"
    SERVICE_ERROR = "service_error"
    SHUTTING_DOWN = "shutting_down"

    @property
    def retry(self) -> bool:
        """True when sending the same frame again later may succeed."""
        return self in _RETRYABLE

    @property
    def client_fault(self) -> bool:
        """True when the frame itself was at fault: these count against the error budget."""
        return self in _CLIENT_FAULTS


_RETRYABLE: Final = frozenset(
    {ErrorCode.UNAVAILABLE, ErrorCode.RATE_LIMITED, ErrorCode.SHUTTING_DOWN}
)
_CLIENT_FAULTS: Final = frozenset(
    {
        ErrorCode.MALFORMED,
        ErrorCode.INVALID_MESSAGE,
        ErrorCode.UNKNOWN_FIELD,
        ErrorCode.RESERVED_TYPE,
        ErrorCode.LIMIT_EXCEEDED,
        ErrorCode.BAD_VALUE,
        ErrorCode.FORBIDDEN,
    }
)

CLIENT_CONTROL_TYPES: Final = frozenset({"wsbus.auth"})
"""``wsbus.*`` types a client may send, and only when the gateway asks for them."""

RESERVED_PREFIX: Final = "wsbus."
MAX_SAFE_INTEGER: Final = 2**53 - 1
_TYPE_RE: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_FRAME_KEYS: Final = frozenset({"type", "content", "id", "reply_to"})
_MAX_ID_LEN: Final = 64


class WireLimits(msgspec.Struct, frozen=True):
    """Structure caps on what a client sends. All are configurable.

    Attributes:
        max_frame_bytes: the largest frame, in bytes (default 64 KiB).
        max_depth: the deepest nesting of objects and arrays, counting the frame object
            itself as level 1 (default 32).
        max_integer: the largest magnitude of an integer (default 2**53 - 1, what a
            JavaScript number holds exactly).
    """

    max_frame_bytes: int = 64 * 1024
    max_depth: int = 32
    max_integer: int = MAX_SAFE_INTEGER


DEFAULT_LIMITS: Final = WireLimits()
"""The default structure caps."""


class ClientFrame(msgspec.Struct, frozen=True, gc=False):
    """A client frame that passed validation.

    Attributes:
        type: the message type.
        content: the payload, within the structure caps.
        id: the client's id for the frame; the gateway acks it once the bus took it.
        reply_to: the id of a gateway-sent message this frame answers.
    """

    type: str
    content: Any = None
    id: str | None = None
    reply_to: str | None = None


class Rejection(msgspec.Struct, frozen=True):
    """Why a client frame was refused.

    Attributes:
        code: the error code sent to the client.
        message: a short explanation for the client; no internals.
        ref: the frame's ``id`` when it had a valid one, so the client can match the error.
    """

    code: ErrorCode
    message: str
    ref: str | None = None


class ServerFrame(msgspec.Struct, omit_defaults=True, gc=False):
    """A frame the gateway sends to a client.

    ``type``, ``content`` and ``id`` are always present; ``reply_to`` and ``from`` only
    where set.
    """

    type: str
    content: Any
    id: str
    reply_to: str | None = None
    from_: str | None = msgspec.field(default=None, name="from")


_JSON_ENCODER: Final = msgspec.json.Encoder()
_MSGPACK_ENCODER: Final = msgspec.msgpack.Encoder()
_JSON_DECODER: Final = msgspec.json.Decoder()
_MSGPACK_DECODER: Final = msgspec.msgpack.Decoder()


def encode_server_frame(frame: ServerFrame, codec: Codec) -> bytes:
    """Encode a gateway-to-client frame. JSON output is UTF-8 for a text frame.

    Raises:
        msgspec.EncodeError: the content holds something the codec cannot encode.
        TypeError: likewise, for an unsupported Python type.
    """
    if codec is Codec.JSON:
        return _JSON_ENCODER.encode(frame)
    return _MSGPACK_ENCODER.encode(frame)


# A JSON string token: used to find the colons that separate keys from values.
_JSON_STRING_RE: Final = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')


def _has_lone_surrogate(raw: bytes) -> bool:
    """Tell whether JSON text has a surrogate escape that is not half of a pair.

    Only called once msgspec has refused the text, to tell ``bad_value`` from ``malformed``.
    One linear pass: a backslash always escapes the next byte, so runs of backslashes cost
    nothing extra (a regular expression here would backtrack quadratically on them).
    """
    pending_high = False  # the escape just before was an unpaired high surrogate
    i = raw.find(b"\\")
    end = len(raw)
    while i != -1:
        unit = _surrogate_at(raw, i, end)
        if unit is None:
            if pending_high:
                return True
            i = raw.find(b"\\", i + 2)
            continue
        if pending_high:
            if unit < 0xDC00:
                return True  # a second high surrogate
            pending_high = False
        elif unit >= 0xDC00:
            return True  # a low surrogate with no high one before it
        else:
            pending_high = True
        i = i + 6
        if pending_high and raw[i : i + 1] != b"\\":
            return True
        i = raw.find(b"\\", i)
    return pending_high


def _surrogate_at(raw: bytes, i: int, end: int) -> int | None:
    """Return the UTF-16 unit of a surrogate escape at ``raw[i]``, or None."""
    if i + 6 > end or raw[i + 1] != 0x75:  # "u"
        return None
    try:
        unit = int(raw[i + 2 : i + 6], 16)
    except ValueError:
        return None
    return unit if 0xD800 <= unit <= 0xDFFF else None


def decode_client_frame(
    data: bytes | str,
    codec: Codec,
    limits: WireLimits = DEFAULT_LIMITS,
    *,
    allowed_control: frozenset[str] = frozenset(),
) -> ClientFrame | Rejection:
    """Validate one client frame.

    Args:
        data: the frame's payload: ``str`` for a text frame, ``bytes`` for a binary one.
            The frame kind is the caller's to check against the codec.
        codec: the connection's codec.
        limits: the structure caps.
        allowed_control: ``wsbus.*`` types accepted for this frame (``wsbus.auth`` while the
            gateway waits for authentication); every other ``wsbus.*`` type is reserved.

    Returns:
        The valid frame, or the rejection to send back. Never raises.
    """
    try:
        if codec is Codec.JSON:
            frame = _decode_typical(data, limits)
            if frame is not None:
                return frame
        return _decode(data, codec, limits, allowed_control)
    except _Reject as exc:
        return exc.rejection
    except Exception:  # pragma: no cover - a bug; the client still gets a clean answer
        return Rejection(ErrorCode.MALFORMED, "the frame could not be read")


# Frames hold plain JSON data and never take part in a reference cycle: untracked by the
# cycle collector (gc=False), so that a frame per message does not bring collections on.
class _TypedFrame(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """A frame's shape, checked in C by msgspec: the fast path for typical good frames."""

    type: str
    content: Any = msgspec.UNSET
    id: msgspec.UnsetType | str = msgspec.UNSET
    reply_to: msgspec.UnsetType | str = msgspec.UNSET


_TYPED_DECODER: Final = msgspec.json.Decoder(_TypedFrame)
_UNSET: Final = msgspec.UNSET


def _decode_typical(data: bytes | str, limits: WireLimits) -> ClientFrame | None:
    """Accept a typical good JSON frame quickly, or return None for :func:`_decode`.

    It accepts only what :func:`_decode` accepts (a property test holds them to that);
    anything unusual, good or bad, goes to the full path, which words every rejection.
    """
    if isinstance(data, str):
        # Each character is at most 4 bytes of UTF-8: only a long text needs encoding to
        # know its size. msgspec reads a str's UTF-8 directly, without a copy for ASCII.
        if len(data) * 4 > limits.max_frame_bytes and (
            len(data.encode("utf-8", "surrogatepass")) > limits.max_frame_bytes
        ):
            return None
    elif len(data) > limits.max_frame_bytes:
        return None
    try:
        typed = _TYPED_DECODER.decode(data)
    except (msgspec.DecodeError, RecursionError, UnicodeError):
        # UnicodeEncodeError: a lone surrogate in a str; the full path words it.
        return None
    type_ = typed.type
    if type_ not in _GOOD_TYPES:
        if _TYPE_RE.fullmatch(type_) is None or type_.startswith(RESERVED_PREFIX):
            return None
        if len(_GOOD_TYPES) < _GOOD_TYPES_MAX:
            _GOOD_TYPES.add(type_)
    keys = 1
    content = typed.content
    if content is _UNSET:
        content = None
    else:
        keys += 1
        kind = type(content)
        if kind is dict or kind is list:
            # A flat object, the usual content, is checked inline; anything nested gets
            # the full walk. JSON object keys are always str, and msgspec refuses numbers
            # that overflow a float, so floats need no check either.
            # (With max_depth < 2 the object itself is too deep: the walk says so.)
            nested = kind is list or limits.max_depth < 2
            if not nested:
                max_int = limits.max_integer
                for value in content.values():
                    value_kind = type(value)
                    if value_kind is str or value_kind is float or value_kind is bool:
                        continue
                    if value is None:
                        continue
                    if value_kind is int:
                        if not -max_int <= value <= max_int:
                            return None
                        continue
                    nested = True
                    break
            if nested:
                try:
                    keys += _walk(content, 2, limits.max_depth, limits.max_integer, None)
                except _Reject:
                    return None
            else:
                keys += len(content)
        elif kind is int:
            if not -limits.max_integer <= content <= limits.max_integer:
                return None
        elif kind not in _PLAIN and kind is not float:
            return None
    id_: str | None = None
    if isinstance(typed.id, str):
        if not 0 < len(typed.id) <= _MAX_ID_LEN:
            return None
        id_ = typed.id
        keys += 1
    reply_to: str | None = None
    if isinstance(typed.reply_to, str):
        if not 0 < len(typed.reply_to) <= _MAX_ID_LEN:
            return None
        reply_to = typed.reply_to
        keys += 1
    # Duplicate keys: msgspec keeps the last silently, so count the pairs as written.
    # Colons inside strings only add to the count, so an equal count is exact already.
    colons = data.count(":") if isinstance(data, str) else data.count(b":")
    if colons != keys:
        raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
        if _json_pair_count(raw, keys) != keys:
            return None
    return ClientFrame(type_, content, id_, reply_to)


# Types the fast path has seen pass the type check: a set lookup instead of a regex per
# frame. Bounded, so a client sending endless new types only stops it from growing.
_GOOD_TYPES: Final[set[str]] = set()
_GOOD_TYPES_MAX: Final = 4096


class _Reject(Exception):
    def __init__(self, code: ErrorCode, message: str, ref: str | None = None) -> None:
        self.rejection = Rejection(code, message, ref)


def _decode(
    data: bytes | str, codec: Codec, limits: WireLimits, allowed_control: frozenset[str]
) -> ClientFrame:
    if isinstance(data, str):
        try:
            raw = data.encode("utf-8")
        except UnicodeEncodeError:
            raise _Reject(ErrorCode.BAD_VALUE, "text contains a lone UTF-16 surrogate") from None
    else:
        raw = bytes(data)
    if len(raw) > limits.max_frame_bytes:
        raise _Reject(
            ErrorCode.LIMIT_EXCEEDED,
            f"frame is {len(raw)} bytes; the limit is {limits.max_frame_bytes}",
        )
    obj = _decode_json(raw) if codec is Codec.JSON else _decode_msgpack(raw)
    if type(obj) is not dict:
        raise _Reject(ErrorCode.MALFORMED, "a frame must be one object")
    ref = _ref_of(obj)
    if codec is Codec.JSON:
        keys = _check_value(obj, limits, ref)
        declared = _json_pair_count(raw, keys)
    else:
        declared = _msgpack_pair_count(raw, ref)
        keys = _check_value(obj, limits, ref)
    if declared != keys:
        raise _Reject(ErrorCode.MALFORMED, "an object has a duplicate key", ref)
    if not _FRAME_KEYS.issuperset(obj):
        name = min(obj.keys() - _FRAME_KEYS, key=repr)
        raise _Reject(ErrorCode.UNKNOWN_FIELD, f"unknown field {_show(name)}", ref)
    type_ = obj.get("type")
    if type_ is None:
        raise _Reject(ErrorCode.INVALID_MESSAGE, "field `type` is missing", ref)
    if type(type_) is not str or _TYPE_RE.fullmatch(type_) is None:
        raise _Reject(
            ErrorCode.INVALID_MESSAGE,
            "field `type` must be 1-128 characters of A-Z a-z 0-9 . _ : -",
            ref,
        )
    if type_.startswith(RESERVED_PREFIX) and type_ not in allowed_control:
        raise _Reject(ErrorCode.RESERVED_TYPE, "types starting with 'wsbus.' are reserved", ref)
    id_ = _optional_id(obj, "id", ref)
    reply_to = _optional_id(obj, "reply_to", ref)
    return ClientFrame(type_, obj.get("content"), id_, reply_to)


def _decode_json(raw: bytes) -> Any:
    try:
        return _JSON_DECODER.decode(raw)
    except RecursionError:
        raise _Reject(ErrorCode.LIMIT_EXCEEDED, "nesting is too deep") from None
    except UnicodeDecodeError:
        raise _Reject(ErrorCode.MALFORMED, "text is not valid UTF-8") from None
    except msgspec.ValidationError:
        # msgspec's only validation failure for untyped JSON: a number beyond float range.
        raise _Reject(ErrorCode.BAD_VALUE, "a number is out of range") from None
    except msgspec.DecodeError:
        if _has_lone_surrogate(raw):
            raise _Reject(ErrorCode.BAD_VALUE, "a string has a lone UTF-16 surrogate") from None
        raise _Reject(ErrorCode.MALFORMED, "frame is not valid JSON") from None


def _decode_msgpack(raw: bytes) -> Any:
    try:
        return _MSGPACK_DECODER.decode(raw)
    except RecursionError:
        raise _Reject(ErrorCode.LIMIT_EXCEEDED, "nesting is too deep") from None
    except UnicodeDecodeError:
        raise _Reject(ErrorCode.BAD_VALUE, "a string is not valid UTF-8") from None
    except (msgspec.DecodeError, TypeError, ValueError):
        # TypeError: an unhashable map key such as a map; ValueError: msgspec's own checks.
        raise _Reject(ErrorCode.MALFORMED, "frame is not valid MessagePack") from None


def _ref_of(obj: dict[Any, Any]) -> str | None:
    """Return the frame's id if it is a valid one, to echo in errors; never echo junk."""
    ref = obj.get("id")
    if type(ref) is str and 0 < len(ref) <= _MAX_ID_LEN:
        return ref
    return None


def _optional_id(obj: dict[str, Any], key: str, ref: str | None) -> str | None:
    if key not in obj:
        return None
    value = obj[key]
    if type(value) is not str or not 0 < len(value) <= _MAX_ID_LEN:
        raise _Reject(
            ErrorCode.INVALID_MESSAGE, f"field `{key}` must be a string of 1-64 characters", ref
        )
    return value


def _show(name: object) -> str:
    """Render a client-chosen key for an error message: short and ASCII-only."""
    text = ascii(name)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_value(root: dict[Any, Any], limits: WireLimits, ref: str | None) -> int:
    """Check depth, numbers, keys and value types; return how many object keys there are."""
    return _walk(root, 1, limits.max_depth, limits.max_integer, ref)


def _walk(value: Any, depth: int, max_depth: int, max_int: int, ref: str | None) -> int:
    """Check one object or array and what it holds. Recursion is bounded by ``max_depth``."""
    if depth > max_depth:
        raise _Reject(ErrorCode.LIMIT_EXCEEDED, f"nesting deeper than {max_depth}", ref)
    keys = 0
    if type(value) is dict:
        keys = len(value)
        for key in value:
            if type(key) is not str:
                raise _Reject(ErrorCode.INVALID_MESSAGE, "object keys must be strings", ref)
        items: Any = value.values()
    else:
        items = value
    for item in items:
        kind = type(item)
        if kind in _PLAIN:
            continue
        if kind is int:
            if not -max_int <= item <= max_int:
                raise _Reject(ErrorCode.BAD_VALUE, f"an integer is beyond +-{max_int}", ref)
        elif kind is float:
            if not math.isfinite(item):
                raise _Reject(ErrorCode.BAD_VALUE, "a number is not finite", ref)
        elif kind is dict or kind is list:
            keys += _walk(item, depth + 1, max_depth, max_int, ref)
        else:
            raise _Reject(ErrorCode.BAD_VALUE, "a value has an unsupported type", ref)
    return keys


# Values that need no check at all.
_PLAIN: Final = frozenset({str, bool, type(None), bytes})


def _json_pair_count(raw: bytes, keys: int) -> int:
    """Count the key/value pairs written in a JSON text that is known to be valid.

    msgspec keeps the last of duplicate keys silently, so the decoded objects cannot tell.
    Outside strings a colon only ever separates a key from its value, so counting colons
    outside strings counts the pairs as written.
    """
    colons = raw.count(b":")
    if colons == keys:
        # Colons inside strings only add to this count, so it is exact already.
        return keys
    return _JSON_STRING_RE.sub(b"", raw).count(b":")


def _msgpack_pair_count(raw: bytes, ref: str | None) -> int:
    """Count the map entries declared in MessagePack that msgspec has already decoded.

    A linear walk over the item headers; it also refuses extension types, which carry
    opaque data a JSON client could never receive.
    """
    pairs = 0
    pos = 0
    end = len(raw)
    while pos < end:
        b = raw[pos]
        if b <= 0x7F or b >= 0xE0 or b in (0xC0, 0xC2, 0xC3):
            pos += 1
        elif 0x80 <= b <= 0x8F:
            pairs += b & 0x0F
            pos += 1
        elif 0x90 <= b <= 0x9F:
            pos += 1
        elif 0xA0 <= b <= 0xBF:
            pos += 1 + (b & 0x1F)
        elif b in _MSGPACK_FIXED:
            pos += _MSGPACK_FIXED[b]
        elif b in _MSGPACK_SIZED:
            width = _MSGPACK_SIZED[b]
            length = int.from_bytes(raw[pos + 1 : pos + 1 + width], "big")
            pos += 1 + width + length
        elif b == 0xDC:
            pos += 3
        elif b == 0xDD:
            pos += 5
        elif b == 0xDE:
            pairs += int.from_bytes(raw[pos + 1 : pos + 3], "big")
            pos += 3
        elif b == 0xDF:
            pairs += int.from_bytes(raw[pos + 1 : pos + 5], "big")
            pos += 5
        else:  # 0xC7-0xC9 and 0xD4-0xD8: extension types
            raise _Reject(ErrorCode.BAD_VALUE, "MessagePack extension types are not accepted", ref)
    return pairs


# Item headers followed by a fixed-size payload: header byte -> total item size.
_MSGPACK_FIXED: Final = {
    0xCA: 5,  # float32
    0xCB: 9,  # float64
    0xCC: 2,  # uint8
    0xCD: 3,  # uint16
    0xCE: 5,  # uint32
    0xCF: 9,  # uint64
    0xD0: 2,  # int8
    0xD1: 3,  # int16
    0xD2: 5,  # int32
    0xD3: 9,  # int64
}
# Item headers followed by a length of this many bytes, then that many bytes of payload.
_MSGPACK_SIZED: Final = {
    0xC4: 1,  # bin8
    0xC5: 2,  # bin16
    0xC6: 4,  # bin32
    0xD9: 1,  # str8
    0xDA: 2,  # str16
    0xDB: 4,  # str32
}
