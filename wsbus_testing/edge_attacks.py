"""The attack suite: hostile clients against a real WebSocket edge on 127.0.0.1.

Subclass :class:`EdgeAttacks` and provide ``wsbus_serve_edge``, your edge's factory (see
:mod:`wsbus_testing.edges`, whose example subclasses this suite).

Every case runs over a real socket, with the ``websockets`` client for crafted messages
and raw TCP for hand-built frames: spoofed senders, duplicate keys, reserved types, bad
values and depth (both codecs), oversized and fragmented messages, invalid UTF-8, foreign
origins and repeated handshake headers, subprotocol offers, hand-built frames that break
RFC 6455 (each must be failed with its close code), and a flood of worst-case MessagePack
frames. After each case a fresh control client must still get an echo reply, the bus must
hold nothing but the control clients' echoes (and what a case expects to publish), and the
gateway's counters must balance (SPEC sections 3 and 4). Needs the ``websockets`` extra.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import os
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
import pytest
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed as WsClosed
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin, Subprotocol

from wsbus import ClientAddress, Gateway, MemoryBus, Stats

from .accounting import assert_balanced
from .edges import EdgeSuite, RunningEdge

__all__ = ["EdgeAttacks", "Guard"]

TIMEOUT: Final = 5.0
MAX_FRAME: Final = 64 * 1024
GUID: Final = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

# WebSocket opcodes (RFC 6455 section 5.2).
CONT: Final = 0x0
TEXT: Final = 0x1
BINARY: Final = 0x2
CLOSE: Final = 0x8
PING: Final = 0x9
PONG: Final = 0xA

ECHO: Final = b'{"type": "echo", "content": "smuggled"}'
"""A valid frame body: if a broken frame around it were accepted, it would be published."""


# -- the guard: control client, bus and counters ---------------------------------------


@dataclass
class Guard:
    """Checks that the server is unharmed after a case, and that the bus saw nothing."""

    server: RunningEdge
    gateway: Gateway
    bus: MemoryBus
    controls: dict[str, str] = field(default_factory=dict)
    """Control connection id -> the content its echo carried."""
    expected: list[tuple[str, str]] = field(default_factory=list)
    """(type, conn_id) of publishes a case means to make besides the controls'."""

    async def control(self) -> None:
        """A fresh client gets an ack and an echo reply stamped with its own sender."""
        async with asyncio.timeout(TIMEOUT):
            async with ws_connect(self.server.url) as ws:
                welcome = msgspec.json.decode(await ws.recv())
                assert welcome["type"] == "wsbus.welcome", welcome
                conn_id: str = welcome["content"]["conn_id"]
                token = f"control-{len(self.controls)}"
                self.controls[conn_id] = token
                await ws.send(
                    msgspec.json.encode({"type": "echo", "content": token, "id": token}).decode()
                )
                ack = msgspec.json.decode(await ws.recv())
                assert ack["type"] == "wsbus.ack" and ack["content"] == {"ref": token}, ack
                reply = msgspec.json.decode(await ws.recv())
                assert reply["type"] == "echo.reply", reply
                assert reply["reply_to"] == token
                assert reply["content"]["content"] == token
                assert reply["content"]["sender"]["conn_id"] == conn_id

    async def settle(self) -> Stats:
        """Wait until every connection has closed and been counted."""
        async with asyncio.timeout(TIMEOUT):
            while True:
                stats = self.gateway.stats()
                closed = sum(stats.closes_by_code.values())
                if (
                    self.gateway.open_connections == 0
                    and stats.frames_in_flight == 0
                    and closed == stats.connections_total + stats.connections_refused
                ):
                    return stats
                await asyncio.sleep(0.01)

    def check_bus(self) -> None:
        """The bus holds the controls' echoes, as sent, and what the case expected."""
        seen: list[tuple[str, str]] = []
        for envelope in self.bus.published:
            assert isinstance(envelope.sender, ClientAddress), envelope
            conn_id = envelope.sender.conn_id
            if conn_id in self.controls:
                assert envelope.type == "echo", envelope
                assert envelope.content == self.controls[conn_id], envelope
            seen.append((envelope.type, conn_id))
        wanted = [("echo", c) for c in self.controls] + self.expected
        assert sorted(seen) == sorted(wanted)

    async def finish(self) -> Stats:
        """Control client, settle, bus check and the counter identities; the stats."""
        await self.control()
        stats = await self.settle()
        self.check_bus()
        assert_balanced(stats)
        assert stats.connections == 0
        return stats


# -- helpers over the websockets client -------------------------------------------------


@contextlib.asynccontextmanager
async def client(url: str, **kwargs: Any) -> AsyncIterator[ClientConnection]:
    """A ``websockets`` client connection, the whole of its use bounded in time."""
    async with asyncio.timeout(TIMEOUT), ws_connect(url, **kwargs) as ws:
        yield ws


async def _next(ws: ClientConnection, *, msgpack: bool = False) -> dict[str, Any]:
    """The next frame from the gateway, in the session's codec and matching frame type."""
    async with asyncio.timeout(TIMEOUT):
        data = await ws.recv()
    decoded: dict[str, Any]
    if msgpack:
        assert isinstance(data, bytes), data
        decoded = msgspec.msgpack.decode(data)
    else:
        assert isinstance(data, str), data
        decoded = msgspec.json.decode(data)
    return decoded


