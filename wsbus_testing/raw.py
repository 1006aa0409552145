"""A raw WebSocket client on a blocking socket, for tests that must control every byte.

The edge suites use it for clients that read nothing, or read late, with a small receive
buffer; ``python -m bench.edge_attacks`` for its attacks. Everything here is stdlib.
"""

from __future__ import annotations

import base64
import os
import socket
import struct
from collections.abc import Sequence

__all__ = ["masked_frame", "open_upgraded", "parse_frames", "read_head", "upgrade_request"]


def masked_frame(opcode: int, payload: bytes, mask: bytes = b"\x01\x02\x03\x04") -> bytes:
    """A client frame (FIN set, masked) with ``opcode`` and ``payload``."""
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return header + mask + body


def upgrade_request(host: str, port: int, extra: Sequence[tuple[str, str]] = ()) -> bytes:
    """A WebSocket upgrade request with ``extra`` headers."""
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        "GET / HTTP/1.1",
        f"Host: {host}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *(f"{name}: {value}" for name, value in extra),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """Read an HTTP response head from a blocking socket: (head, what came after it)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def parse_frames(buffer: bytearray) -> list[tuple[int, bytes]]:
    """Take every complete (unmasked, server) frame off ``buffer``: (opcode, payload)."""
    frames = []
    while len(buffer) >= 2:
        opcode = buffer[0] & 0x0F
        n = buffer[1] & 0x7F
        offset = 2
        if n == 126:
            if len(buffer) < 4:
                break
            n = struct.unpack("!H", buffer[2:4])[0]
            offset = 4
        elif n == 127:
            if len(buffer) < 10:
                break
            n = struct.unpack("!Q", buffer[2:10])[0]
            offset = 10
        if len(buffer) < offset + n:
            break
        frames.append((opcode, bytes(buffer[offset : offset + n])))
        del buffer[: offset + n]
    return frames


def open_upgraded(
    port: int, rcvbuf: int = 0, extra: Sequence[tuple[str, str]] = ()
) -> tuple[socket.socket, bytes]:
    """Open a WebSocket to 127.0.0.1:``port`` with a blocking socket and read the 101.

    Args:
        port: the edge's port.
        rcvbuf: the socket's receive buffer (``SO_RCVBUF``), or 0 for the system's.
        extra: headers to add to the upgrade request.

    Returns the socket (10 s timeout) and whatever came after the 101's head (the welcome,
    perhaps). Raises ``ConnectionError`` when the upgrade is refused.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    sock.sendall(upgrade_request("127.0.0.1", port, extra))
    head, rest = read_head(sock)
    if not head.startswith(b"HTTP/1.1 101"):
        sock.close()
        raise ConnectionError(f"upgrade refused: {head[:80]!r}")
    return sock, rest
