"""The client wire protocol, v1: frames, codecs and strict validation.

Everything here is pure: bytes in, a :class:`ClientFrame` or a :class:`Rejection` out.
:func:`decode_client_frame` never raises, whatever the bytes; that is what lets the gateway
answer every bad frame with an error code and keep the connection open.

Two codecs share one data model (JSON's): ``wsbus.v1.json`` in text frames and
``wsbus.v1.msgpack`` in binary frames. A client frame is one object with the keys ``type``,
``content``, ``id`` and ``reply_to``, and, to carry a W3C trace context, ``traceparent`` and
``tracestate``; no others. See ``docs/protocol.md``.
"""

from __future__ import annotations

import enum
import functools
import gc
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from itertools import chain, compress, repeat
from operator import is_
from typing import Annotated, Any, Final

import msgspec

__all__ = [
    "CLIENT_CONTROL_TYPES",
    "MAX_SAFE_INTEGER",
    "MAX_TRACESTATE",
    "ClientFrame",
    "Codec",
    "ErrorCode",
    "Rejection",
    "ServerFrame",
    "WireLimits",
    "decode_client_frame",
    "encode_server_frame",
    "frame_decoder",
    "frame_id",
    "is_traceparent",
    "is_tracestate",
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
    RESUME_FAILED = "resume_failed"

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
        # A forged or replayed token is hostile: it is charged like any refused frame.
        ErrorCode.RESUME_FAILED,
    }
)

CLIENT_CONTROL_TYPES: Final = frozenset({"wsbus.auth", "wsbus.resume", "wsbus.processed"})
"""``wsbus.*`` types a client may send: ``wsbus.auth`` only when the gateway asks for it,
``wsbus.resume`` only as the first frame after ``wsbus.welcome``, ``wsbus.processed`` any
time (see docs/protocol.md)."""

RESERVED_PREFIX: Final = "wsbus."
MAX_SAFE_INTEGER: Final = 2**53 - 1
"""The largest integer a JavaScript client reads exactly: ``WireLimits.max_integer``'s default."""
_TYPE_RE: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_FRAME_KEYS: Final = frozenset({"type", "content", "id", "reply_to"})
# The W3C trace context a client may send along (docs/tracing.md). The fast paths know only
# _FRAME_KEYS: a frame carrying these takes the full path, so frames without them pay nothing.
_TRACE_KEYS: Final = frozenset({"traceparent", "tracestate"})
_ALL_FRAME_KEYS: Final = _FRAME_KEYS | _TRACE_KEYS
_MAX_ID_LEN: Final = 64

MAX_TRACESTATE: Final = 512
"""The longest ``tracestate`` a client frame may carry, in characters (W3C's 512)."""
_TRACEPARENT_RE: Final = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
# One tracestate list member: key=value, W3C Trace Context level 1, section 3.3.1.
_TRACESTATE_MEMBER_RE: Final = re.compile(
    r"(?:[a-z0-9][_0-9a-z*/-]{0,240}@[a-z][_0-9a-z*/-]{0,13}|[a-z][_0-9a-z*/-]{0,255})"
    r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
)
_MAX_TRACESTATE_MEMBERS: Final = 32


class WireLimits(msgspec.Struct, frozen=True):
    """Structure caps on what a client sends. All are configurable.

    Attributes:
        max_frame_bytes: the largest frame, in bytes (default 64 KiB).
        max_depth: the deepest nesting of objects and arrays, counting the frame object
            itself as level 1 (default 32).
        max_integer: the largest magnitude of an integer (default 2**53 - 1, what a
            JavaScript number holds exactly).
        max_items: the most values a frame may hold, at any depth: each object value (the
            frame's own fields included) and each array element counts one, whatever its
            type (default 4096). It bounds what a small frame decodes to: 64 KiB of empty
            arrays is 65,000 lists, about 73 times its bytes in memory.
    """

    max_frame_bytes: int = 64 * 1024
    max_depth: int = 32
    max_integer: int = MAX_SAFE_INTEGER
    max_items: int = 4096


DEFAULT_LIMITS: Final = WireLimits()
"""The default structure caps."""


