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

A client whose gateway offers resume (the welcome's ``resume.token``) resumes its session
when it reconnects: it sends ``wsbus.resume`` with the token and the last position it saw
per history group (:attr:`Client.positions`), and the gateway restores its alias, user and
groups and replays what it missed. What cannot be restored is said to the application
once, as a ``wsbus.resync`` frame the client itself makes (:data:`RESYNC`): it comes to
:meth:`Client.receive` in its place, and to the ``on_resync`` callback.

Frames the gateway marks ``"ack": true`` are acknowledged with ``wsbus.processed``: those
of the types in ``ack_types`` once the application is done with them (it asks
:meth:`Client.receive` for the next message, or calls :meth:`Client.processed`), every
other one on arrival. A frame redelivered after a resume that the application already has
is dropped (:attr:`Client.duplicates`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import re
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Collection, Generator, Mapping
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

__all__ = ["RECONNECT_CODES", "RESYNC", "Client", "connect"]

log = logging.getLogger("wsbus.client")

RECONNECT_CODES: Final = frozenset({1001, 1006, 1011, 1012, 1013, 1014, 4507})
"""Close codes after which the client reconnects (4507: it missed messages; it resumes, or
starts over where the gateway cannot resume it)."""

RESYNC: Final = "wsbus.resync"
"""The type of the frame the client puts in :meth:`Client.receive`'s stream when state was
lost at a reconnect. No gateway sends it. Its content:

- ``groups``: the groups whose messages the application must fetch again (a list);
- ``restored``: true when the session was restored (alias, user and groups) and only these
  groups could not be replayed; false when nothing was restored: the connection is a new
  session, with no alias and no groups, and ``groups`` are the ones the client knew of;
- ``reason``: ``"resync"`` (the gateway could not replay those groups), ``"resume_failed"``
  (the gateway refused the resume: expired, used, or resume off), ``"not_offered"`` (the
  gateway offered no resume token);
- ``alias_lost``: the alias the session had and did not get back, when so;
- ``message``: for people.
"""

_RESUME: Final = "wsbus.resume"
_RESUMED: Final = "wsbus.resumed"
_PROCESSED: Final = "wsbus.processed"

ACK_BATCH: Final = 256
"""Ids in one ``wsbus.processed`` frame (well inside the gateway's frame and item caps)."""

ACK_INTERVAL: Final = 0.05
"""Seconds between two ``wsbus.processed`` frames: a burst of acknowledgements goes as a few
frames, never as a flood that would spend the connection's rate limit."""

_MAX_PENDING_ACKS: Final = 4096
"""Acknowledgements held while disconnected; older ones go (their frames come back on resume,
are dropped as already processed, and acknowledged again)."""

_POSITION: Final = re.compile(r"([A-Za-z0-9_-]{1,40}):([1-9][0-9]{0,17})")


def _parse_position(text: str) -> tuple[str, int] | None:
    match = _POSITION.fullmatch(text)
    return None if match is None else (match[1], int(match[2]))


class Client:
    """A connection to a wsbus gateway that survives restarts. Create it with :func:`connect`.

    Attributes:
        welcome: the content of the last ``wsbus.welcome`` (connection id, codec, limits,
            and ``resume`` when the gateway offers it).
        resumed: the content of the last ``wsbus.resumed`` (``groups``, ``recovered``,
            ``resync``, ``redelivered``, ...), or ``{}`` before any resume.
        reconnects: how many times the client has reconnected.
        resumes: how many of those reconnects resumed the session.
        resyncs: how many :data:`RESYNC` frames the client made.
        gaps: how many ``wsbus.gap`` frames the gateway sent (messages meant for this
            client may have been lost).
        duplicates: frames dropped because the application already had them (a frame
            redelivered after a resume, a position already seen).

    Args:
        url: the gateway's ``ws://`` or ``wss://`` URL.
        codec: the one subprotocol offered.
        token: a bearer token, sent as ``Authorization: Bearer <token>``.
        origin: an ``Origin`` header to send.
        reconnect: reconnect after the codes of :data:`RECONNECT_CODES`.
        backoff: the base and the cap of the reconnect delay, in seconds.
        open_timeout: seconds allowed for the handshake, the welcome and the resume.
        max_size: the largest frame accepted.
        queue: frames held for :meth:`receive`.
        on_gap: called with each ``wsbus.gap`` frame as it arrives, on the client's reader
            task (keep it short; an exception it raises is logged and ignored). The frame
            also comes to :meth:`receive`, in order.
        resume: resume the session on reconnect when the gateway offers it (the default).
            False: every reconnect starts over, and no :data:`RESYNC` frame says so.
        resume_token: a token to resume with at the first open (:attr:`resume_token` of
            an earlier client), for a program that keeps its session across restarts.
        positions: the positions to resume from with ``resume_token`` (:attr:`positions`
            of that client).
        on_resync: called with each :data:`RESYNC` frame as it is made, like ``on_gap``;
            the frame also comes to :meth:`receive`.
        ack_types: the message types whose acknowledgement waits for the application
            (``"*"``: every type). A frame of one of these types that asks for an
            acknowledgement is acknowledged when the application calls :meth:`receive`
            again after taking it (the next turn of ``async for``), when
            :meth:`processed` names it, or, for a reply, when :meth:`request` returns it.
            Frames of other types are acknowledged as they arrive.
        manual_ack: acknowledge the ``ack_types`` frames only when :meth:`processed`
            names them (for an application that hands messages to other tasks).
        remember: ids of acknowledged frames kept, to drop their redeliveries.
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
        resume: bool = True,
        resume_token: str | None = None,
        positions: Mapping[str, str] | None = None,
        on_resync: Callable[[dict[str, Any]], None] | None = None,
        ack_types: Collection[str] = (),
        manual_ack: bool = False,
        remember: int = 10_000,
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
        self.resumed: dict[str, Any] = {}
        self.reconnects = 0
        self.resumes = 0
        self.resyncs = 0
        self.gaps = 0
        self.duplicates = 0
        self.on_gap = on_gap
        self.on_resync = on_resync
        self.resume = resume
        self.ack_types = frozenset(ack_types)
        self.manual_ack = manual_ack
        self.remember = remember
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
        # Resume state: the token to present, the last position per group, the groups the
        # last resume restored (what a refused resume tells the application it lost).
        self._token = resume_token
        self._positions: dict[str, str] = dict(positions or {})
        self._groups: tuple[str, ...] = ()
        self._redelivering = 0
        # Acknowledgement state: id -> processed, for every frame that asked for one
        # (bounded, oldest out); ids waiting to be sent; the frame receive() last returned.
        self._seen: OrderedDict[str, bool] = OrderedDict()
        self._acks: list[str] = []
        self._ack_task: asyncio.Task[None] | None = None
        self._taken: dict[str, Any] | None = None

    @property
    def conn_id(self) -> str | None:
        """The connection id the gateway gave this connection."""
        value = self.welcome.get("conn_id")
        return value if isinstance(value, str) else None

    @property
    def positions(self) -> dict[str, str]:
        """The last position seen per history group (``{"room.1": "e9f3:17"}``; a copy).

        These are what the client resumes from. A group the gateway said cannot be
        recovered loses its entry until its next message.
        """
        return dict(self._positions)

    @property
    def resume_token(self) -> str | None:
        """The token the client resumes with on its next reconnect (None: none offered)."""
        return self._token

    # -- lifecycle -----------------------------------------------------------------------

    async def open(self) -> Client:
        """Connect and read the welcome (and resume, with ``resume_token``).

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
        await self._open_once(first=True)
        return self

    async def _open_once(self, *, first: bool = False) -> None:
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
                await self._resume_on(ws, first=first)
        except WsConnectionClosed as exc:
            await _abandon(ws, deadline, 1000, "")
            raise _closed(exc) from None
        except TimeoutError:
            await _abandon(ws, deadline, 1000, "no wsbus.welcome in time")
            raise RequestTimeout(
                f"the opening of {self.url} (the server sent no wsbus.welcome, or no answer "
                "to wsbus.resume)",
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
        if self._acks:
            self._flush_acks()

    async def _resume_on(self, ws: ClientConnection, *, first: bool) -> None:
        """Resume the session on the just-welcomed ``ws`` if there is one to resume.

        The answer is read here, before the reader starts: ``wsbus.resume`` must be the
        first frame, and nothing may be sent before the session is back. Frames that come
        before the answer are dispatched as usual.
        """
        offer = self.welcome.get("resume")
        offered = offer.get("token") if isinstance(offer, dict) else None
        offered = offered if isinstance(offered, str) else None
        token = self._token
        if not self.resume or token is None or offered is None:
            self._token = offered
            if self.resume and (token is not None or not first):
                self._lost("not_offered", "the connection was lost and could not be resumed")
            return
        frame_id = f"r{next(self._ids)}"
        frame = {
            "type": _RESUME,
            "id": frame_id,
            "content": {"token": token, "positions": dict(self._positions)},
        }
        await ws.send(self._encoder.encode(frame), text=self.codec.is_text)
        while True:
            answer = self._decode(await ws.recv())
            kind = answer.get("type")
            content = answer.get("content")
            # The old token is kept until the answer: a connection lost before it leaves
            # the session where it was (or taken, and the next try is told so).
            if kind == _RESUMED and answer.get("reply_to") == frame_id:
                self._token = offered
                self._resumed(content if isinstance(content, dict) else {})
                return
            if (
                kind == "wsbus.error"
                and isinstance(content, dict)
                and content.get("ref") == frame_id
            ):
                self._token = offered
                code, message = content.get("code"), content.get("message")
                log.warning("the gateway refused to resume the session (%s: %s)", code, message)
                self._lost("resume_failed", f"the gateway refused to resume ({code}: {message})")
                return
            self._dispatch(answer)

    def _resumed(self, content: dict[str, Any]) -> None:
        """Take a ``wsbus.resumed``: the new token, what was restored, what was not."""
        self.resumed = content
        self.resumes += 1
        token = content.get("token")
        if isinstance(token, str):
            self._token = token
        groups = _strings(content.get("groups"))
        resync = _strings(content.get("resync"))
        self._groups = tuple(groups)
        # A group it is no longer in, or one with a hole, has no position to resume from:
        # its next message gives one.
        for group in list(self._positions):
            if group not in groups or group in resync:
                del self._positions[group]
        redelivered = content.get("redelivered")
        self._redelivering = redelivered if isinstance(redelivered, int) else 0
        log.info(
            "resumed the session: groups %s, %d redelivered, resync %s",
            groups,
            self._redelivering,
            resync,
        )
        alias_lost = content.get("alias_lost")
        if resync or isinstance(alias_lost, str):
            extra: dict[str, Any] = {}
            if isinstance(alias_lost, str):
                extra["alias_lost"] = alias_lost
            self._resync(
                {
                    "groups": resync,
                    "restored": True,
                    "reason": "resync",
                    **extra,
                    "message": "the session was resumed, but the messages of these groups "
                    "could not all be replayed: fetch their state again",
                }
            )

    def _lost(self, reason: str, message: str) -> None:
        """Say that the session was not restored: a new session, no alias, no groups."""
        groups = sorted({*self._positions, *self._groups})
        self._positions.clear()
        self._groups = ()
        self._redelivering = 0
        self._resync({"groups": groups, "restored": False, "reason": reason, "message": message})

    def _resync(self, content: dict[str, Any]) -> None:
        frame = {"type": RESYNC, "content": content}
        self.resyncs += 1
        log.warning("%s: resync %s", content["message"], content["groups"])
        if self.on_resync is not None:
            try:
                self.on_resync(frame)
            except Exception:
                log.exception("the client's on_resync callback raised; ignored")
        self._queue(frame)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the connection for good; pending requests fail with ConnectionClosed.

        Acknowledgements not sent yet are sent first.
        """
        self._closing = True
        if self._ack_task is not None:
            self._ack_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ack_task
        if self._ws is not None:
            # What the application processed is said before the close, not lost with it
            # (the gateway would keep those messages for a redelivery nobody asks for).
            with contextlib.suppress(WsConnectionClosed):
                while self._acks and self._connected.is_set():
                    await self._send_batch(self._ws)
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
            wait: ``"reply"`` waits for a message whose ``reply_to`` is the id (the ack,
                before or after it, is skipped); ``"ack"`` returns the ``wsbus.ack``.
            timeout: seconds to wait.

        Returns:
            The reply (or ack) frame: ``{"type", "content", "id", ...}``. A reply that
            asked for an acknowledgement is acknowledged as it is returned (with
            ``manual_ack``, when :meth:`processed` names it).

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
                answer = await future
        except TimeoutError:
            raise RequestTimeout(f"{type} request {frame_id}", timeout) from None
        finally:
            self._pending.pop(frame_id, None)
        if not self.manual_ack:
            self.processed(answer)
        return answer

    def processed(self, message: Mapping[str, Any]) -> None:
        """Acknowledge ``message``: the application is done with it.

        Only a frame with ``"ack": true`` is acknowledged (a ``wsbus.processed`` naming its
        id goes to the gateway, batched with others); any other, or one acknowledged
        already, is ignored. Needed only with ``manual_ack``, or to acknowledge before
        asking for the next message.
        """
        frame_id = message.get("id")
        if message.get("ack") is not True or not isinstance(frame_id, str):
            return
        if self._seen.get(frame_id) is True:
            return
        self._remember(frame_id, True)
        self._ack(frame_id)

    def _wants_app(self, kind: object) -> bool:
        return "*" in self.ack_types or kind in self.ack_types

    def _remember(self, frame_id: str, done: bool) -> None:
        self._seen[frame_id] = done
        self._seen.move_to_end(frame_id)
        while len(self._seen) > self.remember:
            self._seen.popitem(last=False)

    def _ack(self, frame_id: str) -> None:
        self._acks.append(frame_id)
        if len(self._acks) > _MAX_PENDING_ACKS:
            del self._acks[0]
        if self._connected.is_set():
            self._flush_acks()

    def _flush_acks(self) -> None:
        if self._ack_task is None and not self._closing:
            self._ack_task = asyncio.create_task(self._send_acks(), name="wsbus-client-acks")

    async def _send_acks(self) -> None:
        """Send the acknowledgements waiting, a batch at a time, ACK_INTERVAL apart."""
        try:
            # One turn of the loop first: what the reader takes in the same turn joins.
            await asyncio.sleep(0)
            while self._acks:
                ws = self._ws
                if ws is None or not self._connected.is_set():
                    return  # sent after the reconnect
                try:
                    await self._send_batch(ws)
                except WsConnectionClosed:
                    return
                await asyncio.sleep(ACK_INTERVAL)
        finally:
            self._ack_task = None

    async def _send_batch(self, ws: ClientConnection) -> None:
        batch = self._acks[:ACK_BATCH]
        frame = {"type": _PROCESSED, "content": {"ids": batch}}
        await ws.send(self._encoder.encode(frame), text=self.codec.is_text)
        # Appended to meanwhile, never removed from elsewhere: the batch is still in front.
        del self._acks[: len(batch)]

    # -- receiving -----------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[dict[str, Any]]:
        while True:
            yield await self.receive()

    async def receive(self) -> dict[str, Any]:
        """Return the next message that no request took (errors without a ref included).

        Also returns the gateway's ``wsbus.gap`` frames and the client's own
        :data:`RESYNC` frames, in their place. Calling it again says the application is
        done with the message it returned last: if that one asked for an acknowledgement
        (a type of ``ack_types``), it is acknowledged now (unless ``manual_ack``).

        Raises:
            ConnectionClosed: the connection is closed for good.
        """
        taken, self._taken = self._taken, None
        if taken is not None and not self.manual_ack:
            self.processed(taken)
        item = await self._incoming.get()
        if isinstance(item, ConnectionClosed):
            self._incoming.put_nowait(item)  # every later call raises too
            raise item
        if item.get("ack") is True and self._seen.get(item.get("id", "")) is False:
            self._taken = item
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
            if not self._accept(frame):
                return
            entry = self._pending.get(frame.get("reply_to") or "")
            if entry is not None and entry[1] == "reply":
                if not entry[0].done():
                    entry[0].set_result(frame)
                return
        self._queue(frame)

    def _accept(self, frame: dict[str, Any]) -> bool:
        """Keep the frame's position and acknowledge it; False to drop it (a duplicate)."""
        frame_id = frame.get("id")
        ack_id = frame_id if frame.get("ack") is True and isinstance(frame_id, str) else None
        redelivered = False
        if ack_id is not None:
            if self._redelivering > 0:
                # The first `redelivered` frames asking for an ack after wsbus.resumed are
                # the ones the last connection left unacknowledged: they may come ahead of
                # the replay, so they must not move the positions the replay starts from.
                self._redelivering -= 1
                redelivered = True
            done = self._seen.get(ack_id)
            if done is not None:
                # The application has it: processed (its acknowledgement was lost with the
                # connection: say it again), or still in hand (acknowledged when done).
                self.duplicates += 1
                if done:
                    self._ack(ack_id)
                return False
        group, pos = frame.get("group"), frame.get("pos")
        if (
            not redelivered
            and isinstance(group, str)
            and isinstance(pos, str)
            and not self._advance(group, pos)
        ):
            self.duplicates += 1
            if ack_id is not None:
                self._remember(ack_id, True)
                self._ack(ack_id)
            return False
        if ack_id is not None:
            later = self._wants_app(frame.get("type"))
            self._remember(ack_id, not later)
            if not later:
                self._ack(ack_id)
        return True

    def _advance(self, group: str, pos: str) -> bool:
        """Move ``group``'s position to ``pos``; False when it is not past the last one."""
        last = self._positions.get(group)
        if last is not None:
            new, old = _parse_position(pos), _parse_position(last)
            if new is not None and old is not None and new[0] == old[0] and new[1] <= old[1]:
                log.debug("dropped %s position %s: already had %s", group, pos, last)
                return False
        self._positions[group] = pos
        return True

    def _queue(self, frame: dict[str, Any]) -> None:
        try:
            self._incoming.put_nowait(frame)
        except asyncio.QueueFull:
            frame_id = frame.get("id")
            if isinstance(frame_id, str) and self._seen.get(frame_id) is False:
                # Never given to the application: its redelivery must not be dropped.
                del self._seen[frame_id]
            log.warning("client queue full: dropped a %r message; read faster", frame.get("type"))

    def _gap(self, frame: dict[str, Any]) -> None:
        """Count a ``wsbus.gap`` and tell ``on_gap``; the frame goes on to receive()."""
        self.gaps += 1
        content = frame.get("content")
        reason = content.get("reason") if isinstance(content, dict) else None
        groups = content.get("groups") if isinstance(content, dict) else None
        log.warning(
            "the gateway says messages for this client may have been lost (%s%s)",
            reason,
            f"; groups {groups}" if groups else "",
        )
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


def _strings(value: object) -> list[str]:
    return [item for item in value if isinstance(item, str)] if isinstance(value, list) else []


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