async def _welcome(ws: ClientConnection, *, msgpack: bool = False) -> dict[str, Any]:
    welcome = await _next(ws, msgpack=msgpack)
    assert welcome["type"] == "wsbus.welcome", welcome
    return welcome


def _assert_error(frame: dict[str, Any], code: str, ref: str | None = None) -> None:
    assert frame["type"] == "wsbus.error", frame
    content = frame["content"]
    assert content["code"] == code, frame
    assert content["retry"] is False
    assert content.get("ref") == ref
    message = content["message"]
    # Short, and nothing of the server's insides.
    assert isinstance(message, str) and 0 < len(message) < 120, message
    assert "Traceback" not in message and ".py" not in message and "msgspec" not in message


async def _assert_still_open(ws: ClientConnection, *, msgpack: bool = False) -> None:
    """The gateway still reads this connection: a frame nobody handles gets no_route."""
    probe = {"type": "nobody.handles.this", "id": "probe"}
    await ws.send(msgspec.msgpack.encode(probe) if msgpack else msgspec.json.encode(probe).decode())
    _assert_error(await _next(ws, msgpack=msgpack), "no_route", "probe")


async def _assert_closed(ws: ClientConnection, code: int) -> None:
    """Read until the server closes; it must close with ``code``."""
    with pytest.raises(WsClosed) as info:  # noqa: PT012 - read until the close
        async with asyncio.timeout(TIMEOUT):
            while True:
                await ws.recv()
    assert info.value.rcvd is not None, info.value
    assert info.value.rcvd.code == code, info.value


# -- raw frames ---------------------------------------------------------------------------


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bool = True,
    length: int | None = None,
) -> bytes:
    """Build one client frame by hand.

    Args:
        opcode: the 4-bit opcode, valid or not.
        payload: the unmasked payload.
        fin: the FIN bit.
        rsv: the three RSV bits as a number 0-7 (RSV1 = 4, RSV2 = 2, RSV3 = 1).
        mask: set the MASK bit and mask the payload with a random 4-byte key.
        length: the payload length to declare, when it should differ from the payload's.
    """
    head = bytearray([(0x80 if fin else 0) | (rsv & 7) << 4 | (opcode & 0xF)])
    n = len(payload) if length is None else length
    mask_bit = 0x80 if mask else 0
    if n < 126:
        head.append(mask_bit | n)
    elif n < 1 << 16:
        head.append(mask_bit | 126)
        head += struct.pack("!H", n)
    else:
        head.append(mask_bit | 127)
        head += struct.pack("!Q", n)
    if not mask:
        return bytes(head) + payload
    key = os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes(head) + key + masked


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


@dataclass
class Raw:
    """A raw TCP WebSocket client after a valid handshake and the welcome frame."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    welcome: dict[str, Any]

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        async with asyncio.timeout(TIMEOUT):
            await self.writer.drain()

    async def read_frame(self) -> tuple[bool, int, bytes]:
        """One server frame: (FIN, opcode, payload). Server frames are never masked."""
        async with asyncio.timeout(TIMEOUT):
            b0, b1 = await self.reader.readexactly(2)
            assert b0 & 0x70 == 0, f"the server set RSV bits: {b0:#x}"
            assert b1 & 0x80 == 0, "the server masked a frame"
            n = b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
            payload = await self.reader.readexactly(n)
        return bool(b0 & 0x80), b0 & 0x0F, payload

    async def read_close(self) -> tuple[int, str]:
        """Read up to the server's close frame; return its code and reason, then see EOF."""
        while True:
            _, opcode, payload = await self.read_frame()
            if opcode == CLOSE:
                break
            assert opcode in (PONG, TEXT), (opcode, payload)
        assert len(payload) >= 2, payload
        (code,) = struct.unpack("!H", payload[:2])
        # The server drops the TCP connection right after its close frame (a reset when
        # it left bytes unread).
        async with asyncio.timeout(TIMEOUT):
            with contextlib.suppress(ConnectionResetError):
                while await self.reader.read(4096):
                    pass
        return code, payload[2:].decode()

    async def aclose(self) -> None:
        self.writer.close()
        try:
            async with asyncio.timeout(TIMEOUT):
                await self.writer.wait_closed()
        except (ConnectionError, TimeoutError):
            pass


async def raw_upgrade(
    port: int, extra_headers: bytes = b""
) -> tuple[bytes, asyncio.StreamReader, asyncio.StreamWriter]:
    """Send an HTTP/1.1 upgrade request with ``extra_headers``; return the response head.

    On a 101 the Sec-WebSocket-Accept header is checked against the key sent.
    """
    async with asyncio.timeout(TIMEOUT):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                "GET / HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{port}\r\n"
                "Upgrade: websocket\r\n"
                "Connection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n"
            ).encode()
            + extra_headers
            + b"\r\n"
        )
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
    if head.startswith(b"HTTP/1.1 101 "):
        accept = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
        headers = {
            name.lower(): value
            for name, _, value in (
                line.partition(": ") for line in head.decode().split("\r\n")[1:] if line
            )
        }
        assert headers["sec-websocket-accept"] == accept, head
    return head, reader, writer