class ClientFrame(msgspec.Struct, frozen=True, gc=False):
    """A client frame that passed validation.

    Attributes:
        type: the message type.
        content: the payload, within the structure caps.
        id: the client's id for the frame; the gateway acks it once the bus took it.
        reply_to: the id of a gateway-sent message this frame answers.
        traceparent: the W3C ``traceparent`` the client sent, checked (docs/tracing.md).
        tracestate: the W3C ``tracestate`` sent with it, checked.
    """

    type: str
    content: Any = None
    id: str | None = None
    reply_to: str | None = None
    traceparent: str | None = None
    tracestate: str | None = None


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

    ``type``, ``content`` and ``id`` are always present; ``reply_to``, ``from``,
    ``group``, ``pos`` and ``ack`` only where set.

    Attributes:
        type: the message type.
        content: the payload.
        id: the message id.
        reply_to: the id of the message this answers.
        from_: the sender's public name (``from`` on the wire).
        group: the history group of a message that has a position.
        pos: its position in that group's history, ``"<epoch>:<offset>"``.
        ack: True when the client is asked to acknowledge it with ``wsbus.processed``.
    """

    type: str
    content: Any
    id: str
    reply_to: str | None = None
    from_: str | None = msgspec.field(default=None, name="from")
    group: str | None = None
    pos: str | None = None
    ack: bool = False


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
    if len(data) > _GC_PAUSE_FROM and gc.isenabled():
        # A large frame may decode to tens of thousands of lists and dicts at once: the
        # cycle collector would run every 700 of them, and push them into older
        # generations whose full collections scan the whole process (measured: 41 ms ->
        # 9 ms a frame of 64 KiB of empty arrays, in a running gateway). Decoded frames
        # hold no cycles, and nothing here awaits: pause it for this call.
        gc.disable()
        try:
            return _decode_client_frame(data, codec, limits, allowed_control)
        finally:
            gc.enable()
    return _decode_client_frame(data, codec, limits, allowed_control)


# Frames larger than this are decoded with the cycle collector paused.
_GC_PAUSE_FROM: Final = 4096


@functools.lru_cache(maxsize=64)
def frame_decoder(
    codec: Codec, limits: WireLimits = DEFAULT_LIMITS
) -> Callable[[bytes | str], ClientFrame | Rejection]:
    """Return :func:`decode_client_frame` for one codec and limits, built once.

    The function returned gives exactly what ``decode_client_frame(data, codec, limits)``
    gives (a property test holds them to that), with the choices that depend only on the
    codec made here rather than per frame: a gateway's sessions call it for every client
    frame. It accepts no ``wsbus.*`` control type. Built once per codec and limits (cached).
    """
    none: frozenset[str] = frozenset()
    if codec is Codec.JSON:
        flat = _flat_decoder(limits)
        flat_decode = None if flat is None else flat.decode
        max_bytes = limits.max_frame_bytes

        # Each character is at most 4 bytes of UTF-8: a text of at most max_bytes // 4
        # characters is within max_bytes, whatever it holds. Past _GC_PAUSE_FROM frames
        # take the other path: with the default caps, every frame here is small enough.
        quick_text = max_bytes // 4
        always = flat_decode is not None and min(quick_text, max_bytes) >= _GC_PAUSE_FROM

        def decode_json(data: bytes | str) -> ClientFrame | Rejection:
            n = len(data)
            if n > _GC_PAUSE_FROM:
                return decode_client_frame(data, codec, limits)
            text = type(data) is str
            tried = False
            if always or (
                flat_decode is not None and (n <= quick_text if text else n <= max_bytes)
            ):
                # _decode_flat, inline: this runs once per client frame.
                tried = True
                try:
                    typed = flat_decode(data)  # type: ignore[misc]
                except Exception:
                    typed = None
                if typed is not None:
                    type_ = typed.type
                    content = typed.content
                    id_ = typed.id
                    reply_to = typed.reply_to
                    keys = 1 + (id_ is not None) + (reply_to is not None)
                    if content is _UNSET:
                        content = None
                    elif type(content) is dict:
                        keys += 1 + len(content)
                    else:
                        keys += 1
                    if (type_ in _GOOD_TYPES or _good_type(type_)) and (
                        data.count(":" if text else b":") == keys  # type: ignore[arg-type]
                        or _pairs_are(data, keys)
                    ):
                        return ClientFrame(type_, content, id_, reply_to)
            try:
                # A long text the quick size check could not clear may still be flat.
                if flat is not None and not tried:
                    frame = _decode_flat(data, flat, max_bytes)
                    if frame is not None:
                        return frame
                frame = _decode_typical(data, limits)
                if frame is not None:
                    return frame
                return _decode(data, codec, limits, none)
            except _Reject as exc:
                return exc.rejection
            except Exception:  # pragma: no cover - a bug; the client still gets a clean answer
                return Rejection(ErrorCode.MALFORMED, "the frame could not be read")

        return decode_json

    def decode_msgpack(data: bytes | str) -> ClientFrame | Rejection:
        if len(data) > _GC_PAUSE_FROM:
            return decode_client_frame(data, codec, limits)
        return _decode_client_frame(data, codec, limits, none)

    return decode_msgpack


def _decode_client_frame(
    data: bytes | str, codec: Codec, limits: WireLimits, allowed_control: frozenset[str]
) -> ClientFrame | Rejection:
    try:
        if codec is Codec.JSON:
            frame = _decode_typical(data, limits)
        elif type(data) is bytes and len(data) <= limits.max_frame_bytes:
            frame = _decode_typical_msgpack(data, limits, allowed_control)
        else:
            frame = None
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
    except Exception:
        # Whatever went wrong (a lone surrogate in a str included), the full path words it.
        return None
    type_ = typed.type
    if type_ not in _GOOD_TYPES:
        if _TYPE_RE.fullmatch(type_) is None or type_.startswith(RESERVED_PREFIX):
            return None
        if len(_GOOD_TYPES) < _GOOD_TYPES_MAX:
            _GOOD_TYPES.add(type_)
    keys = 1
    content = typed.content
    # The frame's own fields count against max_items, like the values inside content.
    fields = 1 + (content is not _UNSET) + (typed.id is not _UNSET)
    fields += typed.reply_to is not _UNSET
    if fields > limits.max_items:
        return None
    if content is _UNSET:
        content = None
    else:
        keys += 1
        kind = type(content)
        if kind is dict or kind is list:
            # A flat object, the usual content, is checked inline; anything nested gets
            # the level-by-level check. JSON object keys are always str, and msgspec refuses
            # numbers that overflow a float, so floats need no check either.
            # (With max_depth < 2 the object itself is too deep: the check says so.)
            nested = kind is list or limits.max_depth < 2
            if fields + len(content) > limits.max_items:
                return None
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
                content_keys = _check_levels(
                    [content], 2, limits.max_depth, limits.max_integer, limits.max_items - fields
                )
                if content_keys < 0:
                    return None
                keys += content_keys
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
    if not _pairs_are(data, keys):
        return None
    return ClientFrame(type_, content, id_, reply_to)


_INT64_MAX: Final = 2**63 - 1


def _flat_decoder(limits: WireLimits) -> msgspec.json.Decoder[Any] | None:
    """Return a decoder that checks a flat frame's every cap in C, or None.

    A frame whose content is a scalar, or an object of scalars (the usual frame), is
    decoded straight into a struct whose types carry the caps: integers within
    ``max_integer``, ids of 1 to 64 characters, content of at most ``max_items - 4``
    values (the frame's own fields are at most 4 more). Anything else (nested content, an
    array, a null id) fails to decode, and the frame goes to :func:`_decode_typical`.
    None when the caps leave no room for such a frame (``max_depth`` under 2, or
    ``max_items`` under 5), or when ``max_integer`` is past what msgspec's constraints
    hold (2**63 - 1): every frame then takes the other paths.
    """
    bound = limits.max_integer
    if limits.max_depth < 2 or limits.max_items < 5 or bound > _INT64_MAX:
        # (msgspec's integer constraints hold int64 bounds only.)
        return None
    integer = Annotated[int, msgspec.Meta(ge=-bound, le=bound)]
    ident = Annotated[str, msgspec.Meta(min_length=1, max_length=_MAX_ID_LEN)]
    obj = Annotated[
        dict[str, str | integer | float | bool | None],
        msgspec.Meta(max_length=limits.max_items - 4),
    ]
    content = obj | str | integer | float | bool | None | msgspec.UnsetType
    # id and reply_to default to None but are typed str: an explicit null is not a
    # flat frame (the full path refuses it, and words why).
    frame = msgspec.defstruct(
        "_FlatFrame",
        [
            ("type", str),
            ("content", content, msgspec.UNSET),
            ("id", ident, None),
            ("reply_to", ident, None),
        ],
        forbid_unknown_fields=True,
        gc=False,
    )
    return msgspec.json.Decoder(frame)


def _decode_flat(
    data: bytes | str, decoder: msgspec.json.Decoder[Any], max_bytes: int
) -> ClientFrame | None:
    """Accept a good flat JSON frame (see :func:`_flat_decoder`), or return None.

    It accepts only what :func:`_decode` accepts (a property test holds them to that): the
    size, the type's syntax and duplicate keys are checked here, every other cap by the
    decoder, in C.
    """
    if isinstance(data, str):
        # As in _decode_typical: only a long text needs encoding to know its size.
        if len(data) * 4 > max_bytes and (len(data.encode("utf-8", "surrogatepass")) > max_bytes):
            return None
    elif len(data) > max_bytes:
        return None
    try:
        typed = decoder.decode(data)
    except Exception:
        return None
    type_ = typed.type
    if type_ not in _GOOD_TYPES and not _good_type(type_):
        return None
    content = typed.content
    keys = 1
    if content is _UNSET:
        content = None
    else:
        keys += 1
        if type(content) is dict:
            keys += len(content)
    id_ = typed.id
    reply_to = typed.reply_to
    keys += (id_ is not None) + (reply_to is not None)
    if not _pairs_are(data, keys):
        return None
    return ClientFrame(type_, content, id_, reply_to)


def _pairs_are(data: bytes | str, keys: int) -> bool:
    """Tell whether the frame's JSON text has exactly ``keys`` key-value pairs.

    Duplicate keys: msgspec keeps the last silently, so the pairs are counted as written.
    Colons inside strings only add to the count, so an equal count is exact already; only
    a frame with more colons than keys has its pairs counted properly.
    """
    colons = data.count(":") if isinstance(data, str) else data.count(b":")
    if colons == keys:
        return True
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    return _json_pair_count(raw, keys) == keys


def _good_type(type_: str) -> bool:
    """Tell whether a type not in _GOOD_TYPES is a client's type; remember it if so."""
    if _TYPE_RE.fullmatch(type_) is None or type_.startswith(RESERVED_PREFIX):
        return False
    if len(_GOOD_TYPES) < _GOOD_TYPES_MAX:
        _GOOD_TYPES.add(type_)
    return True


