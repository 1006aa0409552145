"""A conformance suite any edge adapter's :class:`wsbus.ClientConnection` must pass.

Subclass :class:`ConnectionConformance` in a test module and provide the
``wsbus_connection_pair`` fixture: an async factory that takes a codec and, optionally, the
headers of the handshake, returns a connected pair (the gateway's end, the client's end) and
cleans everything up after the test::

    class TestMyEdge(ConnectionConformance):
        @pytest_asyncio.fixture
        async def wsbus_connection_pair(self):
            pairs = []

            async def make(codec, request_headers=None):
                connection, peer = await my_edge_pair(codec, request_headers or {})
                pairs.append((connection, peer))
                return connection, peer

            yield make
            for connection, _ in pairs:
                await connection.close(1000)

The gateway's end is the :class:`~wsbus.ClientConnection` under test; the client's end is a
:class:`Peer` the tests drive. The suite checks frame types, contents and order both ways,
a large frame, close codes seen from either end, idempotent close and back-pressure. Every
wait is bounded. It imports only wsbus and pytest, so it loads without any adapter's extra
installed.

Optional capabilities (:class:`~wsbus.edge.SendsNowait`, :class:`~wsbus.edge.ReceivesRaw`,
:class:`~wsbus.edge.ReceivesBatch`, :class:`~wsbus.edge.ReportsUnsent`) are tested on a
connection that has them. A subclass may set ``capabilities``, the set of those protocols
its connection is meant to offer: the suite then checks that it offers exactly those, so
that a renamed method fails loudly instead of silently losing a fast path.
"""

from __future__ import annotations

import asyncio
import base64
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import ClassVar, Final, Protocol

import msgspec
import pytest

from wsbus import Codec, ConnectionClosed, HandshakeRequest
from wsbus.edge import ClientConnection, ReceivesBatch, ReceivesRaw, ReportsUnsent, SendsNowait

__all__ = [
    "CONNECTION_CAPABILITIES",
    "ConnectionConformance",
    "MakeConnectionPair",
    "Peer",
    "WebSocketPeer",
]

CONNECTION_CAPABILITIES: Final[tuple[type, ...]] = (
    SendsNowait,
    ReceivesRaw,
    ReceivesBatch,
    ReportsUnsent,
)
"""Every optional capability a client connection may offer."""

TIMEOUT: Final = 10.0
"""Seconds any one test may take before it fails rather than hangs."""

LARGE_FRAME: Final = 60 * 1024
"""The size of the large frame, in bytes: under any sensible frame limit, over most buffers."""

BACKPRESSURE_FRAME: Final = 16 * 1024
"""The size of each frame the back-pressure test sends, in bytes."""

BACKPRESSURE_CAP: Final = 4096
"""Frames (64 MiB) the back-pressure test sends into an unread connection before it decides
that ``send`` never waits."""

STALL: Final = 0.25
"""Seconds without a completed send after which ``send`` counts as waiting."""

REQUEST_HEADERS: Final = {"x-wsbus-conformance": "yes"}
"""Headers the suite asks the factory to put in the handshake."""


class Peer(Protocol):
    """The client's end of a connection, as a test drives it."""

    async def send_text(self, data: str) -> None:
        """Send ``data`` as one text frame."""
        ...

    async def send_binary(self, data: bytes) -> None:
        """Send ``data`` as one binary frame."""
        ...

    async def receive(self) -> str | bytes:
        """Return the next frame: ``str`` for a text frame, ``bytes`` for a binary one."""
        ...

    async def close(self, code: int, reason: str) -> None:
        """Close the connection from the client's end with a WebSocket close code."""
        ...

    async def wait_closed(self) -> int:
        """Wait until the connection is closed, reading nothing; return the close code seen."""
        ...


class _WebSocketsClient(Protocol):
    """What :class:`WebSocketPeer` uses of a ``websockets`` client connection."""

    @property
    def close_code(self) -> int | None: ...

    async def send(self, message: str | bytes) -> None: ...

    async def recv(self) -> str | bytes: ...

    async def close(self, code: int = 1000, reason: str = "") -> None: ...

    async def wait_closed(self) -> None: ...