async def raw_connect(port: int, extra_headers: bytes = b"") -> Raw:
    """Open a raw TCP connection, do a valid HTTP/1.1 upgrade, and read the welcome."""
    head, reader, writer = await raw_upgrade(port, extra_headers)
    raw = Raw(reader, writer, {})
    if not head.startswith(b"HTTP/1.1 101 "):
        await raw.aclose()
        raise AssertionError(head)
    fin, opcode, payload = await raw.read_frame()
    assert fin and opcode == TEXT, (fin, opcode, payload)
    raw.welcome = msgspec.json.decode(payload)
    assert raw.welcome["type"] == "wsbus.welcome", raw.welcome
    return raw


# -- 1 and 2: spoofed senders, duplicates, reserved types, bad values, depth -------------

DEPTH_33: Final = '{"type": "echo", "content": ' + "[" * 32 + "]" * 32 + "}"
"""The frame object is level 1: 32 arrays inside it make depth 33."""

JSON_REFUSALS: Final = [
    # Spoofed senders and look-alike keys.
    ('{"type": "echo", "sender": "service:auth"}', "unknown_field"),
    ('{"type": "echo", "Sender": {"type": "service", "name": "auth"}}', "unknown_field"),
    ('{"type": "echo", "sender ": "x"}', "unknown_field"),
    ('{"type": "echo", "\u0455ender": "x"}', "unknown_field"),  # Cyrillic dze, raw UTF-8
    ('{"type": "echo", "\\u0455ender": "x"}', "unknown_field"),  # the same, JSON-escaped
    ('{"type": "echo", "sender\\u0000": "x"}', "unknown_field"),
    ('{"type": "echo", "from": "echo"}', "unknown_field"),
    ('{"type": "echo", "id": "r1", "sender": "service:auth"}', "unknown_field"),
    # Duplicate keys: msgspec keeps the last one, so each would smuggle something.
    ('{"type": "echo", "type": "wsbus.x"}', "malformed"),
    ('{"type": "wsbus.ack", "type": "echo"}', "malformed"),
    ('{"type": "echo", "typ\\u0065": "wsbus.x"}', "malformed"),
    ('{"type": "echo", "content": "a:b", "content": 1}', "malformed"),
    ('{"type": "echo", "content": {"a": 1, "a": 2}}', "malformed"),
    # Reserved types, also spelled with an escape.
    ('{"type": "wsbus.welcome"}', "reserved_type"),
    ('{"type": "wsbus.ack", "content": {"ref": "x"}}', "reserved_type"),
    ('{"type": "wsbus.auth", "content": {"token": "t"}}', "reserved_type"),
    ('{"type": "\\u0077sbus.join", "id": "r2"}', "reserved_type"),
    # Lone surrogates.
    ('{"type": "echo", "content": "\\ud800"}', "bad_value"),
    ('{"type": "echo", "content": "\\uDC00"}', "bad_value"),
    ('{"type": "echo", "content": "\\ud800\\u0041"}', "bad_value"),
    ('{"type": "echo", "content": "\\udc00\\ud800"}', "bad_value"),
    ('{"type": "echo", "content": {"\\udfff": 1}}', "bad_value"),
    # Non-finite and huge numbers. NaN and Infinity are not JSON at all.
    ('{"type": "echo", "content": NaN}', "malformed"),
    ('{"type": "echo", "content": Infinity}', "malformed"),
    ('{"type": "echo", "content": -Infinity}', "malformed"),
    ('{"type": "echo", "content": 1e999}', "bad_value"),
    ('{"type": "echo", "content": -1e999}', "bad_value"),
    ('{"type": "echo", "content": ' + "9" * 5000 + "}", "bad_value"),
    ('{"type": "echo", "content": ' + str(2**64) + "}", "bad_value"),
    ('{"type": "echo", "content": ' + str(2**53) + "}", "bad_value"),
    ('{"type": "echo", "content": ' + str(-(2**53)) + "}", "bad_value"),
    # Nesting: one level too deep, and deep enough to blow a recursive parser's stack
    # (20,000 levels is about 40 KB: under the 64 KiB frame cap, so no close).
    (DEPTH_33, "limit_exceeded"),
    ('{"type": "echo", "content": ' + '{"a": ' * 32 + "1" + "}" * 32 + "}", "limit_exceeded"),
    ('{"type": "echo", "content": ' + "[" * 20_000 + "]" * 20_000 + "}", "limit_exceeded"),
    # Not one object.
    ('{"type": "echo"} {"type": "echo"}', "malformed"),
    ("\ufeff" + '{"type": "echo"}', "malformed"),
    ('[{"type": "echo"}]', "malformed"),
]


def _ref(raw: str) -> str | None:
    for ref in ("r1", "r2"):
        if f'"id": "{ref}"' in raw:
            return ref
    return None


# -- 3: frame size ---------------------------------------------------------------------


def _frame_of(size: int, *, key: str = "content") -> str:
    head, tail = '{"type": "echo", "' + key + '": "', '"}'
    text = head + "x" * (size - len(head) - len(tail)) + tail
    assert len(text.encode()) == size
    return text


def _chunks(text: str, n: int = 8192) -> list[str]:
    return [text[i : i + n] for i in range(0, len(text), n)]


# -- 4: UTF-8 and frame type ------------------------------------------------------------


# -- 5: MessagePack --------------------------------------------------------------------

_MP: Final = b"\x82\xa4type\xa4echo\xa7content"
"""A two-key map, ``type: echo``, then the key ``content``: its value follows."""