# Types the fast path has seen pass the type check: a set lookup instead of a regex per
# frame. Bounded, so a client sending endless new types only stops it from growing.
_GOOD_TYPES: Final[set[str]] = set()
_GOOD_TYPES_MAX: Final = 4096


def _decode_typical_msgpack(
    raw: bytes, limits: WireLimits, allowed_control: frozenset[str]
) -> ClientFrame:
    """Accept a good MessagePack frame with work linear in its bytes.

    Like :func:`_decode_typical`, it accepts only what :func:`_decode` accepts, and it
    leaves every frame it does not accept to the full checks (:func:`_check_frame`, on the
    object already decoded), which word the rejection. msgspec decodes in C; the checks
    then run level by level, with the per-item work in C too (see :func:`_check_levels`);
    duplicate keys are ruled out by re-encoding (msgspec writes each map's real length),
    and only a frame that does not re-encode to its own bytes gets its map headers counted.

    Raises:
        _Reject: the frame is refused. Bytes msgspec could not decode are classified from
            them straight away: a second decode would only refuse them again.
    """
    try:
        obj = _MSGPACK_DECODER.decode(raw)
    except Exception:
        raise _Reject(*_classify_msgpack(raw, limits)) from None
    if type(obj) is not dict or not _FRAME_KEYS.issuperset(obj):
        return _check_frame(obj, raw, Codec.MSGPACK, limits, allowed_control)
    type_ = obj.get("type")
    if type(type_) is not str:
        return _check_frame(obj, raw, Codec.MSGPACK, limits, allowed_control)
    if type_ not in _GOOD_TYPES:
        if _TYPE_RE.fullmatch(type_) is None:
            return _check_frame(obj, raw, Codec.MSGPACK, limits, allowed_control)
        if type_.startswith(RESERVED_PREFIX):
            if type_ not in allowed_control:
                return _check_frame(obj, raw, Codec.MSGPACK, limits, allowed_control)
        elif len(_GOOD_TYPES) < _GOOD_TYPES_MAX:
            _GOOD_TYPES.add(type_)
    id_ = obj.get("id")
    if "id" in obj and not (type(id_) is str and 0 < len(id_) <= _MAX_ID_LEN):
        return _check_frame(obj, raw, Codec.MSGPACK, limits, allowed_control)
    reply_to = obj.get("reply_to")
    if "reply_to" in obj and not (type(reply_to) is str and 0 < len(reply_to) <= _MAX_ID_LEN):
        return _check_frame(obj, raw, Codec.MSGPACK, limits, allowed_control)
    keys = _check_levels([obj], 1, limits.max_depth, limits.max_integer, limits.max_items)
    if keys < 0:
        return _check_frame(obj, raw, Codec.MSGPACK, limits, allowed_control)
    if _MSGPACK_ENCODER.encode(obj) != raw and _msgpack_pairs(raw) != keys:
        return _check_frame(obj, raw, Codec.MSGPACK, limits, allowed_control)
    return ClientFrame(type_, obj.get("content"), id_, reply_to)