class WebSocketPeer:
    """A ``websockets`` client connection (``websockets.asyncio.client.connect``) as a Peer.

    The client's end for an edge on a real socket: connect with the codec's subprotocol
    (``subprotocols=[codec.value]``) and the request headers the factory is given.
    """

    def __init__(self, ws: _WebSocketsClient) -> None:
        self._ws = ws

    async def send_text(self, data: str) -> None:
        """Send ``data`` as one text frame."""
        await self._ws.send(data)

    async def send_binary(self, data: bytes) -> None:
        """Send ``data`` as one binary frame."""
        await self._ws.send(data)

    async def receive(self) -> str | bytes:
        """Return the next frame."""
        return await self._ws.recv()

    async def close(self, code: int, reason: str) -> None:
        """Close with ``code`` and ``reason``."""
        await self._ws.close(code, reason)

    async def wait_closed(self) -> int:
        """Wait until closed; return the close code."""
        await self._ws.wait_closed()
        code = self._ws.close_code
        assert code is not None
        return code


class MakeConnectionPair(Protocol):
    """The ``wsbus_connection_pair`` fixture: makes connected pairs, cleans up after the test."""

    async def __call__(
        self, codec: Codec, request_headers: dict[str, str] | None = None
    ) -> tuple[ClientConnection, Peer]:
        """Return a connected (gateway's end, client's end) pair.

        Args:
            codec: the codec the handshake negotiates.
            request_headers: headers the client sends in the handshake (names lower-case),
                to be found in the connection's ``request.headers``.
        """
        ...


_CODECS = [pytest.param(codec, id=codec.name.lower()) for codec in Codec]


def _client_frame(i: int) -> str | bytes:
    """Return the ``i``-th frame a client sends: text and binary by turns, empty ones first."""
    if i < 2:
        return "" if i == 0 else b""
    if i % 2 == 0:
        return f"text {i}: ü ✓ 𝄞"
    # Not UTF-8: an adapter that decoded binary frames would fail here.
    return bytes([i % 256, 0x00, 0xFF, 0xFE]) + b"binary"


def _payload(codec: Codec, i: int) -> bytes:
    """Return the ``i``-th payload the gateway sends, encoded with ``codec``."""
    message = {"n": i, "s": "ü ✓"}
    if codec is Codec.JSON:
        return msgspec.json.encode(message)
    return msgspec.msgpack.encode(message)


def _as_seen(codec: Codec, data: bytes) -> str | bytes:
    """Return ``data`` as the peer must receive it: a text frame for a text codec."""
    return data.decode() if codec.is_text else data


async def _send_all(peer: Peer, frames: Sequence[str | bytes]) -> None:
    for frame in frames:
        if isinstance(frame, str):
            await peer.send_text(frame)
        else:
            await peer.send_binary(frame)


async def _send_each(connection: ClientConnection, payloads: Sequence[bytes]) -> None:
    for payload in payloads:
        await connection.send(payload)


async def _closed_by(operation: Awaitable[object]) -> ConnectionClosed:
    """Await ``operation`` and return the ConnectionClosed it raises."""
    try:
        result = await operation
    except ConnectionClosed as exc:
        return exc
    raise AssertionError(f"expected ConnectionClosed, got {result!r}")


async def _until_still(progress: asyncio.Event, quiet: float) -> None:
    """Return once ``progress`` has not been set for ``quiet`` seconds."""
    while True:
        progress.clear()
        try:
            async with asyncio.timeout(quiet):
                await progress.wait()
        except TimeoutError:
            return


