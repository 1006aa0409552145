"""The edge side: what the gateway needs from a client connection, and an in-memory one.

An edge adapter (``wsbus_websockets``, or your own) does the handshake, negotiates the
codec, then hands each connection to :meth:`wsbus.Gateway.serve` as a
:class:`ClientConnection`. :class:`MemoryConnection` is the fake shipped beside the
interface: the gateway cannot tell it from a socket, and tests drive it from the client end.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable
from typing import Any, Protocol, runtime_checkable

import msgspec

from .errors import ConnectionClosed
from .hooks import HandshakeRequest
from .wire import Codec

__all__ = [
    "ClientConnection",
    "ConnectionClosed",
    "MemoryClient",
    "MemoryConnection",
    "ReceivesBatch",
    "ReceivesRaw",
    "ReportsUnsent",
    "SendsNowait",
    "memory_pair",
]


@runtime_checkable
class ClientConnection(Protocol):
    """One client connection, after the handshake, as the gateway sees it.

    ``receive`` and ``send`` raise :class:`ConnectionClosed` once the connection is closed,
    from either end. ``close`` is idempotent.
    """

    @property
    def codec(self) -> Codec:
        """The codec negotiated at the handshake."""
        ...

    @property
    def request(self) -> HandshakeRequest:
        """What the handshake said: path, headers, token, peer address."""
        ...

    async def receive(self) -> str | bytes:
        """Return the next frame: ``str`` for a text frame, ``bytes`` for a binary one."""
        ...

    async def send(self, data: bytes) -> None:
        """Send one frame: a text frame for the JSON codec, binary for MessagePack.

        May wait while the peer is slow to read (back-pressure).
        """
        ...

    async def close(self, code: int, reason: str = "") -> None:
        """Close the connection with a WebSocket close code."""
        ...


# Optional fast paths. An adapter offers any of them by having the methods: they are
# checked once, when the gateway takes the connection (``isinstance`` against these
# runtime-checkable protocols), and the connection conformance suite tests each one an
# adapter has.


@runtime_checkable
class SendsNowait(Protocol):
    """A connection that can write a frame without waiting when it has room.

    The gateway then writes without a task switch per frame, which is what makes fan-out
    to many clients cheap; frames it cannot write at once go through the bounded queue.
    """

    def send_nowait(self, data: bytes) -> bool:
        """Write the frame now if that needs no waiting (open, buffer under its limit).

        Returns:
            True when the frame was taken; False when nothing was done (then the caller
            sends it with ``send``, after every frame queued before it: order is kept).
        """
        ...


@runtime_checkable
class ReceivesRaw(Protocol):
    """A connection that exposes its transport's own receive, untranslated.

    The gateway's reader then skips the translating wrapper on every frame. ``receive``
    must still behave as documented.
    """

    def raw_receive(self) -> Awaitable[str | bytes]:
        """Return the next frame, as ``receive`` does, raising the transport's exceptions."""
        ...

    def closed_error(self, exc: BaseException) -> ConnectionClosed | None:
        """Translate an exception ``raw_receive`` raised; None if it is not a close."""
        ...


@runtime_checkable
class ReceivesBatch(Protocol):
    """A connection that hands over every whole frame it has read, at once.

    The gateway's reader then pays one call per read, not one per frame: a client that
    sends many small frames has them read together (one TCP read holds dozens). Preferred
    over :class:`ReceivesRaw` when a connection has both. ``receive`` must still behave as
    documented.
    """

    def receive_batch(self) -> Awaitable[list[str | bytes]]:
        """Return the frames read and not taken yet, oldest first: one at least.

        The same frames, in the same order, as calls of ``receive`` would return; waits
        as ``receive`` does when there are none, and raises what it raises (a translated
        :class:`ConnectionClosed` at the end) once none is left. A frame that ends the
        connection (invalid UTF-8 in a text, say) is not in a batch: the frames before it
        are, and the next call raises.
        """
        ...


@runtime_checkable
class ReportsUnsent(Protocol):
    """A connection that can tell which frames it took have reached the socket."""

    def unsent(self) -> int:
        """How many of the frames taken (``send`` or ``send_nowait``) are not on the socket.

        They are always the most recent ones; once the connection is closed the figure is
        final (frames an abort discarded count). The gateway counts a delivery written only
        once it has left, and drops with the close what never did (SPEC section 4). An
        adapter without it has its deliveries counted written when it takes them, as
        :class:`MemoryConnection` does (what it takes is in the client's hands at once).
        """
        ...


_JSON_DECODER = msgspec.json.Decoder()
_MSGPACK_DECODER = msgspec.msgpack.Decoder()