MSGPACK_REFUSALS: Final = [
    (b"\x82\xa4type\xa4echo\xa7content\xd6\xff\x00\x00\x00\x01", "bad_value"),  # timestamp
    (_MP + b"\xd4\x05\x00", "bad_value"),  # fixext1, application type 5
    (_MP + b"\xc7\x01\x05\x00", "bad_value"),  # ext8
    (b"\x82\xa4type\xa4ec", "malformed"),  # truncated inside a string
    (_MP, "malformed"),  # truncated before a value
    (_MP + b"\xc1", "malformed"),  # the never-used byte
    (_MP + b"\xc0\xc0", "malformed"),  # trailing data
    (b"\x92\xa4type\xa4echo", "malformed"),  # an array, not a map
    (b"\x82\xa4type\xa4echo\xa4type\xa9wsbus.ack", "malformed"),  # duplicate key
    (b"\x82\xa4type\xa9wsbus.ack\xa4type\xa4echo", "malformed"),  # duplicate key
    (b"\xde\x00\x02\xa4type\xa4echo\xd9\x04type\xa4echo", "malformed"),  # dup, other widths
    (b"\x82\xa4type\xa4echo\xa6sender\xa1x", "unknown_field"),
    (b"\x81\xa4type\xa9wsbus.ack", "reserved_type"),
    (b"\x82\xa4type\xa4echo\xc4\x06sender\xc0", "invalid_message"),  # a bytes key
    (_MP + b"\xcb" + struct.pack("!d", float("nan")), "bad_value"),
    (_MP + b"\xca" + struct.pack("!f", float("inf")), "bad_value"),
    (_MP + b"\xcf" + b"\xff" * 8, "bad_value"),  # 2**64 - 1
    (_MP + b"\xd3" + struct.pack("!q", -(2**63)), "bad_value"),
    (_MP + b"\xa3\xed\xa0\x80", "bad_value"),  # a surrogate encoded as UTF-8 in a str
    (_MP + b"\x91" * 32 + b"\xc0", "limit_exceeded"),  # depth 33
    (_MP + b"\x91" * 20_000 + b"\xc0", "limit_exceeded"),
]


# -- 6: origins ------------------------------------------------------------------------

OWN: Final = "http://127.0.0.1:{port}"


# -- 7: subprotocols -------------------------------------------------------------------


# -- 8: hand-built frames (Autobahn categories) ------------------------------------------


def _fragment_then(second: bytes) -> bytes:
    return frame(TEXT, b'{"type": "echo", ', fin=False) + second


RAW_ATTACKS: Final[list[tuple[str, bytes, int]]] = [
    # 3.x: reserved bits, with no extension negotiated (compression is off: RSV1 too).
    ("rsv1-text", frame(TEXT, ECHO, rsv=4), 1002),
    ("rsv2-text", frame(TEXT, ECHO, rsv=2), 1002),
    ("rsv3-text", frame(TEXT, ECHO, rsv=1), 1002),
    ("rsv-all-ping", frame(PING, b"hi", rsv=7), 1002),
    # A client frame must be masked.
    ("unmasked-text", frame(TEXT, ECHO, mask=False), 1002),
    # 4.x: reserved opcodes, data (3-7) and control (0xB-0xF).
    *((f"opcode-{op:#x}", frame(op, ECHO), 1002) for op in (3, 4, 5, 6, 7)),
    *((f"opcode-{op:#x}", frame(op, b"x"), 1002) for op in (0xB, 0xC, 0xD, 0xE, 0xF)),
    # 2.x: control frames are at most 125 bytes and never fragmented.
    ("ping-126", frame(PING, b"p" * 126), 1002),
    ("pong-126", frame(PONG, b"p" * 126), 1002),
    ("close-126", frame(CLOSE, close_payload(1000, b"r" * 124)), 1002),
    ("ping-fin0", frame(PING, b"hi", fin=False), 1002),
    # 5.x: fragmentation.
    ("lone-continuation", frame(CONT, ECHO), 1002),
    ("text-inside-fragments", _fragment_then(frame(TEXT, ECHO)), 1002),
    ("binary-inside-fragments", _fragment_then(frame(BINARY, ECHO)), 1002),
    # 7.x: close frames.
    ("close-1-byte", frame(CLOSE, b"\x03"), 1002),
    *(
        (f"close-code-{code}", frame(CLOSE, close_payload(code)), 1002)
        for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535)
    ),
    # Not 1002: websockets' Close.parse decodes the reason strictly, and Protocol.parse
    # turns the UnicodeDecodeError into fail(1007), the code RFC 6455 section 7.4.1 gives
    # to data inconsistent with its type (non-UTF-8 where text is due), as for text frames.
    ("close-reason-bad-utf8", frame(CLOSE, close_payload(1000, b"\xce\xba\xe1\xbd\xb9\xff")), 1007),
    # A 64-bit length far over the cap: refused from the header, before any payload.
    ("length-2**63-1", frame(TEXT, b"", length=2**63 - 1), 1009),
]


# -- 5b: validation cost: a flood of worst-case MessagePack frames ----------------------

