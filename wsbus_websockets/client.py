"""A Python client for a wsbus gateway, on ``websockets``.

::

    from wsbus_websockets import connect

    async with connect("ws://127.0.0.1:8765/", token="s3cret") as client:
        reply = await client.request("echo", {"hello": 1})     # waits for the reply
        await client.send("chat.say", {"room": "lobby", "text": "hi"})
        async for message in client:                            # everything else
            print(message["type"], message["content"])

The client reconnects after a connection is lost or the server goes away (1001, 1006, 1011,
1012, 1013, 1014), with exponential backoff and full jitter; it does not after a close that
says the client itself is at fault or refused (4400, 4401, 4403, 4408, 4429, 1003, 1007,
1009): those raise :class:`~wsbus.errors.ConnectionClosed` carrying the code. Every way the
gateway refuses a client is an exception of :mod:`wsbus.errors` (docs/protocol.md has the
table).

When the gateway says messages meant for the client may have been lost (a ``wsbus.gap``
frame: its link to the bus broke, or the bus dropped messages), the frame comes to
:meth:`Client.receive` in its place among the messages, :attr:`Client.gaps` counts it, and
the ``on_gap`` callback, if given, is called with it as it arrives: the place to resync
(fetch the state again) rather than trust what was pieced together from messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
from collections.abc import AsyncIterator, Callable, Generator
from typing import Any, Final, Literal

import msgspec
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed as WsConnectionClosed
from websockets.exceptions import InvalidHandshake, InvalidStatus, InvalidURI
from websockets.typing import Subprotocol

from wsbus.errors import (
    ConfigError,
    ConnectionClosed,
    HandshakeRefused,
    MessageRejected,
    RequestTimeout,
)
from wsbus.wire import Codec

__all__ = ["RECONNECT_CODES", "Client", "connect"]

log = logging.getLogger("wsbus.client")

RECONNECT_CODES: Final = frozenset({1001, 1006, 1011, 1012, 1013, 1014, 4507})
"""Close codes after which the client reconnects (4507: it missed messages and must resync;
reconnecting is how it starts over)."""


class Client:
    """A connection to a wsbus gateway that survives restarts. Create it with :func:`connect`.

    Attributes:
        welcome: the content of the last ``wsbus.welcome`` (connection id, codec, limits).
        reconnects: how many times the client has reconnected.
        gaps: how many ``wsbus.gap`` frames the gateway sent (messages meant for this
            client may have been lost).

    Args:
        on_gap: called with each ``wsbus.gap`` frame as it arrives, on the client's reader
            task (keep it short; an exception it raises is logged and ignored). The frame
            also comes to :meth:`receive`, in order.
    """

    def __init__(
        self,
        url: str,
        *,
        codec: Codec = Codec.JSON,
        token: str | None = None,
        origin: str | None = None,
        reconnect: bool = True,
        backoff: tuple[float, float] = (0.1, 10.0),
        open_timeout: float = 10.0,
        max_size: int = 2**20,
        queue: int = 10_000,
        on_gap: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.url = url
        self.codec = codec
        self.token = token
        self.origin = origin
        self.reconnect = reconnect
        self.backoff = backoff
        self.open_timeout = open_timeout
        self.max_size = max_size
        self.welcome: dict[str, Any] = {}
        self.reconnects = 0
        self.gaps = 0
        self.on_gap = on_gap
        self._ws: ClientConnection | None = None
        self._encoder: msgspec.json.Encoder | msgspec.msgpack.Encoder = (
            msgspec.json.Encoder() if codec is Codec.JSON else msgspec.msgpack.Encoder()
        )
        self._decoder: msgspec.json.Decoder[Any] | msgspec.msgpack.Decoder[Any] = (
            msgspec.json.Decoder() if codec is Codec.JSON else msgspec.msgpack.Decoder()
        )
        self._ids = itertools.count(1)
        self._pending: dict[str, tuple[asyncio.Future[dict[str, Any]], str]] = {}
        self._incoming: asyncio.Queue[dict[str, Any] | ConnectionClosed] = asyncio.Queue(queue)
        self._reader: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._closed: ConnectionClosed | None = None
        self._closing = False

    @property
    def conn_id(self) -> str | None:
        """The connection id the gateway gave this connection."""
        value = self.welcome.get("conn_id")
        return value if isinstance(value, str) else None

    # -- lifecycle -----------------------------------------------------------------------

    async def open(self) -> Client:
        """Connect and read the welcome.

        Raises:
            HandshakeRefused: the server refused the upgrade (403, 503, 400).
            ConnectionClosed: the server closed during the handshake (4401, 4408, ...), or
                sent something else than a welcome first (1002: the reason says what); the
                socket is closed.
            RequestTimeout: the opening handshake and the welcome took longer than
                ``open_timeout`` together (a ``TimeoutError``); the socket is closed.
            ConfigError: the URL is not a ``ws://`` or ``wss://`` URL.
            OSError: the server could not be reached.
        """
        await self._open_once()
        return self

    async def _open_once(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        # open_timeout bounds the whole open, the welcome included: a server that completes
        # the upgrade and says nothing must not hold the caller for its own auth timeout.
        deadline = asyncio.get_running_loop().time() + self.open_timeout
        try:
            ws = await ws_connect(
                self.url,
                subprotocols=[Subprotocol(self.codec.value)],
                additional_headers=headers,
                origin=None if self.origin is None else self.origin,  # type: ignore[arg-type]
                open_timeout=self.open_timeout,
                max_size=self.max_size,
                compression=None,
            )
        except InvalidStatus as exc:
            response = exc.response
            body = bytes(response.body or b"")[:200].decode("utf-8", "replace").strip()
            raise HandshakeRefused(response.status_code, body) from None
        except InvalidHandshake as exc:
            raise HandshakeRefused(0, str(exc)) from None
        except InvalidURI:
            raise ConfigError(
                f"{self.url!r} is not a WebSocket URL: give ws://host:port/path or wss://..."
            ) from None
        except TimeoutError:
            raise RequestTimeout(
                f"the opening handshake with {self.url}", self.open_timeout
            ) from None
        # From here the socket is ours to close whatever goes wrong, within what is left of
        # open_timeout: a hostile server must not keep it, nor hold the caller longer.
        try:
            async with asyncio.timeout_at(deadline):
                data = await ws.recv()
            self.welcome = self._read_welcome(data)
        except WsConnectionClosed as exc:
            await _abandon(ws, deadline, 1000, "")
            raise _closed(exc) from None
        except TimeoutError:
            await _abandon(ws, deadline, 1000, "no wsbus.welcome in time")
            raise RequestTimeout(
                f"the opening of {self.url} (the server sent no wsbus.welcome)",
                self.open_timeout,
            ) from None
        except ConnectionClosed:
            await _abandon(ws, deadline, 1002, "expected wsbus.welcome")
            raise
        except BaseException:
            # Cancelled, or a bug: no time to say goodbye.
            ws.transport.abort()
            raise
        self._ws = ws
        self._connected.set()
        self._reader = asyncio.create_task(self._read(ws), name="wsbus-client-reader")

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the connection for good; pending requests fail with ConnectionClosed."""
        self._closing = True
        if self._ws is not None:
            await self._ws.close(code, reason)
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self._finish(ConnectionClosed(code, reason))

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- sending -------------------------------------------------------------------------

    def next_id(self) -> str:
        """Return a fresh frame id."""
        return f"c{next(self._ids)}"

    async def send(
        self, type: str, content: Any = None, *, id: str | None = None, reply_to: str | None = None
    ) -> None:
        """Send one message. Does not wait for an ack: use :meth:`request` for that.

        Raises:
            ConnectionClosed: the connection is closed (for good, or reconnecting).
        """
        frame: dict[str, Any] = {"type": type, "content": content}
        if id is not None:
            frame["id"] = id
        if reply_to is not None:
            frame["reply_to"] = reply_to
        await self.send_raw(self._encoder.encode(frame))

    async def send_raw(self, data: bytes | str) -> None:
        """Send a frame as it is (JSON as text, MessagePack as binary, unless ``str``)."""
        if self._closed is not None:
            raise self._closed
        ws = self._ws
        if ws is None or not self._connected.is_set():
            raise ConnectionClosed(1006, "not connected (reconnecting)")
        try:
            if isinstance(data, str):
                await ws.send(data)
            else:
                await ws.send(data, text=self.codec.is_text)
        except WsConnectionClosed as exc:
            raise _closed(exc) from None

    async def request(
        self,
        type: str,
        content: Any = None,
        *,
        wait: Literal["reply", "ack"] = "reply",
        timeout: float = 10.0,  # noqa: ASYNC109 - a request needs its own deadline
    ) -> dict[str, Any]:
        """Send a message with an id and wait for the answer.

        Args:
            type: the message type.
            content: the payload.
            wait: ``"reply"`` waits for a message whose ``reply_to`` is the id (the ack
                comes first and is skipped); ``"ack"`` returns the ``wsbus.ack``.
            timeout: seconds to wait.

        Returns:
            The reply (or ack) frame: ``{"type", "content", "id", ...}``.

        Raises:
            MessageRejected: the gateway refused the message (``wsbus.error``): the subclass
                for its code (``RateLimited``, ``Forbidden``, ``Unrouted``, ...; see
                :meth:`~wsbus.errors.MessageRejected.for_code`).
            RequestTimeout: nothing came in time.
            ConnectionClosed: the connection closed first.
        """
        frame_id = self.next_id()
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[frame_id] = (future, wait)
        try:
            await self.send(type, content, id=frame_id)
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            raise RequestTimeout(f"{type} request {frame_id}", timeout) from None
        finally:
            self._pending.pop(frame_id, None)

    # -- receiving -----------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[dict[str, Any]]:
        while True:
            yield await self.receive()

    async def receive(self) -> dict[str, Any]:
        """Return the next message that no request took (errors without a ref included).

        Raises:
            ConnectionClosed: the connection is closed for good.
        """
        item = await self._incoming.get()
        if isinstance(item, ConnectionClosed):
            self._incoming.put_nowait(item)  # every later call raises too
            raise item
        return item

    def _read_welcome(self, data: str | bytes) -> dict[str, Any]:
        """Return the content of the welcome ``data`` is, or raise ConnectionClosed(1002)."""
        try:
            frame = self._decode(data)
        except ConnectionClosed:
            raise ConnectionClosed(
                1002,
                f"{self.url} sent a first frame that is not a wsbus frame (a "
                f"{self.codec.value} object); expected wsbus.welcome",
            ) from None
        if frame.get("type") != "wsbus.welcome":
            raise ConnectionClosed(
                1002, f"{self.url}: expected wsbus.welcome, got {frame.get('type')!r}"
            )
        content = frame.get("content")
        if not isinstance(content, dict) or not isinstance(content.get("conn_id"), str):
            raise ConnectionClosed(
                1002,
                f"{self.url} sent a wsbus.welcome whose content is not an object with a "
                "conn_id string",
            )
        return content

    def _decode(self, data: str | bytes) -> dict[str, Any]:
        try:
            frame = self._decoder.decode(data.encode() if isinstance(data, str) else data)
        except (msgspec.DecodeError, UnicodeEncodeError):
            frame = None
        if not isinstance(frame, dict):
            raise ConnectionClosed(1002, "the server sent a frame that is not a wsbus frame")
        return frame

    async def _read(self, ws: ClientConnection) -> None:
        try:
            while True:
                frame = self._decode(await ws.recv())
                self._dispatch(frame)
        except WsConnectionClosed as exc:
            closed = _closed(exc)
        except ConnectionClosed as exc:
            closed = exc
            await ws.close(1002, exc.reason)
        self._connected.clear()
        self._fail_pending(closed)
        if self._closing or not self.reconnect or closed.code not in RECONNECT_CODES:
            self._finish(closed)
            return
        log.info("connection closed with %d; reconnecting", closed.code)
        await self._reconnect()

    def _dispatch(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        content = frame.get("content")
        if kind == "wsbus.ack" and isinstance(content, dict):
            entry = self._pending.get(content.get("ref", ""))
            if entry is not None:
                if entry[1] == "ack" and not entry[0].done():
                    entry[0].set_result(frame)
                return
        elif kind == "wsbus.error" and isinstance(content, dict):
            entry = self._pending.get(content.get("ref", ""))
            if entry is not None:
                if not entry[0].done():
                    entry[0].set_exception(
                        MessageRejected.for_code(
                            str(content.get("code")),
                            str(content.get("message")),
                            bool(content.get("retry")),
                        )
                    )
                return
        elif kind == "wsbus.gap":
            self._gap(frame)
        else:
            entry = self._pending.get(frame.get("reply_to") or "")
            if entry is not None and entry[1] == "reply":
                if not entry[0].done():
                    entry[0].set_result(frame)
                return
        try:
            self._incoming.put_nowait(frame)
        except asyncio.QueueFull:
            log.warning("client queue full: dropped a %r message; read faster", kind)

    def _gap(self, frame: dict[str, Any]) -> None:
        """Count a ``wsbus.gap`` and tell ``on_gap``; the frame goes on to receive()."""
        self.gaps += 1
        content = frame.get("content")
        reason = content.get("reason") if isinstance(content, dict) else None
        log.warning("the gateway says messages for this client may have been lost (%s)", reason)
        if self.on_gap is None:
            return
        try:
            self.on_gap(frame)
        except Exception:
            log.exception("the client's on_gap callback raised; ignored")

    def _fail_pending(self, closed: ConnectionClosed) -> None:
        for future, _ in self._pending.values():
            if not future.done():
                future.set_exception(closed)

    def _finish(self, closed: ConnectionClosed) -> None:
        if self._closed is None:
            self._closed = closed
            self._fail_pending(closed)
            if self._incoming.full():
                # The close must reach the reader: it replaces the oldest unread message.
                self._incoming.get_nowait()
            self._incoming.put_nowait(closed)

    async def _reconnect(self) -> None:
        low, high = self.backoff
        for attempt in itertools.count():
            # Full jitter: spreads a crowd of clients over the whole window.
            await asyncio.sleep(random.uniform(0, min(high, low * 2**attempt)))
            if self._closing:
                self._finish(ConnectionClosed(1000, "closed"))
                return
            try:
                await self._open_once()
            except HandshakeRefused as exc:
                if exc.status in (400, 401, 403):
                    # Refused for who or what we are, not for now: retrying cannot help.
                    self._finish(ConnectionClosed(1008, f"reconnect refused: {exc}"))
                    return
                log.info("reconnect attempt %d failed: %s", attempt + 1, exc)
                continue
            except ConnectionClosed as exc:
                if exc.code not in RECONNECT_CODES:
                    self._finish(exc)
                    return
                log.info("reconnect attempt %d failed: %s", attempt + 1, exc)
                continue
            except (OSError, TimeoutError) as exc:
                log.info("reconnect attempt %d failed: %s", attempt + 1, exc)
                continue
            self.reconnects += 1
            return


_CLOSE_GRACE: Final = 0.5
"""Seconds a closing handshake may take when open_timeout has none left, before the abort."""


async def _abandon(ws: ClientConnection, deadline: float, code: int, reason: str) -> None:
    """Close ``ws`` in what is left until ``deadline`` (at least _CLOSE_GRACE), then abort it.

    websockets' own close waits up to its close_timeout (10 s) for the server's answer: a
    server that never answers would hold the caller that long past open_timeout.
    """
    left = deadline - asyncio.get_running_loop().time()
    try:
        async with asyncio.timeout(left if left > 0 else _CLOSE_GRACE):
            await ws.close(code, reason)
    except TimeoutError:
        pass
    finally:
        # A no-op once closed; otherwise the socket goes now, without waiting.
        ws.transport.abort()


def _closed(exc: WsConnectionClosed) -> ConnectionClosed:
    frame = exc.rcvd if exc.rcvd is not None else exc.sent
    if frame is None:
        return ConnectionClosed(1006, "connection lost")
    return ConnectionClosed(frame.code, frame.reason)


class connect:
    """Open a :class:`Client`: ``client = await connect(url)`` or ``async with connect(url)``.

    Takes the same arguments as :class:`Client`.
    """

    def __init__(self, url: str, **kwargs: Any) -> None:
        self._client = Client(url, **kwargs)

    def __await__(self) -> Generator[Any, None, Client]:
        return self._client.open().__await__()

    async def __aenter__(self) -> Client:
        return await self._client.open()

    async def __aexit__(self, *exc_info: object) -> None:
        await self._client.close()