def _check_levels(
    level: list[Any], depth: int, max_depth: int, max_int: int, max_items: int
) -> int:
    """Check decoded containers one nesting level at a time; return the object key count.

    ``level`` holds the containers found at ``depth``, which may hold ``max_items`` values
    in all. Returns -1 when anything is wrong (more values than that, too deep, a key that
    is not a string, a number out of range, a value of another type):
    the caller then leaves the wording to :func:`_decode`. Each level costs a few passes of
    C iteration (``map``, ``chain``, ``compress``) over its items, so the work is linear in
    the number of values with a small constant, however they are nested: a Python call per
    container (a recursive walk) cost 20-50 times msgspec's own decoding on frames made of
    tiny containers.
    """
    keys = 0
    kinds = set(map(type, level))  # then carried from one level to the next
    while level:
        if depth > max_depth:
            return -1
        # Empty containers hold nothing to check: drop them before making iterators.
        level = list(filter(None, level))
        if not level:
            break
        if kinds == _LIST_KIND:
            max_items -= sum(map(len, level))
            if max_items < 0:
                return -1
            items = list(chain.from_iterable(level))
        else:
            if kinds == _DICT_KIND:
                dicts = level
                lists: list[Any] = []
            else:
                level_kinds = list(map(type, level))
                dicts = list(compress(level, map(is_, level_kinds, repeat(dict))))
                lists = list(compress(level, map(is_, level_kinds, repeat(list))))
            level_keys = sum(map(len, dicts))
            max_items -= level_keys
            if lists:
                max_items -= sum(map(len, lists))
            if max_items < 0:
                # Counted before any item is gathered: refused for its size at no cost.
                return -1
            keys += level_keys
            # set.union reads dicts without an iterator each; the distinct keys suffice.
            key_kinds = set(map(type, set().union(*dicts)))
            if key_kinds and key_kinds != _STR_KIND:
                return -1
            items = list(chain.from_iterable(map(dict.values, dicts)))
            if lists:
                items.extend(chain.from_iterable(lists))
        if len(items) >= _CONVERT_FROM:
            # Many values: try them all as scalars in one pass of C, range checks included.
            try:
                msgspec.convert(items, _scalars_type(max_int))
            except Exception:
                pass  # containers among them, or a fault: the passes below tell
            else:
                break
        item_kinds = set(map(type, items))
        if item_kinds <= _PLAIN:
            break
        if not item_kinds <= _VALUE_KINDS:
            return -1
        kinds_list: list[type] | None = None
        if int in item_kinds:
            if item_kinds == _INT_KIND:
                ints: list[int] = items
            else:
                kinds_list = list(map(type, items))
                ints = list(compress(items, map(is_, kinds_list, repeat(int))))
            if max(ints) > max_int or min(ints) < -max_int:
                return -1
        if float in item_kinds:
            if kinds_list is None:
                kinds_list = list(map(type, items))
            if not all(map(math.isfinite, compress(items, map(is_, kinds_list, repeat(float))))):
                return -1
        if item_kinds.isdisjoint(_CONTAINER_KINDS):
            break
        if item_kinds <= _CONTAINER_KINDS:
            level = items
        else:
            if kinds_list is None:
                kinds_list = list(map(type, items))
            level = list(compress(items, map(_CONTAINER_KINDS.__contains__, kinds_list)))
        kinds = item_kinds & _CONTAINER_KINDS
        depth += 1
    return keys


# msgspec.convert builds its type information on each call (a few microseconds): worth it
# only for a long list of values.
_CONVERT_FROM: Final = 256
_SCALARS_TYPES: Final[dict[int, Any]] = {}


def _scalars_type(max_int: int) -> Any:
    """The type of a list of scalar values within the caps: finite floats, bounded ints."""
    found = _SCALARS_TYPES.get(max_int)
    if found is None:
        bounded = Annotated[int, msgspec.Meta(ge=-max_int, le=max_int)]
        finite = Annotated[float, msgspec.Meta(ge=-sys.float_info.max, le=sys.float_info.max)]
        found = list[bounded | finite | str | bool | None]
        if len(_SCALARS_TYPES) < 16:
            _SCALARS_TYPES[max_int] = found
    return found


_LIST_KIND: Final = {list}
_DICT_KIND: Final = {dict}
_STR_KIND: Final = {str}
_INT_KIND: Final = {int}
_CONTAINER_KINDS: Final = frozenset({list, dict})


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
            # The text itself holds a surrogate (no edge that checks UTF-8 lets one through):
            # refused whatever the codec, with the JSON frame's id if that one is valid.
            ref = None
            if codec is Codec.JSON and len(data) <= limits.max_frame_bytes:
                outline = _json_outline(data)[1]
                ref = _json_ref(outline) if outline is not None else None
            message = "text contains a lone UTF-16 surrogate"
            raise _Reject(ErrorCode.BAD_VALUE, message, ref) from None
    else:
        raw = bytes(data)
    if len(raw) > limits.max_frame_bytes:
        raise _Reject(
            ErrorCode.LIMIT_EXCEEDED,
            f"frame is {len(raw)} bytes; the limit is {limits.max_frame_bytes}",
        )
    try:
        obj = (_JSON_DECODER if codec is Codec.JSON else _MSGPACK_DECODER).decode(raw)
    except Exception:
        # Whatever msgspec's error says, the bytes say why: this frame is refused, so the
        # classification may walk it in Python (linear in its bytes).
        if codec is Codec.JSON:
            raise _Reject(*_classify_json(raw, limits)) from None
        raise _Reject(*_classify_msgpack(raw, limits)) from None
    return _check_frame(obj, raw, codec, limits, allowed_control)


def _check_frame(
    obj: Any, raw: bytes, codec: Codec, limits: WireLimits, allowed_control: frozenset[str]
) -> ClientFrame:
    """Run every check, in the documented order, on a decoded frame; raise the first fault."""
    if type(obj) is not dict:
        raise _Reject(ErrorCode.MALFORMED, "a frame must be one object")
    ref = _ref_of(obj)
    _check_items(obj, limits.max_items, ref)
    if codec is Codec.JSON:
        keys = _check_value(obj, limits, ref)
        declared = _json_pair_count(raw, keys)
    else:
        declared = _msgpack_pairs(raw)
        if declared < 0:
            raise _Reject(ErrorCode.BAD_VALUE, _EXT_MESSAGE, ref)
        keys = _check_value(obj, limits, ref)
    if declared != keys:
        raise _Reject(ErrorCode.MALFORMED, "an object has a duplicate key", ref)
    if not _ALL_FRAME_KEYS.issuperset(obj):
        name = min(obj.keys() - _ALL_FRAME_KEYS, key=repr)
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
    if "traceparent" in obj or "tracestate" in obj:
        traceparent, tracestate = _trace_context(obj, ref)
        return ClientFrame(type_, obj.get("content"), id_, reply_to, traceparent, tracestate)
    return ClientFrame(type_, obj.get("content"), id_, reply_to)