_FLOODER: Final = """
import sys, threading, time
from websockets.sync.client import connect

url, seconds = sys.argv[1], float(sys.argv[2])
# A valid frame of about 64 KiB with as many containers as the item cap lets through
# (4096 values: type, content, 4092 empty arrays and a string that fills the rest).
arrays = 4092
pad = 64 * 1024 - 64 - arrays
frame = b"\\x82\\xa4type\\xaenobody.handles\\xa7content\\xdc" + (arrays + 1).to_bytes(2, "big")
frame += b"\\x90" * arrays + b"\\xdb" + pad.to_bytes(4, "big") + b"x" * pad
with connect(url, subprotocols=["wsbus.v1.msgpack"], max_size=None) as ws:
    ws.recv()  # the welcome
    answers = []
    threading.Thread(target=lambda: [answers.append(m) for m in ws], daemon=True).start()
    start = time.monotonic()
    sent = 0
    while time.monotonic() - start < seconds:
        ws.send(frame)
        sent += 1
        # At the rate limit (100 a second): never ahead of it.
        time.sleep(max(0.0, start + sent / 100 - time.monotonic()))
    deadline = time.monotonic() + 30
    while len(answers) < sent and time.monotonic() < deadline:
        time.sleep(0.05)
    print(sent, len(answers), flush=True)
"""


async def _echo_round_trips(ws: ClientConnection, n: int, tag: str) -> list[float]:
    """Send ``n`` echo requests one after the other; the seconds each took to come back."""
    loop = asyncio.get_running_loop()
    times = []
    for i in range(n):
        ref = f"{tag}-{i}"
        started = loop.time()
        await ws.send(msgspec.json.encode({"type": "echo", "content": ref, "id": ref}).decode())
        while True:
            frame = await _next(ws)
            if frame["type"] == "echo.reply":
                assert frame["reply_to"] == ref, frame
                break
        times.append(loop.time() - started)
        await asyncio.sleep(0.01)
    return times