class ConnectionConformance:
    """The tests every edge adapter's client connection must pass.

    A subclass provides the ``wsbus_connection_pair`` fixture: an async factory
    ``make(codec, request_headers=None) -> (ClientConnection, Peer)`` (see
    :class:`MakeConnectionPair`) that cleans up after the test. It may set
    ``capabilities`` (see the module's docstring).
    """

    capabilities: ClassVar[frozenset[type] | None] = None
    """The capability protocols the connection is meant to offer; None: not checked."""

    async def test_offers_the_capabilities_it_declares(
        self, wsbus_connection_pair: MakeConnectionPair
    ) -> None:
        """The connection is an instance of exactly the capability protocols it means to offer."""
        if self.capabilities is None:
            pytest.skip("the test class does not say which capabilities the connection offers")
        async with asyncio.timeout(TIMEOUT):
            connection, _ = await wsbus_connection_pair(Codec.JSON)
        offered = {cap for cap in CONNECTION_CAPABILITIES if isinstance(connection, cap)}
        assert offered == set(self.capabilities)

    @pytest.mark.parametrize("codec", _CODECS)
    async def test_receive_keeps_frame_types_contents_and_order(
        self, wsbus_connection_pair: MakeConnectionPair, codec: Codec
    ) -> None:
        """A text frame is received as str, a binary one as bytes, intact and in order."""
        frames = [_client_frame(i) for i in range(100)]
        async with asyncio.timeout(TIMEOUT):
            connection, peer = await wsbus_connection_pair(codec)
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(_send_all(peer, frames))
                received = [await connection.receive() for _ in frames]
        assert [type(frame) for frame in received] == [type(frame) for frame in frames]
        assert received == frames

    @pytest.mark.parametrize("codec", _CODECS)
    async def test_send_frame_type_follows_the_codec(
        self, wsbus_connection_pair: MakeConnectionPair, codec: Codec
    ) -> None:
        """What is sent arrives as text frames for JSON, binary ones for MessagePack, in order."""
        payloads = [_payload(codec, i) for i in range(100)]
        async with asyncio.timeout(TIMEOUT):
            connection, peer = await wsbus_connection_pair(codec)
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(_send_each(connection, payloads))
                received = [await peer.receive() for _ in payloads]
        expected_type = str if codec.is_text else bytes
        assert [type(frame) for frame in received] == [expected_type] * len(payloads)
        assert received == [_as_seen(codec, payload) for payload in payloads]

    @pytest.mark.parametrize("codec", _CODECS)
    async def test_codec_and_request_are_present(
        self, wsbus_connection_pair: MakeConnectionPair, codec: Codec
    ) -> None:
        """The connection reports the negotiated codec and the handshake request."""
        async with asyncio.timeout(TIMEOUT):
            connection, _ = await wsbus_connection_pair(codec, dict(REQUEST_HEADERS))
        assert isinstance(connection, ClientConnection)
        assert connection.codec is codec
        assert isinstance(connection.request, HandshakeRequest)
        assert connection.request.headers.items() >= REQUEST_HEADERS.items()

    @pytest.mark.parametrize("codec", _CODECS)
    async def test_a_large_frame_round_trips(
        self, wsbus_connection_pair: MakeConnectionPair, codec: Codec
    ) -> None:
        """A 60 KiB frame arrives whole, either way."""
        text = "ü" * (LARGE_FRAME // 2)  # two bytes each in UTF-8
        binary = bytes(range(256)) * (LARGE_FRAME // 256)
        outbound = text.encode() if codec.is_text else binary
        async with asyncio.timeout(TIMEOUT):
            connection, peer = await wsbus_connection_pair(codec)
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(_send_all(peer, [text, binary]))
                inbound = [await connection.receive(), await connection.receive()]
                tasks.create_task(connection.send(outbound))
                seen = await peer.receive()
        assert inbound == [text, binary]
        assert seen == _as_seen(codec, outbound)

    @pytest.mark.parametrize("code", [4507, 1001])
    async def test_close_from_the_gateway_end(
        self, wsbus_connection_pair: MakeConnectionPair, code: int
    ) -> None:
        """The peer sees the gateway's close code; then receive and send raise ConnectionClosed."""
        async with asyncio.timeout(TIMEOUT):
            connection, peer = await wsbus_connection_pair(Codec.JSON)
            await connection.close(code, "closing")
            seen = await peer.wait_closed()
            after_receive = await _closed_by(connection.receive())
            after_send = await _closed_by(connection.send(b"{}"))
        assert seen == code
        assert after_receive.code == code
        assert after_send.code == code

    async def test_close_from_the_peer_ends_a_pending_receive(
        self, wsbus_connection_pair: MakeConnectionPair
    ) -> None:
        """A close from the peer makes a waiting receive raise ConnectionClosed with its code."""
        async with asyncio.timeout(TIMEOUT):
            connection, peer = await wsbus_connection_pair(Codec.JSON)
            async with asyncio.TaskGroup() as tasks:
                pending = tasks.create_task(_closed_by(connection.receive()))
                await asyncio.sleep(0.05)
                was_pending = not pending.done()
                await peer.close(4000, "peer leaving")
            after_send = await _closed_by(connection.send(b"{}"))
        assert was_pending, "receive returned before the peer sent anything"
        assert pending.result().code == 4000
        assert after_send.code == 4000

    @pytest.mark.parametrize("codec", _CODECS)
    async def test_send_nowait_and_send_keep_the_order_of_the_calls_that_took_frames(
        self, wsbus_connection_pair: MakeConnectionPair, codec: Codec
    ) -> None:
        """Frames sent by ``send_nowait`` and ``send``, mixed, arrive in call order.

        A ``send_nowait`` that returns False did nothing: that frame never arrives, unless
        it is then sent with ``send``, and then it arrives in that call's place, as the
        gateway does with a frame the connection declined. ``send_nowait`` must decline
        within :data:`BACKPRESSURE_CAP` frames that the peer does not read (here, a burst
        with no await: the peer cannot read), or a fast path would buffer without bound.
        """
        pool = base64.b64encode(random.Random(1).randbytes(768 * 1024))
        slices = len(pool) // BACKPRESSURE_FRAME
        count = 0

        def fresh() -> bytes:
            nonlocal count
            start = (count % slices) * BACKPRESSURE_FRAME
            count += 1
            return b"%08d" % count + pool[start : start + BACKPRESSURE_FRAME]

        end = b"%08d" % 0 + b"end"
        taken: list[bytes] = []
        send_nowait: Callable[[bytes], bool]  # the connection's, once it is made

        async def send(payload: bytes) -> None:
            await connection.send(payload)
            taken.append(payload)

        def burst_until_declined() -> bytes:
            """Call send_nowait with no await in between until it declines; return that."""
            for _ in range(BACKPRESSURE_CAP):
                payload = fresh()
                if not send_nowait(payload):
                    return payload
                taken.append(payload)
            raise AssertionError(f"send_nowait never declined: it took {BACKPRESSURE_CAP}")

        async def sender() -> None:
            # By turns, with room to spare: each call takes its frame.
            for i in range(20):
                payload = fresh()
                if i % 2:
                    await send(payload)
                elif send_nowait(payload):
                    taken.append(payload)
                else:
                    await send(payload)  # the gateway's fallback, in the same place
            # Declined, then a different frame by send: the declined one is never seen.
            burst_until_declined()
            await send(fresh())
            # Declined, then the same frame by send: seen once, in send's place.
            await send(burst_until_declined())
            for i in range(20):
                payload = fresh()
                if i % 3 or not send_nowait(payload):
                    await send(payload)
                else:
                    taken.append(payload)
            await send(end)

        async def reader() -> list[str | bytes]:
            seen: list[str | bytes] = []
            while not seen or seen[-1] != _as_seen(codec, end):
                seen.append(await peer.receive())
            return seen

        async with asyncio.timeout(TIMEOUT):
            connection, peer = await wsbus_connection_pair(codec)
            if not isinstance(connection, SendsNowait):
                pytest.skip("the connection does not offer send_nowait")
            send_nowait = connection.send_nowait
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(sender())
                seen = tasks.create_task(reader())
        assert seen.result() == [_as_seen(codec, payload) for payload in taken]

    async def test_raw_receive_and_closed_error_agree_with_receive(
        self, wsbus_connection_pair: MakeConnectionPair
    ) -> None:
        """The optional raw_receive and closed_error pair behaves as receive does.

        raw_receive gives the same frames, and closed_error turns the transport's close
        into ConnectionClosed with the peer's code.
        """
        async with asyncio.timeout(TIMEOUT):
            connection, peer = await wsbus_connection_pair(Codec.JSON)
            if not isinstance(connection, ReceivesRaw):
                pytest.skip("the connection does not offer raw_receive")
            await peer.send_text('{"type":"a"}')
            assert await connection.raw_receive() == '{"type":"a"}'
            await peer.close(4002, "bye")
            try:
                await connection.raw_receive()
            except Exception as exc:
                closed = connection.closed_error(exc)
            else:
                raise AssertionError("raw_receive returned after the peer closed")
        assert isinstance(closed, ConnectionClosed) and closed.code == 4002

    @pytest.mark.parametrize("codec", _CODECS)
    async def test_receive_batch_gives_what_receive_would_then_the_close(
        self, wsbus_connection_pair: MakeConnectionPair, codec: Codec
    ) -> None:
        """The optional receive_batch gives every frame, in order, then the peer's close.

        Each batch holds one frame at least; together they are the frames sent, types and
        contents intact, however the peer's writes fell; after the last, ConnectionClosed
        with the peer's code.
        """
        frames = [_client_frame(i) for i in range(200)]
        async with asyncio.timeout(TIMEOUT):
            connection, peer = await wsbus_connection_pair(codec)
            if not isinstance(connection, ReceivesBatch):
                pytest.skip("the connection does not offer receive_batch")
            await _send_all(peer, frames[:100])
            received: list[str | bytes] = []
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(_send_all(peer, frames[100:]))
                while len(received) < len(frames):
                    batch = await connection.receive_batch()
                    assert batch, "an empty batch"
                    received.extend(batch)
            await peer.close(4002, "bye")
            # Every frame was taken: the next call is the close.
            with pytest.raises(ConnectionClosed) as closed:
                await connection.receive_batch()
        assert [type(frame) for frame in received] == [type(frame) for frame in frames]
        assert received == frames
        assert closed.value.code == 4002

    @pytest.mark.parametrize("codec", _CODECS)
    async def test_unsent_counts_down_to_zero_once_the_peer_has_read_everything(
        self, wsbus_connection_pair: MakeConnectionPair, codec: Codec
    ) -> None:
        """The optional unsent() never counts more than was sent, nor less than zero.

        Once the peer has read every frame, none is left unsent, and a closed connection's
        figure stays as it is.
        """
        payloads = [_payload(codec, i) for i in range(50)]
        async with asyncio.timeout(TIMEOUT):
            connection, peer = await wsbus_connection_pair(codec)
            if not isinstance(connection, ReportsUnsent):
                pytest.skip("the connection does not report unsent frames")
            unsent = connection.unsent
            await _send_each(connection, payloads)
            assert 0 <= unsent() <= len(payloads)
            received = [await peer.receive() for _ in payloads]
            assert received == [_as_seen(codec, payload) for payload in payloads]
            assert unsent() == 0
            await connection.close(1000, "done")
            await peer.wait_closed()
        assert unsent() == 0

    async def test_close_is_idempotent(self, wsbus_connection_pair: MakeConnectionPair) -> None:
        """Closing again is harmless and does not change the close code."""
        async with asyncio.timeout(TIMEOUT):
            connection, peer = await wsbus_connection_pair(Codec.JSON)
            await connection.close(1000, "done")
            await connection.close(1000, "done")
            await connection.close(4001, "again")
            seen = await peer.wait_closed()
            after = await _closed_by(connection.receive())
        assert seen == 1000
        assert after.code == 1000

    async def test_close_after_the_peer_closed_is_harmless(
        self, wsbus_connection_pair: MakeConnectionPair
    ) -> None:
        """Closing a connection the peer already closed neither raises nor changes the code."""
        async with asyncio.timeout(TIMEOUT):
            connection, peer = await wsbus_connection_pair(Codec.JSON)
            await peer.close(4000, "peer leaving")
            first = await _closed_by(connection.receive())
            await connection.close(1000, "late")
            again = await _closed_by(connection.receive())
        assert first.code == 4000
        assert again.code == 4000

    @pytest.mark.parametrize("codec", _CODECS)
    async def test_send_waits_for_a_slow_peer_then_completes(
        self, wsbus_connection_pair: MakeConnectionPair, codec: Codec
    ) -> None:
        """A send waits, neither failing nor dropping, while the peer reads nothing.

        Once the peer reads, the waiting send completes and every frame arrives in order.
        Buffers may be large (a socket's are megabytes) but not unbounded: ``send`` must
        wait within :data:`BACKPRESSURE_CAP` frames.
        """
        # Incompressible, so that permessage-deflate cannot shrink the test away: each frame
        # is a different slice of a pool far larger than deflate's 32 KiB window. Base64 keeps
        # it ASCII, a valid text frame too.
        pool = base64.b64encode(random.Random(0).randbytes(768 * 1024))
        slices = len(pool) // BACKPRESSURE_FRAME

        def frame(i: int) -> bytes:
            start = (i % slices) * BACKPRESSURE_FRAME
            return b"%08d" % i + pool[start : start + BACKPRESSURE_FRAME]

        sent = 0
        limit = BACKPRESSURE_CAP
        progress = asyncio.Event()

        async with asyncio.timeout(TIMEOUT):
            connection, peer = await wsbus_connection_pair(codec)

            async def send_until_limit() -> None:
                nonlocal sent
                while sent < limit:
                    await connection.send(frame(sent))
                    sent += 1
                    progress.set()

            async with asyncio.TaskGroup() as tasks:
                sender = tasks.create_task(send_until_limit())
                await _until_still(progress, STALL)
                waited = not sender.done()
                # The send under way is the last: read up to it and it completes.
                limit = sent + 1
                received = [await peer.receive() for _ in range(limit)] if waited else []
        assert waited, f"send never waited: the peer read nothing, yet it took {sent} frames"
        assert sent == limit
        assert received == [_as_seen(codec, frame(i)) for i in range(limit)]