def _trace_context(obj: dict[str, Any], ref: str | None) -> tuple[str, str | None]:
    """Check a frame's W3C trace context; return (traceparent, tracestate).

    Strict, and bounded by the fields' lengths: a value that does not follow W3C Trace
    Context is refused with ``invalid_message``, as an ill-formed ``id`` is, so that a
    client with a broken tracer learns of it rather than losing its traces silently.
    """
    traceparent = obj.get("traceparent")
    if not (type(traceparent) is str and is_traceparent(traceparent)):
        message = (
            "field `traceparent` must be a W3C traceparent: "
            "<2 hex>-<32 hex>-<16 hex>-<2 hex>, lower case, ids not all zeros"
            if "traceparent" in obj
            else "field `tracestate` needs a `traceparent`"
        )
        raise _Reject(ErrorCode.INVALID_MESSAGE, message, ref)
    if "tracestate" not in obj:
        return traceparent, None
    tracestate = obj["tracestate"]
    if not (type(tracestate) is str and is_tracestate(tracestate)):
        raise _Reject(
            ErrorCode.INVALID_MESSAGE,
            f"field `tracestate` must be a W3C tracestate of at most {MAX_TRACESTATE} "
            f"characters and {_MAX_TRACESTATE_MEMBERS} key=value members",
            ref,
        )
    return traceparent, tracestate


def is_traceparent(value: str) -> bool:
    """Tell whether ``value`` is a W3C ``traceparent`` wsbus accepts from a client.

    The 55-character form ``version-trace_id-parent_id-flags`` in lower-case hex: version
    ``ff`` is invalid, and neither id may be all zeros (W3C Trace Context, section 3.2).
    Costs at most one look at 55 characters, whatever ``value`` holds.
    """
    return (
        len(value) == 55
        and _TRACEPARENT_RE.fullmatch(value) is not None
        and not value.startswith("ff")
        and value[3:35] != "0" * 32
        and value[36:52] != "0" * 16
    )


def is_tracestate(value: str) -> bool:
    """Tell whether ``value`` is a W3C ``tracestate`` wsbus accepts from a client.

    At most :data:`MAX_TRACESTATE` characters, and at most 32 comma-separated ``key=value``
    members (W3C Trace Context, section 3.3), each key at most once; empty members and
    spaces or tabs around members are allowed. Linear in its (bounded) length.
    """
    if len(value) > MAX_TRACESTATE:
        return False
    keys: set[str] = set()
    for part in value.split(","):
        member = part.strip(" \t")
        if not member:
            continue
        if _TRACESTATE_MEMBER_RE.fullmatch(member) is None:
            return False
        key = member.partition("=")[0]
        if key in keys:
            return False
        keys.add(key)
    return 0 < len(keys) <= _MAX_TRACESTATE_MEMBERS


_EXT_MESSAGE: Final = "MessagePack extension types are not accepted"


def _check_items(root: dict[Any, Any], max_items: int, ref: str | None) -> None:
    """Refuse a decoded frame holding more than ``max_items`` values, at any depth.

    Level by level, in C iteration, and it stops at the level that passes the cap: the
    work is bounded by the cap whatever the frame holds, so the checks after it (the
    MessagePack header walk, the recursive value walk) are bounded too.
    """
    count = 0
    level: list[Any] = [root]
    while level:
        kinds = list(map(type, level))
        dicts = list(compress(level, map(is_, kinds, repeat(dict))))
        lists = list(compress(level, map(is_, kinds, repeat(list))))
        count += sum(map(len, dicts)) + sum(map(len, lists))
        if count > max_items:
            raise _Reject(ErrorCode.LIMIT_EXCEEDED, _items_message(max_items), ref)
        items = list(chain.from_iterable(map(dict.values, dicts)))
        items.extend(chain.from_iterable(lists))
        level = list(compress(items, map(_CONTAINER_KINDS.__contains__, map(type, items))))


def _items_message(max_items: int) -> str:
    return f"the frame holds more than {max_items} values"


# A JSON string, or a bracket: what the outline of a refused JSON frame is made of.
# Possessive, so that an unterminated string cannot make it backtrack.
_JSON_OUTLINE_RE: Final = re.compile(r'"(?:[^"\\]++|\\.)*+"|[\[\]{}]', re.DOTALL)


def _classify_json(raw: bytes, limits: WireLimits) -> tuple[ErrorCode, str, str | None]:
    """Say why msgspec refused a JSON frame, from its bytes alone, with the frame's ref.

    The order: bytes that are not UTF-8 (``malformed``), nesting deeper than the cap
    (``limit_exceeded``, seen from the brackets outside strings, so that a parser's stack is
    never at stake), text that is not JSON (``malformed``, no ref: nothing parsed), then
    the values: a lone surrogate or a number beyond range (``bad_value``), and the checks of
    a frame that decoded. Linear in the bytes: one pass of a regular expression, the
    standard library's JSON parser (no recursion beyond the checked depth, and its hooks
    convert no long digit string), and the checks of :func:`_check_frame`.
    """
    try:
        text = raw.decode("utf-8")
        bad_utf8 = False
    except UnicodeDecodeError:
        # Each invalid byte becomes one lone surrogate: never part of a valid ref.
        text = raw.decode("utf-8", "surrogateescape")
        bad_utf8 = True
    if not text.lstrip(" \t\n\r").startswith("{"):
        return ErrorCode.MALFORMED, "a frame must be one JSON object", None
    deepest, outline = _json_outline(text)
    if bad_utf8 or deepest > limits.max_depth:
        ref = _json_ref(outline) if outline is not None else None
        if bad_utf8:
            return ErrorCode.MALFORMED, "text is not valid UTF-8", ref
        return ErrorCode.LIMIT_EXCEEDED, f"nesting deeper than {limits.max_depth}", ref
    out_of_range: list[str] = []

    def parse_int(digits: str) -> int:
        # int() of a long digit string is slow, and refused over 4300 digits: look first.
        if len(digits.lstrip("-")) > _MAX_INT_DIGITS:
            out_of_range.append(digits)
            return 0
        return int(digits)

    def parse_float(literal: str) -> float:
        value = float(literal)
        if not math.isfinite(value):
            out_of_range.append(literal)
            return 0.0
        return value

    try:
        obj = json.loads(
            text, parse_int=parse_int, parse_float=parse_float, parse_constant=_not_json
        )
    except Exception:
        return ErrorCode.MALFORMED, "frame is not valid JSON", None
    if type(obj) is not dict:
        return ErrorCode.MALFORMED, "a frame must be one object", None
    ref = _ref_of(obj)
    try:
        _check_items(obj, limits.max_items, ref)
    except _Reject as exc:
        return exc.rejection.code, exc.rejection.message, exc.rejection.ref
    if _has_lone_surrogate(raw):
        return ErrorCode.BAD_VALUE, "a string has a lone UTF-16 surrogate", ref
    if out_of_range:
        return ErrorCode.BAD_VALUE, "a number is out of range", ref
    try:
        _check_frame(obj, raw, Codec.JSON, limits, frozenset())
    except _Reject as exc:
        return exc.rejection.code, exc.rejection.message, exc.rejection.ref
    # The standard library read what msgspec did not: still not a frame wsbus takes.
    return ErrorCode.MALFORMED, "frame is not valid JSON", ref