class EdgeAttacks(EdgeSuite):
    """Hostile clients against the edge under test; provide ``wsbus_serve_edge``.

    Every case runs over a real socket; after each, a fresh control client must still get
    an echo reply, the bus must hold nothing but the control clients' echoes (and what a
    case expects to publish), and the gateway's counters must balance.
    """

    @pytest.fixture
    def guard(
        self, wsbus_server: RunningEdge, wsbus_gateway: Gateway, wsbus_bus: MemoryBus
    ) -> Guard:
        """The checks each case ends with."""
        return Guard(wsbus_server, wsbus_gateway, wsbus_bus)

    @pytest.mark.parametrize(
        ("raw", "code"),
        JSON_REFUSALS,
        ids=[f"{i:02d}-{code}" for i, (_, code) in enumerate(JSON_REFUSALS)],
    )
    async def test_json_frame_is_refused_and_the_connection_stays_open(
        self, guard: Guard, raw: str, code: str
    ) -> None:
        """A hostile JSON frame gets its error code; the connection stays open; none published."""
        assert len(raw.encode()) < MAX_FRAME
        async with client(guard.server.url) as ws:
            await _welcome(ws)
            await ws.send(raw)
            _assert_error(await _next(ws), code, _ref(raw))
            await _assert_still_open(ws)
        stats = await guard.finish()
        assert stats.rejected_by_code == {code: 1, "no_route": 1}
        assert stats.frames_lost == 0

    async def test_one_level_less_deep_is_accepted(self, guard: Guard) -> None:
        """A frame one level under the depth limit is published."""
        # The boundary under DEPTH_33: the same frame with 31 arrays is published as it is.
        raw = '{"type": "echo", "content": ' + "[" * 31 + "]" * 31 + "}"
        async with client(guard.server.url) as ws:
            welcome = await _welcome(ws)
            await ws.send(raw)
            reply = await _next(ws)
            assert reply["type"] == "echo.reply", reply
            guard.expected.append(("echo", welcome["content"]["conn_id"]))
        await guard.finish()

    @pytest.mark.parametrize("fragmented", [False, True], ids=["one-frame", "fragments"])
    async def test_one_byte_over_64k_closes_1009(self, guard: Guard, fragmented: bool) -> None:
        """A message one byte over the cap (one frame, or fragments together) closes with 1009."""
        text = _frame_of(MAX_FRAME + 1)
        async with client(guard.server.url) as ws:
            await _welcome(ws)
            # The server may close before the last fragment is out.
            with contextlib.suppress(WsClosed):
                await ws.send(_chunks(text) if fragmented else text)
            await _assert_closed(ws, 1009)
        stats = await guard.finish()
        assert stats.closes_by_code.get(1009) == 1
        # Refused by the transport: the gateway never read a byte of it.
        assert stats.frames_received == len(guard.controls)

    @pytest.mark.parametrize("fragmented", [False, True], ids=["one-frame", "fragments"])
    async def test_exactly_64k_is_read_not_closed(self, guard: Guard, fragmented: bool) -> None:
        """A message of exactly the cap is read, not closed."""
        # 65,536 bytes is within both the transport's limit and the gateway's frame cap: the
        # frame is decoded in full. A spoofed sender at that size is refused as any other...
        async with client(guard.server.url) as ws:
            welcome = await _welcome(ws)
            spoof = _frame_of(MAX_FRAME, key="sender")
            await ws.send(_chunks(spoof) if fragmented else spoof)
            _assert_error(await _next(ws), "unknown_field")
            # ... and a valid echo of that size is published and answered.
            text = _frame_of(MAX_FRAME)
            await ws.send(_chunks(text) if fragmented else text)
            reply = await _next(ws)
            assert reply["type"] == "echo.reply", reply["type"]
            assert reply["content"]["content"] == text[len('{"type": "echo", "content": "') : -2]
            conn_id: str = welcome["content"]["conn_id"]
            assert reply["content"]["sender"]["conn_id"] == conn_id
            guard.expected.append(("echo", conn_id))
        stats = await guard.finish()
        assert 1009 not in stats.closes_by_code
        assert stats.rejected_by_code == {"unknown_field": 1}

    @pytest.mark.parametrize(
        "payload",
        [
            b"\xff\xfe",
            b'{"type": "echo", "content": "\xed\xa0\x80"}',  # a surrogate encoded as UTF-8
            b'{"type": "echo", "content": "\xc0\xaf"}',  # an overlong "/"
        ],
        ids=["ff-fe", "utf8-surrogate", "overlong"],
    )
    async def test_invalid_utf8_in_a_text_frame_closes_1007(
        self, guard: Guard, payload: bytes
    ) -> None:
        """Invalid UTF-8 in a text message closes with 1007."""
        raw = await raw_connect(guard.server.port)
        try:
            await raw.send(frame(TEXT, payload))
            code, _ = await raw.read_close()
            assert code == 1007
        finally:
            await raw.aclose()
        stats = await guard.finish()
        assert stats.closes_by_code.get(1007) == 1
        assert stats.frames_received == len(guard.controls)

    async def test_frames_read_together_keep_their_order_up_to_invalid_utf8(
        self, guard: Guard
    ) -> None:
        """Whole and fragmented messages in one read are taken in order; bad UTF-8 ends it.

        An edge may take a whole frame it has read already by a shorter way than a
        fragmented one: the order must not change, and what follows an invalid text in
        the same read is never taken.
        """
        raw = await raw_connect(guard.server.port)
        try:
            conn_id = raw.welcome["content"]["conn_id"]

            def echo(content: str) -> bytes:
                return b'{"type": "echo", "content": "' + content.encode() + b'"}'

            second = echo("b")
            await raw.send(
                frame(TEXT, echo("a"))
                + frame(TEXT, second[:10], fin=False)
                + frame(CONT, second[10:20], fin=False)
                + frame(CONT, second[20:])
                + frame(TEXT, echo("c"))
                + frame(TEXT, b'{"type": "echo", "content": "\xff"}')
                + frame(TEXT, echo("d"))
            )
            code, _ = await raw.read_close()
            assert code == 1007
        finally:
            await raw.aclose()
        guard.expected += [("echo", conn_id)] * 3
        stats = await guard.finish()
        taken = [
            envelope.content
            for envelope in guard.bus.published
            if isinstance(envelope.sender, ClientAddress) and envelope.sender.conn_id == conn_id
        ]
        assert taken == ["a", "b", "c"]
        assert stats.closes_by_code.get(1007) == 1

    async def test_binary_frame_on_a_json_session_closes_1003(self, guard: Guard) -> None:
        """A binary frame on a JSON session closes with 1003."""
        async with client(guard.server.url) as ws:
            await _welcome(ws)
            await ws.send(b'{"type": "echo", "content": "smuggled"}')
            await _assert_closed(ws, 1003)
        stats = await guard.finish()
        assert stats.closes_by_code.get(1003) == 1
        assert stats.frames_lost == 1

    async def test_text_frame_on_a_msgpack_session_closes_1003(self, guard: Guard) -> None:
        """A text frame on a MessagePack session closes with 1003."""
        async with client(guard.server.url, subprotocols=[Subprotocol("wsbus.v1.msgpack")]) as ws:
            welcome = await _welcome(ws, msgpack=True)
            assert welcome["content"]["codec"] == "wsbus.v1.msgpack"
            await ws.send('{"type": "echo", "content": "smuggled"}')
            await _assert_closed(ws, 1003)
        stats = await guard.finish()
        assert stats.closes_by_code.get(1003) == 1
        assert stats.frames_lost == 1

    @pytest.mark.parametrize(
        ("raw", "code"),
        MSGPACK_REFUSALS,
        ids=[f"{i:02d}-{code}" for i, (_, code) in enumerate(MSGPACK_REFUSALS)],
    )
    async def test_msgpack_frame_is_refused_and_the_connection_stays_open(
        self, guard: Guard, raw: bytes, code: str
    ) -> None:
        """A hostile MessagePack frame gets its error code; the connection stays open."""
        async with client(guard.server.url, subprotocols=[Subprotocol("wsbus.v1.msgpack")]) as ws:
            await _welcome(ws, msgpack=True)
            await ws.send(raw)
            _assert_error(await _next(ws, msgpack=True), code)
            await _assert_still_open(ws, msgpack=True)
        stats = await guard.finish()
        assert stats.rejected_by_code == {code: 1, "no_route": 1}

    @pytest.mark.parametrize(
        "origin",
        [
            "https://evil.example",
            "null",
            "file://",
            "FILE:///etc/passwd",
            "http://localhost:{port}",
            "http://127.0.0.1:{port}.evil.example",
            "http://127.0.0.1:{port}@evil.example",
            "ws://127.0.0.1:{port}",
        ],
    )
    async def test_foreign_origin_gets_403_before_the_upgrade(
        self, guard: Guard, origin: str
    ) -> None:
        """A foreign origin gets 403 before the upgrade; the gateway never sees it."""
        value = Origin(origin.format(port=guard.server.port))
        with pytest.raises(InvalidStatus) as info:
            async with client(guard.server.url, origin=value):
                pass
        assert info.value.response.status_code == 403
        assert b"origin not allowed" in info.value.response.body
        stats = await guard.finish()
        # Refused before the upgrade: the gateway never saw it.
        assert stats.connections_total == len(guard.controls)

    @pytest.mark.parametrize(
        ("headers", "allowed"),
        [
            pytest.param(
                b"Origin: http://127.0.0.1:{port}\r\nOrigin: https://evil.example\r\n",
                {400, 403},
                id="origin-twice",
            ),
            pytest.param(
                b"Host: 127.0.0.1:{port}\r\nOrigin: http://127.0.0.1:{port}\r\n",
                {400, 403},
                id="host-twice",
            ),
            pytest.param(
                b"Upgrade: websocket\r\n",
                {400},
                id="upgrade-twice",
            ),
            pytest.param(
                b"Authorization: Bearer a\r\nAuthorization: Bearer b\r\n",
                {400},
                id="authorization-twice",
            ),
            pytest.param(
                b"Cookie: a=1\r\nCookie: wsbus_token=b\r\n",
                {400},
                id="cookie-twice",
            ),
            pytest.param(
                b"Sec-WebSocket-Protocol: wsbus.v1.json\r\nSec-WebSocket-Protocol: chat\r\n",
                {101},
                id="subprotocol-twice",
            ),
            pytest.param(b'Cookie: wsbus_token="\\\r\n', {101}, id="unparsable-cookie"),
        ],
    )
    async def test_repeated_or_odd_handshake_header_is_not_a_server_error(
        self, guard: Guard, caplog: pytest.LogCaptureFixture, headers: bytes, allowed: set[int]
    ) -> None:
        """A header sent twice is refused with a 4xx or ignored: never a 500, never a 1011."""
        port = guard.server.port
        head, reader, writer = await raw_upgrade(
            port, headers.replace(b"{port}", str(port).encode())
        )
        raw = Raw(reader, writer, {})
        try:
            status = int(head.split(b" ", 2)[1])
            assert status in allowed, head
            if status == 101:
                # Upgraded: the first frame must be the welcome, not a close.
                fin, opcode, payload = await raw.read_frame()
                assert (fin, opcode) == (True, TEXT), (opcode, payload)
                assert msgspec.json.decode(payload)["type"] == "wsbus.welcome"
                await raw.send(frame(CLOSE, close_payload(1000)))
                assert (await raw.read_close())[0] == 1000
        finally:
            await raw.aclose()
        await guard.finish()
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors == [], [r.getMessage() for r in errors]

    @pytest.mark.parametrize("origin", [None, OWN], ids=["no-origin", "own-origin"])
    async def test_missing_and_own_origin_are_accepted(
        self, guard: Guard, origin: str | None
    ) -> None:
        """No Origin (a program) and the server's own origin are upgraded."""
        value = None if origin is None else Origin(origin.format(port=guard.server.port))
        async with client(guard.server.url, origin=value) as ws:
            welcome = await _welcome(ws)
            assert welcome["content"]["codec"] == "wsbus.v1.json"
            await _assert_still_open(ws)
        await guard.finish()

    @pytest.mark.parametrize("wsbus_edge_settings", [{"allowed_origins": ("null",)}])
    async def test_null_origin_accepted_when_listed(self, guard: Guard) -> None:
        """The origin ``null`` is upgraded only when listed, and lets in nothing else."""
        async with client(guard.server.url, origin=Origin("null")) as ws:
            await _welcome(ws)
            await _assert_still_open(ws)
        await guard.control()
        # Listing "null" lets in nothing else.
        for origin in ("https://evil.example", "file://"):
            with pytest.raises(InvalidStatus) as info:
                async with client(guard.server.url, origin=Origin(origin)):
                    pass
            assert info.value.response.status_code == 403
            await guard.control()
        await guard.finish()

    async def test_no_subprotocol_gets_json(self, guard: Guard) -> None:
        """No subprotocol offered: the session speaks JSON."""
        async with client(guard.server.url) as ws:
            assert ws.subprotocol is None
            welcome = await _welcome(ws)
            assert welcome["content"]["codec"] == "wsbus.v1.json"
        await guard.finish()

    @pytest.mark.parametrize(
        "offered",
        [["chat"], ["wsbus.v1.JSON"], ["wsbus.v2.json", "mqtt"], ["wsbus.token.abc", "chat"]],
        ids=["chat", "case", "v2", "token-and-chat"],
    )
    async def test_only_unknown_subprotocols_get_400(
        self, guard: Guard, offered: list[str]
    ) -> None:
        """An offer of only unknown subprotocols gets 400."""
        with pytest.raises(InvalidStatus) as info:
            async with client(guard.server.url, subprotocols=[Subprotocol(p) for p in offered]):
                pass
        assert info.value.response.status_code == 400
        stats = await guard.finish()
        assert stats.connections_total == len(guard.controls)

    async def test_unknown_then_msgpack_gets_msgpack(self, guard: Guard) -> None:
        """An unknown subprotocol before ``wsbus.v1.msgpack`` gets MessagePack."""
        offered = [Subprotocol("chat"), Subprotocol("wsbus.v1.msgpack")]
        async with client(guard.server.url, subprotocols=offered) as ws:
            assert ws.subprotocol == "wsbus.v1.msgpack"
            welcome = await _welcome(ws, msgpack=True)
            assert welcome["content"]["codec"] == "wsbus.v1.msgpack"
            await _assert_still_open(ws, msgpack=True)
        await guard.finish()

    @pytest.mark.parametrize(
        ("data", "code"),
        [(data, code) for _, data, code in RAW_ATTACKS],
        ids=[name for name, _, _ in RAW_ATTACKS],
    )
    async def test_raw_protocol_violation_is_failed(
        self, guard: Guard, data: bytes, code: int
    ) -> None:
        """A hand-built frame that breaks RFC 6455 fails the connection with its close code."""
        raw = await raw_connect(guard.server.port)
        try:
            await raw.send(data)
            got, _ = await raw.read_close()
            assert got == code
        finally:
            await raw.aclose()
        stats = await guard.finish()
        assert stats.closes_by_code.get(code) == 1, stats.closes_by_code
        # The transport failed the connection: not one frame reached the gateway.
        assert stats.frames_received == stats.frames_published == len(guard.controls)
        assert stats.frames_rejected == stats.frames_lost == 0

    async def test_raw_helpers_speak_valid_websocket(self, guard: Guard) -> None:
        """The frame builder is right: the battery above fails for its one fault, not others."""
        raw = await raw_connect(guard.server.port)
        try:
            conn_id: str = raw.welcome["content"]["conn_id"]
            # A 125-byte ping (the largest allowed) is answered with the same payload.
            await raw.send(frame(PING, b"p" * 125))
            assert await raw.read_frame() == (True, PONG, b"p" * 125)
            # A fragmented message with a 16-bit length, a character split across fragments,
            # and a ping between fragments.
            body = ('{"type": "echo", "id": "raw", "content": "' + "y" * 200 + 'é"}').encode()
            cut = body.index("é".encode()) + 1
            await raw.send(frame(TEXT, body[:cut], fin=False))
            await raw.send(frame(PING, b"mid"))
            await raw.send(frame(CONT, body[cut:]))
            assert await raw.read_frame() == (True, PONG, b"mid")
            _, opcode, payload = await raw.read_frame()
            ack = msgspec.json.decode(payload)
            assert (
                opcode == TEXT and ack["type"] == "wsbus.ack" and ack["content"] == {"ref": "raw"}
            )
            _, opcode, payload = await raw.read_frame()
            reply = msgspec.json.decode(payload)
            assert reply["type"] == "echo.reply" and reply["content"]["content"] == "y" * 200 + "é"
            guard.expected.append(("echo", conn_id))
            # A clean close is echoed with the same code.
            await raw.send(frame(CLOSE, close_payload(1000, b"bye")))
            assert await raw.read_close() == (1000, "bye")
        finally:
            await raw.aclose()
        stats = await guard.finish()
        assert stats.closes_by_code.get(1000, 0) >= 1

    async def test_a_flood_of_worst_case_msgpack_frames_leaves_other_clients_served(
        self,
        guard: Guard,
    ) -> None:
        """A flood of worst-case MessagePack frames leaves another client's echoes served."""
        # Another process, within its rate limit (100 frames a second), sends 64 KiB
        # MessagePack frames of empty arrays, the most containers per byte, faster than this
        # machine may read them. Meanwhile another client's echo round trips keep coming back:
        # each waits for a few of the flood's frames (an echo takes a few turns of the event
        # loop), never for the whole backlog. The yardstick is measured here and now: the
        # server's time per flood frame while the flood lasts.
        import sys

        loop = asyncio.get_running_loop()
        async with asyncio.timeout(90), ws_connect(guard.server.url) as echo:
            welcome = await _welcome(echo)
            conn_id = welcome["content"]["conn_id"]
            control = await _echo_round_trips(echo, 20, "control")
            flooder = await asyncio.create_subprocess_exec(
                sys.executable, "-c", _FLOODER, guard.server.url, "8",
                stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            try:
                # Measure once the flood is under way: its frames are being read.
                first = guard.gateway.stats().frames_received
                while guard.gateway.stats().frames_received < first + 20:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
                started, received = loop.time(), guard.gateway.stats().frames_received
                attacked = await _echo_round_trips(echo, 25, "attacked")
                elapsed = loop.time() - started
                flood_frames = guard.gateway.stats().frames_received - received - 25
                # The yardstick holds only if the flood lasted the whole time.
                assert flooder.returncode is None, "the flood ended before the echoes did"
                out, _ = await asyncio.wait_for(flooder.communicate(), 60)
            finally:
                if flooder.returncode is None:
                    flooder.kill()
                    await flooder.wait()
            guard.expected += [("echo", conn_id)] * 45
        sent, answered = map(int, out.split())
        per_frame = elapsed / max(1, flood_frames)
        attacked.sort()
        slow = attacked[int(len(attacked) * 0.9)]
        print(
            f"flood: {sent} frames sent, {answered} answered, {per_frame * 1e3:.1f} ms each; "
            f"echo round trip median {sorted(control)[10] * 1e3:.1f} ms without it, "
            f"90th percentile {slow * 1e3:.1f} ms during it"
        )
        # Every frame of the flood was read and answered (no_route: nothing handles its type),
        # and the flood was a flood: it kept the server busy while the echoes were measured.
        assert answered == sent > 100
        assert flood_frames > 10
        # An echo needs a handful of turns of the event loop; each may wait for one flood
        # frame. Reading a backlog of frames in one go made it wait for dozens.
        assert slow < 20 * per_frame, (slow, per_frame)
        await guard.finish()