class MemoryConnection:
    """A client connection held in memory: the gateway's end of a :func:`memory_pair`.

    Args:
        codec: the negotiated codec.
        request: the handshake to present to the gateway.
        buffer: how many frames the client end holds unread before :meth:`send` waits, as
            a socket's buffers would.
    """

    def __init__(
        self,
        codec: Codec = Codec.JSON,
        request: HandshakeRequest | None = None,
        *,
        buffer: int = 1024,
    ) -> None:
        self._codec = codec
        self._request = request if request is not None else HandshakeRequest(remote="memory")
        self._buffer = buffer
        self._inbound: asyncio.Queue[str | bytes | None] = asyncio.Queue()
        self._outbound: deque[bytes] = deque()
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._closed: ConnectionClosed | None = None
        self.client = MemoryClient(self)

    @property
    def codec(self) -> Codec:
        """The negotiated codec."""
        return self._codec

    @property
    def request(self) -> HandshakeRequest:
        """The handshake presented to the gateway."""
        return self._request

    @property
    def close_code(self) -> int | None:
        """The close code, once closed."""
        return None if self._closed is None else self._closed.code

    async def receive(self) -> str | bytes:
        """Return the next frame the client sent."""
        if self._closed is not None:
            raise self._closed
        item = await self._inbound.get()
        if item is None:
            assert self._closed is not None
            raise self._closed
        return item

    async def receive_batch(self) -> list[str | bytes]:
        """Return every frame the client sent and the gateway has not taken (one at least)."""
        batch = [await self.receive()]
        inbound = self._inbound
        # As receive: once closed, nothing more is taken (the next call raises).
        while self._closed is None and not inbound.empty():
            item = inbound.get_nowait()
            assert item is not None  # only a close puts None, and it sets _closed first
            batch.append(item)
        return batch

    async def send(self, data: bytes) -> None:
        """Hand one frame to the client end, waiting while its buffer is full."""
        while True:
            if self._closed is not None:
                raise self._closed
            if len(self._outbound) < self._buffer:
                break
            self._writable.clear()
            await self._writable.wait()
        self._outbound.append(data)
        self._readable.set()

    def send_nowait(self, data: bytes) -> bool:
        """Hand one frame to the client end if its buffer has room; else return False."""
        if self._closed is not None or len(self._outbound) >= self._buffer:
            return False
        self._outbound.append(data)
        self._readable.set()
        return True

    async def close(self, code: int, reason: str = "") -> None:
        """Close from the gateway's end."""
        self._shut(code, reason)

    def _shut(self, code: int, reason: str) -> None:
        if self._closed is not None:
            return
        self._closed = ConnectionClosed(code, reason)
        self._inbound.put_nowait(None)
        self._readable.set()
        self._writable.set()


class MemoryClient:
    """The client end of a :class:`MemoryConnection`: send raw frames, read decoded ones.

    Every wait takes a ``timeout`` (5 s by default) so that a test can never hang.
    """

    def __init__(self, connection: MemoryConnection) -> None:
        self._conn = connection
        self.welcome: dict[str, Any] | None = None
        """The ``wsbus.welcome`` content, once a test kit fixture has read it."""
        self.conn_id: str | None = None
        """The connection id from the welcome, once read."""

    @property
    def close_code(self) -> int | None:
        """The close code once the connection is closed, else None."""
        return self._conn.close_code

    def send_raw(self, data: str | bytes) -> None:
        """Send one frame as it is: ``str`` as a text frame, ``bytes`` as a binary one."""
        if self._conn._closed is not None:
            raise self._conn._closed
        self._conn._inbound.put_nowait(data)

    def send(self, type: str, content: Any = None, **fields: Any) -> None:
        """Encode and send a frame with the connection's codec."""
        frame = {"type": type, "content": content, **fields}
        if self._conn.codec is Codec.JSON:
            self.send_raw(msgspec.json.encode(frame).decode())
        else:
            self.send_raw(msgspec.msgpack.encode(frame))

    async def receive_raw(self, timeout: float = 5.0) -> bytes:  # noqa: ASYNC109
        """Return the next frame the gateway sent, undecoded.

        Raises:
            ConnectionClosed: the connection closed and every frame was read.
            TimeoutError: nothing came within ``timeout`` seconds.
        """
        conn = self._conn
        async with asyncio.timeout(timeout):
            while not conn._outbound:
                if conn._closed is not None:
                    raise conn._closed
                conn._readable.clear()
                await conn._readable.wait()
        data = conn._outbound.popleft()
        conn._writable.set()
        return data

    async def receive(self, timeout: float = 5.0) -> dict[str, Any]:  # noqa: ASYNC109
        """Return the next frame the gateway sent, decoded."""
        data = await self.receive_raw(timeout)
        if self._conn.codec is Codec.JSON:
            frame: dict[str, Any] = _JSON_DECODER.decode(data)
        else:
            frame = _MSGPACK_DECODER.decode(data)
        return frame

    async def receive_until(self, type: str, timeout: float = 5.0) -> dict[str, Any]:  # noqa: ASYNC109
        """Skip frames until one of ``type`` arrives, and return it."""
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.receive(timeout)
                if frame["type"] == type:
                    return frame

    def pending(self) -> int:
        """How many frames the gateway sent that the client has not read."""
        return len(self._conn._outbound)

    async def wait_closed(self, timeout: float = 5.0) -> int:  # noqa: ASYNC109
        """Wait until the connection is closed, reading nothing, and return the close code."""
        conn = self._conn
        async with asyncio.timeout(timeout):
            while conn._closed is None:
                conn._readable.clear()
                await conn._readable.wait()
        return conn._closed.code

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Close from the client's end."""
        self._conn._shut(code, reason)


def memory_pair(
    codec: Codec = Codec.JSON, request: HandshakeRequest | None = None, *, buffer: int = 1024
) -> tuple[MemoryConnection, MemoryClient]:
    """Return a connected (gateway end, client end) pair."""
    conn = MemoryConnection(codec, request, buffer=buffer)
    return conn, conn.client