# More digits than any integer within the default cap, and fewer than int() refuses.
_MAX_INT_DIGITS: Final = 20


def _not_json(literal: str) -> Any:
    """Refuse ``NaN`` and ``Infinity``, which the standard library's parser accepts."""
    raise ValueError(literal)


def _json_outline(text: str) -> tuple[int, str | None]:
    """Return the deepest nesting of a JSON text, and its top level with nested values cut.

    The outline replaces every array or object inside the top-level value by ``0``, so the
    top-level keys can be parsed however deep or broken the content is. None when the
    brackets do not balance.
    """
    depth = 0
    deepest = 0
    parts: list[str] = []
    kept = 0
    for match in _JSON_OUTLINE_RE.finditer(text):
        start = match.start()
        char = text[start]
        if char == '"':
            continue
        if char == "[" or char == "{":
            depth += 1
            if depth > deepest:
                deepest = depth
            if depth == 2:
                parts.append(text[kept:start])
                parts.append("0")
        else:
            if depth == 2:
                kept = match.end()
            depth -= 1
            if depth < 0:
                return deepest, None
    if depth != 0:
        return deepest, None
    parts.append(text[kept:])
    return deepest, "".join(parts)


def _json_ref(outline: str) -> str | None:
    """The valid ``id`` of a JSON frame's outline, if it has one."""
    try:
        top = json.loads(outline, parse_constant=_not_json)
    except Exception:
        return None
    return _ref_of(top) if type(top) is dict else None


def _classify_msgpack(raw: bytes, limits: WireLimits) -> tuple[ErrorCode, str, str | None]:
    """Say why msgspec refused a MessagePack frame, from its bytes alone, with its ref.

    One walk over the items, linear in the bytes. The order: bytes that are not one
    complete MessagePack item (``malformed``, no ref), a frame that is not a map
    (``malformed``), more values than the item cap (``limit_exceeded``), an extension type
    anywhere (``bad_value``), then the first in the frame of: nesting deeper than the cap
    (``limit_exceeded``), a map key that is not a string (``invalid_message``), a string
    that is not valid UTF-8 (``bad_value``).

    The walk stops at the value that passes the item cap: msgspec then skims the frame in
    C for its id (see :func:`_over_items`). Only if it cannot (the frame is malformed, or
    nests deeper than msgspec recurses) does the walk read on, at most ``max_items`` more
    steps, to find the end or the id; past that, the frame is refused for the cap with the
    ref seen so far.

    Runs of items that need no Python step are skipped by one match of a compiled pattern:
    one-byte items (small integers, nil, booleans, empty arrays, maps and strings), and in
    arrays numbers of one size or short strings of one length (their UTF-8 checked in one
    decode); a chain of one-item arrays is one step. Only other containers with items,
    keys and other strings take a step each, and each is a value counted against the cap
    (or a key, one per value), so the steps are bounded by the cap too.
    """
    max_depth = limits.max_depth
    max_items = limits.max_items
    end = len(raw)
    pos = 0
    # Per open container: [items it declares, True for a map, items seen].
    stack: list[list[Any]] = []
    fault: tuple[ErrorCode, str] | None = None
    has_ext = False
    ref: str | None = None
    top_key: str | None = None  # the top-level map's key whose value comes next
    values = 0
    cap = max_items  # then the end, once the walk passed the cap and reads on for the id
    budget = 0  # steps left to read on with
    leaves = _MSGPACK_LEAVES_RE.match
    while True:
        if pos >= end:
            return ErrorCode.MALFORMED, "frame is not valid MessagePack", None
        if cap == end:
            budget -= 1
            if budget < 0:
                # Past the cap, msgspec could not skim the frame, and no end in sight: no
                # more work for a frame refused anyway (its ref only if seen by now).
                return ErrorCode.LIMIT_EXCEEDED, _items_message(max_items), ref
        is_key = False
        at_top = False
        if stack:
            top = stack[-1]
            is_map = top[1]
            seen = top[2]
            at_top = is_map and len(stack) == 1
            n = 0
            if not at_top:
                # At most what this container holds (containers nested in one long run
                # must not each scan all of it), and not far past the cap.
                runs = _RUNS[raw[pos]]
                if runs == 1:
                    left = min(top[0] - seen, 2 * (cap - values) + 2)
                    run = leaves(raw, pos, pos + left)
                    if run is not None:
                        # Skip the run, or the part of it before a fault.
                        n = run.end() - pos
                        if fault is None:
                            parity = seen % 2 if is_map else -1
                            n = _clean_run(raw, pos, n, parity, len(stack) >= max_depth)
                        skipped = n
                elif runs == 2 and not is_map:
                    left = min(top[0] - seen, 2 * (cap - values) + 2)
                    n, skipped = _scalar_run(raw, pos, left, fault is None)
            if n:
                pos += skipped
                top[2] = seen + n
                values += (n + seen % 2) // 2 if is_map else n
                if values > cap:
                    found = _over_items(raw, max_items)
                    if found is not None:
                        return found
                    cap, budget = end, max_items
                while stack and stack[-1][2] == stack[-1][0]:
                    stack.pop()
                if not stack:
                    break
                continue
            is_key = is_map and seen % 2 == 0
            top[2] = seen + 1
            if not is_key:
                values += 1
                if raw[pos] == 0x91 and raw[pos + 1 : pos + 2] == b"\x91":
                    # A chain of arrays of one item each, [[[...]]], in one step: each
                    # is the one item of the one before, and all of them end with the
                    # innermost one's item.
                    match = _ONE_ITEM_CHAIN_RE.match(raw, pos)
                    links = match.end() - pos if match is not None else 1
                    if fault is None and len(stack) + links > max_depth:
                        fault = (ErrorCode.LIMIT_EXCEEDED, f"nesting deeper than {max_depth}")
                    if fault is None:
                        stack.extend([[1, False, 1] for _ in range(links - 1)])
                    # else depth no longer matters: one entry stands for the whole chain.
                    stack.append([1, False, 0])
                    values += links - 1
                    pos += links
                    if at_top and top_key == "id":
                        ref = None  # the last id wins, and this one is not a string
                    if values > cap:
                        found = _over_items(raw, max_items)
                        if found is not None:
                            return found
                        cap, budget = end, max_items
                    continue
                if values > cap:
                    found = _over_items(raw, max_items)
                    if found is not None:
                        return found
                    cap, budget = end, max_items
        b = raw[pos]
        text: str | None = None
        count = 0  # items in a container that opens here
        if b <= 0x7F or b >= 0xE0 or b in (0xC0, 0xC2, 0xC3):
            size = 1
            kind = "scalar"
        elif b <= 0x8F:
            size, kind, count = 1, "map", 2 * (b & 0x0F)
        elif b <= 0x9F:
            size, kind, count = 1, "array", b & 0x0F
        elif b <= 0xBF or b in _MSGPACK_SIZED:
            if b <= 0xBF:
                head, length = 1, b & 0x1F
            else:
                width = _MSGPACK_SIZED[b]
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
        elif b in _MSGPACK_FIXED:
            size, kind = _MSGPACK_FIXED[b], "scalar"
        elif b in (0xDC, 0xDD, 0xDE, 0xDF):
            width = 2 if b in (0xDC, 0xDE) else 4
            size = 1 + width
            if pos + size > end:
                return ErrorCode.MALFORMED, "frame is not valid MessagePack", None
            count = int.from_bytes(raw[pos + 1 : pos + size], "big")
            kind = "array" if b <= 0xDD else "map"
            if kind == "map":
                count *= 2
        elif b in _MSGPACK_EXT:
            fixed = _MSGPACK_EXT[b]
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
                ref = text if text is not None and 0 < len(text) <= _MAX_ID_LEN else None
        if kind == "map" or kind == "array":
            if not stack and kind != "map":
                return _NOT_A_MAP
            if len(stack) + 1 > max_depth and fault is None:
                fault = (ErrorCode.LIMIT_EXCEEDED, f"nesting deeper than {max_depth}")
            if count:
                stack.append([count, kind == "map", 0])
                continue
        elif not stack:
            return _NOT_A_MAP
        while stack and stack[-1][2] == stack[-1][0]:
            stack.pop()
        if not stack:
            break
    if pos != end:
        return ErrorCode.MALFORMED, "frame is not valid MessagePack", None
    if cap != max_items:
        return ErrorCode.LIMIT_EXCEEDED, _items_message(max_items), ref
    if has_ext:
        return ErrorCode.BAD_VALUE, _EXT_MESSAGE, ref
    if fault is not None:
        return fault[0], fault[1], ref
    return ErrorCode.MALFORMED, "frame is not valid MessagePack", ref


# A run of one-byte items that need no check beyond their place: positive and negative
# fixints, nil, false, true, and empty maps, arrays and strings.
_MSGPACK_LEAVES_RE: Final = re.compile(rb"[\x00-\x7f\x80\x90\xa0\xc0\xc2\xc3\xe0-\xff]++")


def _scalar_run(raw: bytes, pos: int, left: int, check: bool) -> tuple[int, int]:
    """Skip a run of like scalars in an array; return how many items and bytes it skipped.

    Like scalars: fixed-size numbers with the same header, or short strings (fixstr) of
    the same length, so that one match of a simple pattern finds the run and its length
    tells the count. At most ``left`` items, and with ``check`` only those before the first
    string that is not valid UTF-8 (the walk then reads that one itself). The payloads are
    checked in one decode, each header replaced by a NUL byte, which ends any sequence:
    the text is valid exactly when every payload is.
    """
    found = _LIKE_RUNS.get(raw[pos])
    if found is None:
        return 0, 0  # a container, a long string or an extension: one step of the walk
    pattern, size = found
    run = pattern.match(raw, pos, pos + size * left)
    if run is None:
        return 0, 0  # cut short: the walk says so
    count = (run.end() - pos) // size
    if check and raw[pos] >= 0xA1:  # strings
        text = bytearray(raw[pos : run.end()])
        text[0::size] = bytes(count)
        try:
            text.decode("utf-8")
        except UnicodeDecodeError as exc:
            count = exc.start // size
    return count, count * size


def _like_runs() -> dict[int, tuple[re.Pattern[bytes], int]]:
    """Header byte -> (pattern of a run of items with that header, item size)."""
    sizes = {0xA0 + n: 1 + n for n in range(1, 32)}  # fixstr
    sizes.update(_MSGPACK_FIXED)
    return {
        head: (
            re.compile(b"(?:" + re.escape(bytes([head])) + b".{%d})++" % (size - 1), re.DOTALL),
            size,
        )
        for head, size in sizes.items()
    }


def _clean_run(raw: bytes, pos: int, n: int, parity: int, at_max_depth: bool) -> int:
    """How many of the ``n`` one-byte items at ``raw[pos]`` come before the first fault.

    A fault is an empty map or array one level deeper than the cap or, in a map, a key
    other than the empty string. ``parity`` is -1 in an array, and in a map the number of
    items already seen modulo 2 (0: the run starts with a key). The walk then reads the
    faulty item one step at a time, so that the first fault in the frame is reported.
    """
    if at_max_depth:
        run = raw[pos : pos + n]
        for container in (b"\x80", b"\x90"):
            found = run.find(container)
            if found != -1:
                n = found
                run = run[:n]
    if parity >= 0 and n:
        first_key = parity  # 0 when the run starts with a key, else 1
        keys = raw[pos + first_key : pos + n : 2]
        good = len(keys) - len(keys.lstrip(b"\xa0"))
        if good < len(keys):
            n = first_key + 2 * good
    return n


def _over_items(raw: bytes, max_items: int) -> tuple[ErrorCode, str, str | None] | None:
    """Refuse a MessagePack frame whose walk passed the item cap, if msgspec can skim it.

    msgspec skims the frame in C (skipping values, checking their structure but not their
    strings) for its top-level id, which may come after the point the walk reached. When
    it can, the frame is well formed and its refusal is known without reading the rest
    in Python. None when it cannot (the frame is malformed, has a key that is not a
    string at the top, or nests deeper than msgspec recurses): the walk then reads on.
    """
    try:
        found = _ID_DECODERS[Codec.MSGPACK].decode(raw).id
    except Exception:
        return None
    ref = found if 0 < len(found) <= _MAX_ID_LEN else None
    return ErrorCode.LIMIT_EXCEEDED, _items_message(max_items), ref


# A frame that is not a map is malformed however it goes on; no ref without a map.
_NOT_A_MAP: Final = (ErrorCode.MALFORMED, "a frame must be one object", None)


def _ref_of(obj: dict[Any, Any]) -> str | None:
    """Return the frame's id if it is a valid one, to echo in errors; never echo junk."""
    ref = obj.get("id")
    if type(ref) is str and 0 < len(ref) <= _MAX_ID_LEN:
        if not ref.isascii():
            # The standard library's parser (refused frames) lets lone surrogates through.
            try:
                ref.encode("utf-8")
            except UnicodeEncodeError:
                return None
        return ref
    return None


class _IdOnly(msgspec.Struct, gc=False):
    """A frame's ``id`` alone: msgspec skips the other keys in C."""

    id: str = ""


_ID_DECODERS: Final[
    dict[Codec, msgspec.json.Decoder[_IdOnly] | msgspec.msgpack.Decoder[_IdOnly]]
] = {
    Codec.JSON: msgspec.json.Decoder(_IdOnly),
    Codec.MSGPACK: msgspec.msgpack.Decoder(_IdOnly),
}


def frame_id(data: bytes | str, codec: Codec) -> str | None:
    """Return a frame's id, if it is a valid one, without validating the frame.

    For refusing a frame without reading it (rate limited, shutting down): msgspec reads
    only the top-level ``id`` and skips the rest in C, so the cost is that of skimming the
    bytes once. None when the frame is not one JSON object or MessagePack map with a string
    ``id`` of 1 to 64 characters. Never raises.
    """
    try:
        found = _ID_DECODERS[codec].decode(data).id  # type: ignore[arg-type]
    except Exception:
        return None
    return found if 0 < len(found) <= _MAX_ID_LEN else None


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
# Every kind of value a frame may hold.
_VALUE_KINDS: Final = _PLAIN | {int, float, list, dict}


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


def _msgpack_pairs(raw: bytes) -> int:
    """Count the map entries declared in MessagePack that msgspec has already decoded.

    Returns -1 when the frame holds an extension type, which carries opaque data a JSON
    client could never receive. A walk over the item headers, in which one match of a
    compiled regular expression (C) skips each run of items that declare no entries and
    whose size the pattern knows: only maps with entries, strings and binaries longer than
    31 bytes and extension types take a Python step, and each of those spans several bytes.
    (Counting small maps' entries inside the runs with ``findall`` or ``sub`` was measured
    slower: they make an object per item.) Only frames that do not re-encode to their own
    bytes, or that are refused, come here.
    """
    pairs = 0
    pos = 0
    end = len(raw)
    skip = _MSGPACK_SKIP_RE.match
    while True:
        match = skip(raw, pos)
        if match is not None:
            pos = match.end()
        if pos >= end:
            return pairs
        b = raw[pos]
        if 0x80 <= b <= 0x8F:
            pairs += b & 0x0F
            pos += 1
        elif b in _MSGPACK_SIZED:
            width = _MSGPACK_SIZED[b]
            length = int.from_bytes(raw[pos + 1 : pos + 1 + width], "big")
            pos += 1 + width + length
        elif b == 0xDE:
            pairs += int.from_bytes(raw[pos + 1 : pos + 3], "big")
            pos += 3
        elif b == 0xDF:
            pairs += int.from_bytes(raw[pos + 1 : pos + 5], "big")
            pos += 5
        elif b in _MSGPACK_EXT or b == 0xC1:
            return -1
        else:  # pragma: no cover - the pattern skips every other header
            pos += 1


def _msgpack_skip_pattern() -> re.Pattern[bytes]:
    """Build the pattern of a run of items that declare no map entries, by item size."""
    by_size: dict[int, list[int]] = {1: []}
    by_size[1] = [*range(0x00, 0x81), *range(0x90, 0xA1), 0xC0, 0xC2, 0xC3, *range(0xE0, 0x100)]
    for length in range(1, 32):  # fixstr
        by_size.setdefault(1 + length, []).append(0xA0 + length)
    for header, size in _MSGPACK_FIXED.items():
        by_size.setdefault(size, []).append(header)
    by_size[3].append(0xDC)  # array16: the header only; its items follow
    by_size[5].append(0xDD)  # array32
    branches = []
    for size in sorted(by_size):
        heads = b"".join(re.escape(bytes([h])) for h in sorted(by_size[size]))
        branches.append(b"[" + heads + b"]" + (b".{%d}" % (size - 1) if size > 1 else b""))
    return re.compile(b"(?:" + b"|".join(branches) + b")++", re.DOTALL)


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
# Extension headers: total item size for fixext, 0 when a length follows (ext8/16/32).
_MSGPACK_EXT: Final = {0xD4: 3, 0xD5: 4, 0xD6: 6, 0xD7: 10, 0xD8: 18, 0xC7: 0, 0xC8: 0, 0xC9: 0}
_MSGPACK_SKIP_RE: Final = _msgpack_skip_pattern()
_LIKE_RUNS: Final = _like_runs()
_ONE_ITEM_CHAIN_RE: Final = re.compile(rb"\x91+")
# Header byte -> 1 when a run of one-byte items may start there (_MSGPACK_LEAVES_RE), 2 when
# a run of like scalars may (_LIKE_RUNS), 0 when the walk takes a step: one lookup instead
# of a failed match per container.
_RUNS: Final = bytes(
    1 if _MSGPACK_LEAVES_RE.fullmatch(bytes([b])) else 2 if b in _LIKE_RUNS else 0
    for b in range(256)
)
