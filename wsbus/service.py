"""Writing services: the ``Service`` base class, ``@handles``, and the context handlers get.

A service is written once and runs unchanged on any bus: in the gateway's process on the
in-memory bus, or as its own process on the Pyro bus::

    from wsbus import Service, handles

    class Echo(Service):
        name = "echo"

        @handles("echo")
        async def echo(self, message, ctx):
            ctx.reply({"content": message.content, "sender": message.sender})

Handlers may be ``async def`` (run on the service's event loop: never block in them) or
plain ``def`` (run in a worker thread, so they may block). One service handles one message
at a time, in the order the bus delivered them, so its replies keep that order too.

A handler that raises is logged here, with its traceback, the message type and id, and the
service goes on with the next message. When the message came from a client, the client is
told ``service_error`` with the message's id as ``ref`` (and nothing of the exception).

On the in-memory bus, an idle service's async handler may start in the turn of the event
loop that delivered its message, as the service's own task (:meth:`ServiceRunner.offer`).
That uses two private asyncio functions (``asyncio.tasks._enter_task``, ``_leave_task``),
checked on CPython 3.11, 3.12 and 3.13, on asyncio's loop and on uvloop; on a Python
without them every message is queued for the service's task instead
(:func:`eager_dispatch_available`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import importlib
import inspect
import logging
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Generator, Mapping, Sequence
from typing import Any, ClassVar, Final, Literal, Protocol, TypeAlias, TypeVar

import msgspec

from . import control
from .envelope import (
    ClientAddress,
    ConnId,
    Envelope,
    EnvelopeId,
    GatewayAddress,
    IdFactory,
    NodeId,
    Recipients,
    ServiceAddress,
    node_of,
)
from .errors import BusUnavailable, ConfigError, ControlError, RequestTimeout
from .receipts import Receipts, merge
from .registry import ClientInfo

__all__ = [
    "FORGED_LOG_INTERVAL",
    "FROM_GATEWAYS",
    "Context",
    "Finished",
    "GatewayNodes",
    "Hosted",
    "Outcome",
    "Service",
    "ServiceLink",
    "ServiceRunner",
    "client_key",
    "eager_dispatch_available",
    "handles",
    "hosted_figures",
    "load_service",
    "serve_until_stopped",
]

log = logging.getLogger("wsbus.service")

_HANDLES_ATTR: Final = "__wsbus_handles__"
F = TypeVar("F", bound=Callable[..., Any])

GatewayNodes: TypeAlias = Callable[[], Awaitable[Sequence[NodeId]]]
"""What a bus runtime that spans gateways gives a service: an async function returning the
node ids of the gateways alive now. :meth:`ServiceLink.clients` asks each of them."""


Outcome: TypeAlias = Literal["handled", "failed", "stopped"]
"""How the handling of one envelope a :class:`ServiceRunner` accepted ended:

- ``"handled"``: its handler returned (or it had none: it was logged and dropped);
- ``"failed"``: its handler raised (logged; a client sender was told ``service_error``);
- ``"stopped"``: the runner stopped before its handler was done (it was still waiting,
  or its handler was cancelled): nobody was told, the runtime decides what to say.
"""

Finished: TypeAlias = Callable[[Envelope, Outcome], None]
"""A runtime's callback, called on the runner's loop thread once per envelope the runner
accepted into its inbox, when its handling ends (see :data:`Outcome`)."""


def handles(*types: str) -> Callable[[F], F]:
    """Mark a :class:`Service` method as the handler of one or more message types.

    The method is called as ``method(message, ctx)`` with the :class:`~wsbus.Envelope` and a
    :class:`Context`.
    """
    if not types:
        raise ConfigError("@handles needs at least one message type")

    def mark(function: F) -> F:
        setattr(function, _HANDLES_ATTR, (*getattr(function, _HANDLES_ATTR, ()), *types))
        return function

    return mark


class Service:
    """Base class of a wsbus service.

    Attributes:
        name: the service's name on the bus (defaults to the class name, lower-cased). Its
            messages carry ``ServiceAddress(name)`` as sender, and clients see it in ``from``.
        link: the service's connection to the bus, set once it is running; use it to send
            outside a handler.
        tracing: make an OpenTelemetry span for each message a handler takes, a child of
            the trace context the message carries, and carry the current span's context
            on in what the service sends (docs/tracing.md). Needs
            ``pip install 'wsbus[otel]'``. Set it on the class, on an instance before it
            is run, or with ``wsbus service --tracing``; a runner's ``tracing`` argument
            overrides it.
    """

    name: ClassVar[str] = ""
    tracing: bool = False
    _handlers: ClassVar[dict[str, str]] = {}
    link: ServiceLink

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("name"):
            cls.name = cls.__name__.lower()
        handlers: dict[str, str] = {}
        for klass in reversed(cls.__mro__):
            for attr, value in vars(klass).items():
                for type_ in getattr(value, _HANDLES_ATTR, ()):
                    handlers[type_] = attr
        cls._handlers = handlers

    @classmethod
    def handled_types(cls) -> frozenset[str]:
        """Return the message types the bus routes to this service by type.

        Every type it has a handler for, but ``wsbus.*`` ones: of those only
        ``wsbus.presence`` (the gateways' presence events) is routed by type. Handlers for
        ``wsbus.undeliverable``, ``wsbus.receipt``, ``wsbus.processed`` and the like get
        what gateways address to this service by name.
        """
        return frozenset(
            t for t in cls._handlers if not t.startswith("wsbus.") or t == control.PRESENCE
        )

    async def on_start(self) -> None:
        """Called once the service is on the bus, before its first message. Override it."""

    async def on_stop(self) -> None:
        """Called when the service leaves the bus. Override it."""


class ServiceLink:
    """A service's handle on the bus: send messages and ask the gateway for things.

    Created by the bus runtime, which supplies ``emit``: a function that puts a finished
    envelope on the bus, in call order. Every method stamps the service as the sender; a
    service cannot send as anyone else.

    Args:
        name: the service's name.
        emit: puts an envelope on the bus; may raise NoRoute or BusUnavailable.
        loop: the event loop the runtime runs on.
        timeout: the default seconds to wait for the gateway's answer to a request.
        gateways: on a bus with several gateways, the runtime's function that lists the
            live ones: :meth:`clients` then asks every one of them. Without it (one
            gateway, as on the in-memory bus) the one gateway answers.
    """

    def __init__(
        self,
        name: str,
        emit: Callable[[Envelope], None],
        loop: asyncio.AbstractEventLoop,
        *,
        timeout: float = 5.0,
        gateways: GatewayNodes | None = None,
    ) -> None:
        self.name = name
        self.address = ServiceAddress(name)
        self.timeout = timeout
        self._gateways = gateways
        self._emit = emit
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._ids = IdFactory(f"{name}-{IdFactory().prefix}")
        self._pending: dict[str, asyncio.Future[Envelope]] = {}
        self._receipts: dict[str, _ReceiptWait] = {}
        self.forged = 0
        """Envelopes dropped because their sender could not have sent them: a type only
        gateways send (:data:`FROM_GATEWAYS`) from anyone else, or a gateway's receipt
        speaking for another gateway. Each is logged, at most once a minute with a count."""
        # When the last forgery was logged (monotonic), and how many were dropped since.
        self._forged_logged: float | None = None
        self._forged_quiet = 0
        # Set by a tracing runner: adds the current span's context to what is sent.
        self._trace: Callable[[dict[str, str]], dict[str, str]] | None = None

    # -- sending -------------------------------------------------------------------------

    def send(
        self,
        recipients: Recipients,
        type: str,
        content: Any = None,
        *,
        reply_to: str | None = None,
        headers: dict[str, str] | None = None,
        receipt: bool = False,
        ack: bool = False,
    ) -> EnvelopeId:
        """Send a message to clients; return its id.

        Recipients that match no connection are reported back as ``wsbus.undeliverable``.
        Safe to call from a worker thread (a sync handler).

        Args:
            recipients: the clients to reach.
            type: the message type.
            content: the payload.
            reply_to: the id of the message this answers.
            headers: small string metadata.
            receipt: ask each gateway for a ``wsbus.receipt`` (to a handler of that type;
                :meth:`send_with_receipt` waits for them instead).
            ack: ask each client to acknowledge the message once processed: its frame
                carries ``"ack": true``, and a ``wsbus.processed`` (content
                :class:`~wsbus.control.Processed`) comes back to this service's handler
                of that type. Unacknowledged, it is redelivered when the client resumes.
        """
        if receipt or ack:
            headers = dict(headers) if headers else {}
            if receipt:
                headers[control.RECEIPT_HEADER] = "1"
            if ack:
                headers[control.ACK_HEADER] = "1"
        return self._put(type, content, recipients=recipients, reply_to=reply_to, headers=headers)

    async def send_with_receipt(
        self,
        recipients: Recipients,
        type: str,
        content: Any = None,
        *,
        ack: bool = False,
        # The design's signature (RESUME.md section 4), as clients() has self.timeout: the
        # wait covers the listing of gateways and the receipts, which a caller's own
        # asyncio.timeout could not tell apart in the error.
        timeout: float | None = None,  # noqa: ASYNC109
        reply_to: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Receipts:
        """Send a message to clients and wait for what became of it at every gateway.

        Waits for the receipt of each gateway concerned: the gateways owning the
        connections when ``recipients`` names connection ids only, else every live
        gateway (on a bus with one gateway, that one). A delivery counts written once it
        reached its client's socket: a message still queued holds the receipt until it is
        written or its connection closes.

        Args:
            recipients: the clients to reach.
            type: the message type.
            content: the payload.
            ack: also ask each client to acknowledge it (see :meth:`send`).
            timeout: seconds to wait; :attr:`timeout` by default.
            reply_to: the id of the message this answers.
            headers: small string metadata.

        Returns:
            The merged :class:`~wsbus.receipts.Receipts`.

        Raises:
            RequestTimeout: a gateway did not answer in time (its node id is in ``what``).
            BusUnavailable: the bus cannot take the message, or list the gateways, now.
        """
        wait = self.timeout if timeout is None else timeout
        expected: set[NodeId] | None = None
        absent: list[ConnId] = []
        if self._gateways is not None:
            try:
                async with asyncio.timeout(wait):
                    live = set(await self._gateways())
            except TimeoutError:
                what = f"the list of live gateways for service {self.name!r}"
                raise RequestTimeout(what, wait) from None
            names_only_connections = not (
                recipients.everyone or recipients.aliases or recipients.users or recipients.groups
            )
            if names_only_connections:
                expected = set()
                for conn_id in recipients.conn_ids:
                    if node_of(conn_id) in live:
                        expected.add(node_of(conn_id))
                    else:
                        absent.append(conn_id)
            else:
                expected = live
        id = self._ids()
        waiting = _ReceiptWait(self._loop.create_future(), expected)
        # Registered before sending: a bus may answer before _put returns.
        self._receipts[id] = waiting
        headers = dict(headers) if headers else {}
        headers[control.RECEIPT_HEADER] = "1"
        if ack:
            headers[control.ACK_HEADER] = "1"
        try:
            self._put(
                type, content, recipients=recipients, reply_to=reply_to, headers=headers, id=id
            )
            if expected is None or expected:
                async with asyncio.timeout(wait):
                    await waiting.done
        except TimeoutError:
            missing: list[str] = sorted((expected or set()) - waiting.parts.keys())
            if not missing:
                missing = ["the gateway"]
            what = f"receipts for {type} {id} from service {self.name!r} (gateways {missing})"
            raise RequestTimeout(what, wait) from None
        finally:
            self._receipts.pop(id, None)
        return merge(id, waiting.parts.values(), absent)

    def publish(
        self, type: str, content: Any = None, *, headers: dict[str, str] | None = None
    ) -> EnvelopeId:
        """Send a message to the services that handle ``type``; return its id."""
        return self._put(type, content, headers=headers)

    def _put(
        self,
        type: str,
        content: Any,
        *,
        recipients: Recipients | None = None,
        reply_to: str | None = None,
        headers: dict[str, str] | None = None,
        to: ServiceAddress | GatewayAddress | None = None,
        id: EnvelopeId | None = None,
    ) -> EnvelopeId:
        if headers is None:
            headers = {}
        if self._trace is not None:
            headers = self._trace(headers)
        envelope = Envelope(
            id=id if id is not None else self._ids(),
            type=type,
            sender=self.address,
            content=content,
            recipients=recipients,
            reply_to=reply_to,
            headers=headers,
            created=time.time(),
            to=to,
        )
        if threading.get_ident() == self._loop_thread:
            self._emit(envelope)
        else:
            self._loop.call_soon_threadsafe(self._emit_logged, envelope)
        return envelope.id

    def _emit_logged(self, envelope: Envelope) -> None:
        try:
            self._emit(envelope)
        except Exception as exc:
            log.warning(
                "service %r could not send %r from a worker thread: %s",
                self.name,
                envelope.type,
                exc,
            )

    # -- gateway control -----------------------------------------------------------------

    async def join(self, conn_id: ConnId, group: str) -> bool:
        """Add a connection to a group; return False when it was in it already."""
        return bool(
            await self._request(control.JOIN, control.GroupRequest(conn_id, group), _owner(conn_id))
        )

    async def leave(self, conn_id: ConnId, group: str) -> bool:
        """Take a connection out of a group; return False when it was not in it."""
        return bool(
            await self._request(
                control.LEAVE, control.GroupRequest(conn_id, group), _owner(conn_id)
            )
        )

    async def set_alias(self, conn_id: ConnId, alias: str) -> str:
        """Set a connection's alias; return the alias it got (the gateway may add a suffix).

        Aliases are unique across every gateway on the bus.

        Raises:
            ControlError: ``alias_taken`` (another connection has it), ``invalid_name``,
                ``unknown_connection``, or ``unavailable`` (on a bus with several gateways,
                the bus's alias table could not be reached: nothing was set; retry later).
        """
        return str(
            await self._request(
                control.ALIAS_SET, control.AliasRequest(conn_id, alias), _owner(conn_id)
            )
        )

    async def clear_alias(self, conn_id: ConnId) -> None:
        """Remove a connection's alias."""
        await self._request(control.ALIAS_CLEAR, control.ConnRequest(conn_id), _owner(conn_id))

    async def clients(self, group: str | None = None) -> list[ClientInfo]:
        """List the connected clients (or one group's members) with aliases and groups.

        On a bus with several gateways (the runtime gave ``gateways``), every live gateway
        is asked at once and the lists are joined, in the order the runtime lists the
        gateways: the whole list or an error, never part of it.

        Raises:
            RequestTimeout: a gateway did not answer within :attr:`timeout` (its node id
                is in the error's ``what``), or the runtime did not list the gateways in
                that time.
            ControlError: a gateway refused (the message names it).
            BusUnavailable: the bus cannot take the requests, or list the gateways, now.
        """
        request = control.ClientsRequest(group)
        if self._gateways is None:
            value = await self._request(control.CLIENTS, request, None)
            return msgspec.convert(value, list[ClientInfo])
        try:
            async with asyncio.timeout(self.timeout):
                listed = await self._gateways()
        except TimeoutError:
            what = f"the list of live gateways for service {self.name!r}"
            raise RequestTimeout(what, self.timeout) from None
        # A node listed twice is asked once.
        nodes = list(dict.fromkeys(listed))
        answers = await asyncio.gather(
            *(self._request(control.CLIENTS, request, GatewayAddress(node)) for node in nodes),
            return_exceptions=True,
        )
        merged: list[ClientInfo] = []
        for node, answer in zip(nodes, answers, strict=True):
            if isinstance(answer, ControlError):
                raise ControlError(answer.code, f"gateway {node!r}: {answer.message}")
            if isinstance(answer, BaseException):
                # The first failure in the gateways' order: the caller sees which one.
                raise answer
            merged += msgspec.convert(answer, list[ClientInfo])
        return merged

    async def presence(self, group: str) -> list[ClientInfo]:
        """Return who is in ``group`` now, on every gateway: the presence query.

        The same as ``clients(group)`` (and raises as it does). To hear joins and leaves as
        they happen, declare a handler with ``@handles("wsbus.presence")`` (content
        :class:`~wsbus.control.PresenceEvent`).
        """
        return await self.clients(group)

    async def disconnect(self, conn_id: ConnId, code: int = 4000, reason: str = "") -> None:
        """Close a client's connection with a close code (1000, 1001, 1008 or 4000-4999)."""
        await self._request(
            control.DISCONNECT, control.DisconnectRequest(conn_id, code, reason), _owner(conn_id)
        )

    async def _request(self, type: str, content: msgspec.Struct, to: GatewayAddress | None) -> Any:
        future: asyncio.Future[Envelope] = self._loop.create_future()
        request_id = self._ids()
        # Registered before sending: a bus may answer before _put returns.
        self._pending[request_id] = future
        try:
            self._put(type, msgspec.to_builtins(content), to=to, id=request_id)
            async with asyncio.timeout(self.timeout):
                answer = await future
        except TimeoutError:
            what = f"{type} from service {self.name!r}"
            if to is not None:
                what += f" to gateway {to.node!r}"
            raise RequestTimeout(what, self.timeout) from None
        finally:
            self._pending.pop(request_id, None)
        try:
            result = msgspec.convert(answer.content, control.Result)
        except msgspec.ValidationError as exc:
            raise ControlError("bad_result", f"the gateway's answer is malformed: {exc}") from None
        if not result.ok:
            raise ControlError(result.code or "failed", result.message or "refused")
        return result.value

    def accept_answer(self, envelope: Envelope) -> bool:
        """Resolve what waits for a gateway's answer or receipt; False if nothing waits.

        Only a gateway's answer counts: one from anyone else is dropped, counted in
        :attr:`forged` (True: it was taken care of).
        """
        if envelope.type == control.RECEIPT:
            return self._accept_receipt(envelope)
        return self.accept_result(envelope)

    def _accept_receipt(self, envelope: Envelope) -> bool:
        waiting = self._receipts.get(envelope.reply_to or "")
        if waiting is None:
            return False
        sender = envelope.sender
        if type(sender) is not GatewayAddress:
            self.drop_forged(envelope, "only a gateway sends receipts")
            return True
        try:
            part = msgspec.convert(envelope.content, control.Receipt)
        except msgspec.ValidationError as exc:
            log.warning(
                "service %r: a malformed receipt from %s: %s", self.name, envelope.sender, exc
            )
            return True
        if part.node != sender.node:
            # A gateway speaks for its own deliveries only: one that says another gateway
            # wrote (or dropped) a message would end the wait for that gateway's receipt.
            self.drop_forged(envelope, f"it speaks for gateway {part.node!r}")
            return True
        waiting.parts[part.node] = part
        expected = waiting.expected
        if not waiting.done.done() and (expected is None or expected <= waiting.parts.keys()):
            waiting.done.set_result(None)
        return True

    def accept_result(self, envelope: Envelope) -> bool:
        """Resolve a pending request with its answer; return False if none was waiting.

        An answer whose sender is not a gateway resolves nothing: it is dropped, counted in
        :attr:`forged` (and True is returned: it was taken care of).
        """
        if envelope.type != control.RESULT or envelope.reply_to is None:
            return False
        future = self._pending.get(envelope.reply_to)
        if future is None:
            return False
        if type(envelope.sender) is not GatewayAddress:
            self.drop_forged(envelope, "only a gateway answers requests")
            return True
        if not future.done():
            future.set_result(envelope)
        return True

    def drop_forged(self, envelope: Envelope, why: str) -> None:
        """Drop an envelope its sender could not have sent: count it, log it (rate-limited).

        Called by the runtime (:meth:`ServiceRunner.accept`) and by the link itself. The
        first is logged at once, then at most one line per :data:`FORGED_LOG_INTERVAL`
        seconds, with the count of those dropped quietly in between.
        """
        self.forged += 1
        now = time.monotonic()
        last = self._forged_logged
        if last is not None and now - last < FORGED_LOG_INTERVAL:
            self._forged_quiet += 1
            return
        quiet, self._forged_quiet, self._forged_logged = self._forged_quiet, 0, now
        since = f"; {quiet} more dropped since the last warning" if quiet else ""
        log.warning(
            "service %r dropped %s %s from %s: %s. Its sender is posing as a gateway it is "
            "not: check who holds that sender's bus credentials (ServiceLink.forged counts "
            "what is dropped%s)",
            self.name,
            envelope.type,
            envelope.id,
            _describe(envelope.sender),
            why,
            since,
        )


class _ReceiptWait:
    """A :meth:`ServiceLink.send_with_receipt` waiting for its gateways' receipts."""

    __slots__ = ("done", "expected", "parts")

    def __init__(self, done: asyncio.Future[None], expected: set[NodeId] | None) -> None:
        self.done = done
        # None: the one gateway, whichever answers.
        self.expected = expected
        self.parts: dict[NodeId, control.Receipt] = {}


FROM_GATEWAYS: Final = frozenset(
    {control.PRESENCE, control.PROCESSED, control.RECEIPT, control.RESULT, control.UNDELIVERABLE}
)
"""Types a service takes only from a gateway (a ``GatewayAddress`` sender, the bus's own
``GatewayAddress("bus")`` included): presence events, clients' acknowledgements, receipts,
answers to requests and undeliverable reports. :meth:`ServiceRunner.accept` drops one from
any other sender (:meth:`ServiceLink.drop_forged`): a service may send any type to another
by name, and these would otherwise pass for a gateway's word."""

FORGED_LOG_INTERVAL: Final = 60.0
"""The least seconds between two warnings about dropped forgeries (see
:meth:`ServiceLink.drop_forged`)."""

_ANSWERS: Final = frozenset({control.RESULT, control.RECEIPT, control.PROCESSED})
"""What gateways address to a service by name that it may well not handle: an answer to a
request (or a receipt) resolves what waits for it; otherwise, with no handler, it is
dropped quietly."""


def _describe(sender: object) -> str:
    """Name an envelope's sender for a log line."""
    if isinstance(sender, ServiceAddress):
        return f"service {sender.name!r}"
    if isinstance(sender, ClientAddress):
        return f"client {sender.conn_id}"
    if isinstance(sender, GatewayAddress):
        return f"gateway {sender.node!r}"
    return repr(sender)


def _owner(conn_id: ConnId) -> GatewayAddress:
    """The gateway that owns a connection: the node its id starts with."""
    return GatewayAddress(node_of(conn_id))


class Context:
    """What a handler gets beside the message: ways to answer it and to act on clients.

    Attributes:
        message: the message being handled.
        link: the service's :class:`ServiceLink`.
    """

    __slots__ = ("link", "message")

    def __init__(self, link: ServiceLink, message: Envelope) -> None:
        self.link = link
        self.message = message

    def reply(self, content: Any = None, *, type: str | None = None) -> EnvelopeId:
        """Answer the sender of the message, with ``reply_to`` set to its id.

        A client sender gets it on its connection; a service sender gets it by its name.
        The type defaults to the message's type plus ``.reply``.
        """
        message = self.message
        reply_type = type if type is not None else f"{message.type}.reply"
        sender = message.sender
        if isinstance(sender, ServiceAddress):
            return self.link._put(reply_type, content, reply_to=message.id, to=sender)
        if isinstance(sender, GatewayAddress):
            raise ControlError("bad_reply", "messages from the gateway cannot be replied to")
        return self.link.send(
            Recipients(conn_ids=(sender.conn_id,)), reply_type, content, reply_to=message.id
        )

    def send(
        self,
        recipients: Recipients,
        type: str,
        content: Any = None,
        *,
        receipt: bool = False,
        ack: bool = False,
    ) -> EnvelopeId:
        """Send a message to clients (see :meth:`ServiceLink.send`)."""
        return self.link.send(recipients, type, content, receipt=receipt, ack=ack)

    async def send_with_receipt(
        self,
        recipients: Recipients,
        type: str,
        content: Any = None,
        *,
        ack: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Receipts:
        """Send and wait for the receipts (see :meth:`ServiceLink.send_with_receipt`)."""
        return await self.link.send_with_receipt(
            recipients, type, content, ack=ack, timeout=timeout
        )

    async def join(self, conn_id: ConnId, group: str) -> bool:
        """Add a connection to a group (see :meth:`ServiceLink.join`)."""
        return await self.link.join(conn_id, group)

    async def leave(self, conn_id: ConnId, group: str) -> bool:
        """Take a connection out of a group (see :meth:`ServiceLink.leave`)."""
        return await self.link.leave(conn_id, group)

    async def set_alias(self, conn_id: ConnId, alias: str) -> str:
        """Set a connection's alias (see :meth:`ServiceLink.set_alias`)."""
        return await self.link.set_alias(conn_id, alias)

    async def clear_alias(self, conn_id: ConnId) -> None:
        """Remove a connection's alias (see :meth:`ServiceLink.clear_alias`)."""
        await self.link.clear_alias(conn_id)

    async def clients(self, group: str | None = None) -> list[ClientInfo]:
        """List clients (see :meth:`ServiceLink.clients`)."""
        return await self.link.clients(group)

    async def presence(self, group: str) -> list[ClientInfo]:
        """Return who is in ``group`` now, on every gateway (see :meth:`ServiceLink.presence`)."""
        return await self.link.presence(group)

    async def disconnect(self, conn_id: ConnId, code: int = 4000, reason: str = "") -> None:
        """Close a client's connection (see :meth:`ServiceLink.disconnect`)."""
        await self.link.disconnect(conn_id, code, reason)


# Which task asyncio says is running: swapped while a handler starts in another's turn,
# as Python 3.12's eager tasks do. Private asyncio functions, present (and swapping
# asyncio.current_task()) in CPython 3.11, 3.12 and 3.13, on asyncio's loop and uvloop's
# alike (uvloop runs asyncio's own Task); tests/wsbus/test_service_eager.py checks them.
# Where they are missing, runners queue every message, as without ``eager``.
_TaskSwap = Callable[[asyncio.AbstractEventLoop, "asyncio.Task[Any]"], None]
_enter_task: _TaskSwap | None = getattr(asyncio.tasks, "_enter_task", None)
_leave_task: _TaskSwap | None = getattr(asyncio.tasks, "_leave_task", None)


def eager_dispatch_available() -> bool:
    """Tell whether this Python lets a runner start a handler in its caller's turn.

    It needs ``asyncio.tasks._enter_task`` and ``_leave_task`` (CPython 3.11 to 3.13 have
    them); without them an eager :class:`ServiceRunner` queues every message instead.
    """
    return _enter_task is not None and _leave_task is not None


class _Resumed:
    """Awaits a coroutine already started and suspended on ``awaited`` (ServiceRunner.offer).

    It passes what the coroutine awaits to the task awaiting this, and the task's answers
    (a result, an exception, a cancel) back to the coroutine: the task carries it on as if
    it had started it.
    """

    __slots__ = ("_awaited", "_coro")

    def __init__(self, coro: Coroutine[Any, Any, Any], awaited: Any) -> None:
        self._coro = coro
        self._awaited = awaited

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, awaited = self._coro, self._awaited
        while True:
            try:
                sent = yield awaited
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:
                try:
                    awaited = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    awaited = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


def client_key(envelope: Envelope) -> object:
    """Who a client's message is from, for its share of a service's room; None otherwise."""
    sender = envelope.sender
    return sender.conn_id if type(sender) is ClientAddress else None


class _Turn:
    """A sender's place in line for room in a service's inbox (ServiceRunner.wait_for_room)."""

    __slots__ = ("deadline", "event", "expired", "key", "patience", "share")

    def __init__(self, key: object, deadline: float | None, now: float) -> None:
        self.event = asyncio.Event()
        self.key = key
        self.deadline = deadline
        # How long the service may take nothing before this sender gives up (ServiceRunner
        # moves the deadline on each time it takes an envelope).
        self.patience = None if deadline is None else deadline - now
        # Taken out of line by the runner's timer: its deadline passed.
        self.expired = False
        # Places reserved for this sender when it was let in, until it runs.
        self.share = 0


class ServiceRunner:
    """Runs one service on an event loop: takes envelopes from a bus, calls handlers.

    Bus runtimes (the in-memory bus, a Pyro service process) create one per service and
    call :meth:`accept` with each envelope addressed to it.

    The inbox is bounded. A runtime that can hold its sender back (the in-memory bus holds
    the gateway's reader of the client that sent the message) waits with
    :meth:`wait_for_room` while :meth:`has_room` is False; one that cannot gets
    BusUnavailable from :meth:`accept`. Those waiting are let in first come, first served,
    and before anyone who did not wait: a burst from one client cannot starve another.

    Room is given per batch, not per envelope: once senders wait, they are let in when the
    service has drained its inbox to the low-water mark (half of ``inbox_size``), and each
    one let in with a ``key`` gets an equal share of the free places, and never fewer than
    ``inbox_size // 32`` of them (at most 32): with more senders waiting than places, fewer
    are let in at a time, each with more, still in the order they came. A sender spends
    its share with :meth:`take_credit` without waiting again (a share not spent by the next
    time the inbox drains to the mark goes back to the pool). Waking a sender once per
    envelope would cost a task switch per message (measured: 20 us of CPU per frame with
    1,000 clients flooding one service, against 5.5), and would let a few waiting senders
    convoy so that nobody ever found room without waiting.

    Args:
        service: the service instance.
        emit: the runtime's function that puts an envelope on the bus.
        inbox_size: how many envelopes may wait; past that :meth:`accept` refuses with
            BusUnavailable, so a stuck service cannot eat the gateway's memory.
        timeout: seconds to wait for the gateway's answer to control requests.
        gateways: on a bus with several gateways, lists the live ones (see
            :class:`ServiceLink`).
        finished: called once per envelope taken into the inbox when its handling ends,
            with how it ended (:data:`Outcome`): a runtime that told the sender it holds
            the envelope learns when it no longer does (the NATS bus tells the gateway,
            which fails what a dead instance held). Not called for answers to the
            service's own control requests (they resolve the request, never queue).
            It must not raise (what it raises is logged and ignored).
        eager: let :meth:`offer` run an async handler at once, in the caller's turn of
            the event loop, when the service is idle (see :meth:`offer`). For a runtime
            whose services share the caller's loop (the in-memory bus). It relies on two
            private asyncio functions, in CPython 3.11 to 3.13 (asyncio's loop or
            uvloop); where they are missing (:func:`eager_dispatch_available`), the
            runner queues every message, as without it.
        tracing: make a span per handled message and carry trace context on in what the
            service sends (see :attr:`Service.tracing`, which None defers to). Chosen
            here, once: off, nothing is done per message.

    Raises:
        MissingExtra: tracing is on and OpenTelemetry is not installed (``wsbus[otel]``).
    """

    def __init__(
        self,
        service: Service,
        emit: Callable[[Envelope], None],
        *,
        inbox_size: int = 1000,
        timeout: float = 5.0,
        gateways: GatewayNodes | None = None,
        finished: Finished | None = None,
        eager: bool = False,
        tracing: bool | None = None,
    ) -> None:
        self.service = service
        self.name = service.name
        self.types = type(service).handled_types()
        self.link = ServiceLink(
            service.name, emit, asyncio.get_running_loop(), timeout=timeout, gateways=gateways
        )
        service.link = self.link
        # A deque and an event: cheaper per message than asyncio.Queue, and bounded here.
        self._inbox: deque[Envelope] = deque()
        self._inbox_size = inbox_size
        self.failures = 0
        """Messages whose handler raised (each logged, and told to a client sender)."""
        # Places a queued sender may take: the inbox size less the places held across an
        # await (hold_room) and those reserved for senders let in (their shares and
        # credits). One attribute, so that has_room costs what it did without.
        self._limit = inbox_size
        # Senders waiting are let in once the inbox has drained to this (hysteresis).
        self._low = inbox_size // 2
        # The fewest places a sender with a key is let in with (fewer senders let in at a
        # time, each with more): when more senders wait than there are places, a share of
        # one place each would cost a wake-up, a task switch, per envelope, more than the
        # envelope itself (1,000 clients flooding one service: 20 us of CPU per frame,
        # against 5.5 with this).
        self._least_share = max(1, min(32, inbox_size // 32))
        self._ready = asyncio.Event()
        # Senders waiting for room, in arrival order; the first ones' turns are set when
        # places free. Each stays in line until it has taken its place (wait_for_room).
        self._waiters: deque[_Turn] = deque()
        self._woken = 0
        # Places reserved for senders let in, by their key, not yet taken (take_credit).
        self._credits: dict[object, int] = {}
        self._stopped = False
        self._finished = finished
        # Set by stop(drain=...) while it waits for the inbox to empty; _run sets it when
        # it finds nothing left to do.
        self._drained: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._eager = eager and eager_dispatch_available()
        self._loop = asyncio.get_running_loop()
        # Fires at the earliest deadline of the senders waiting (wait_for_room).
        self._timer: asyncio.TimerHandle | None = None
        # Loop time the runner last took an envelope while senders waited: a waiting
        # sender's deadline counts from there (a slow service is not a stuck one).
        self._took_at = float("-inf")
        # True while _run waits for work with nothing to do (only with eager): a handler
        # may then run in the caller's turn of the loop (offer).
        self._idle = False
        # Handlers run in the runner's task's context, whichever way they start.
        self._context = contextvars.copy_context()
        # A handler offer started that awaited: _run carries it on first.
        self._resume: tuple[Envelope, Coroutine[Any, Any, Any], Any] | None = None
        # Looked up once: (bound method, is it a coroutine function) per message type.
        self._dispatch: dict[str, tuple[Callable[..., Any], bool]] = {}
        for type_, attr in service._handlers.items():
            method = getattr(service, attr)
            self._dispatch[type_] = (method, inspect.iscoroutinefunction(method))
        if service.tracing if tracing is None else tracing:
            self._trace_handlers()

    def _trace_handlers(self) -> None:
        """Wrap every handler in a span and trace what the link sends (tracing on)."""
        from .tracing import ServiceTracing

        tracing = ServiceTracing(self.name)
        self.link._trace = tracing.inject
        self._dispatch = {
            type_: (tracing.handler(method, is_async), is_async)
            for type_, (method, is_async) in self._dispatch.items()
        }

    def accept(self, envelope: Envelope) -> None:
        """Take one envelope for this service. Call on the runner's loop thread.

        An envelope of a type only gateways send (:data:`FROM_GATEWAYS`) whose sender is
        not a gateway is dropped, counted in :attr:`forged`.

        Raises:
            BusUnavailable: the service's inbox is full.
        """
        if envelope.type in FROM_GATEWAYS:
            if type(envelope.sender) is not GatewayAddress:
                self.link.drop_forged(envelope, "only a gateway sends that type")
                return
            if envelope.type in _ANSWERS:
                if self.link.accept_answer(envelope):
                    return
                if envelope.type not in self._dispatch:
                    # A late answer (its request timed out), or a receipt or acknowledgement
                    # nobody asked to handle: nobody reads it, so it takes no place a waiting
                    # sender was promised.
                    log.debug(
                        "service %r: %s for %s, which nothing waits for; dropped",
                        self.name,
                        envelope.type,
                        envelope.reply_to,
                    )
                    return
        if len(self._inbox) >= self._inbox_size:
            raise BusUnavailable(f"service {self.name!r} is busy (inbox full)", whole_bus=False)
        self._inbox.append(envelope)
        self._ready.set()

    @property
    def forged(self) -> int:
        """Envelopes dropped because no gateway sent them (see :attr:`ServiceLink.forged`)."""
        return self.link.forged

    def offer(self, envelope: Envelope, handle_now: bool = False) -> bool:
        """Take one envelope if there is room for it now, without waiting.

        Room is a free place nobody waits for (:meth:`has_room`), or one reserved for the
        client that sent it (:meth:`take_credit`). With ``handle_now`` and an eager runner
        whose service is idle (nothing in its inbox, no handler running), an async
        handler is called at once, in the caller's turn of the event loop, as the
        runner's own task (``asyncio.current_task()`` and context variables are the
        task's): a message needs no task switch to be handled. What the handler does
        before its first await happens before this returns; if it awaits, the runner's
        task carries it on, before anything else in the inbox. The service is idle again
        once the runner's task has looked, in the loop's next turn: of a burst offered in
        one turn, the first is handled at once and the rest queue, taken as one batch.

        Args:
            envelope: the envelope.
            handle_now: the caller has nothing more to do for this envelope that must
                come before what its handler does.

        Returns:
            True: taken (queued or handled). False: no room; nothing was done.
        """
        inbox = self._inbox
        if self._waiters or len(inbox) >= self._limit:
            # take_credit, inline (this runs once per client frame, and a burst finds the
            # inbox full): a place reserved for this client when it was let in.
            credits = self._credits
            if not credits:
                return False
            sender = envelope.sender
            key = sender.conn_id if type(sender) is ClientAddress else None
            left = credits.get(key)
            if not left or len(inbox) >= self._inbox_size:
                return False
            if left == 1:
                del credits[key]
            else:
                credits[key] = left - 1
            self._limit += 1
        elif handle_now and self._idle and not inbox:
            entry = self._dispatch.get(envelope.type)
            if entry is not None and entry[1] and envelope.type not in FROM_GATEWAYS:
                self._handle_now(envelope, entry[0])
                return True
        if envelope.type in FROM_GATEWAYS or len(inbox) >= self._inbox_size:
            self.accept(envelope)  # checks the sender, or refuses: the inbox is full
        else:
            # accept, inline.
            inbox.append(envelope)
            self._ready.set()
        return True

    def _handle_now(self, envelope: Envelope, method: Callable[..., Any]) -> None:
        """Start ``envelope``'s async handler in the caller's turn, as the runner's task."""
        task = self._task
        assert task is not None  # idle: _run is waiting
        loop = self._loop
        enter, leave = _enter_task, _leave_task
        assert enter is not None and leave is not None  # else the runner is not eager
        # Busy meanwhile: what the handler sends to this service queues behind it.
        self._idle = False
        outcome: Outcome | None = None
        caller = asyncio.current_task(loop)
        if caller is not None:
            leave(loop, caller)
        enter(loop, task)
        try:
            try:
                # The call too: a handler whose call raises (its signature) is the
                # service's failure, as on the queued path, not the caller's (the bus's).
                coro = method(envelope, Context(self.link, envelope))
                awaited = self._context.run(coro.send, None)
            except StopIteration:
                outcome = "handled"
            except (Exception, asyncio.CancelledError):
                # The runner's task is not running, and nothing is thrown into a plain
                # call: a CancelledError here is the handler's own (it awaited a cancelled
                # future, or raised it), its failure, never a cancel of the caller.
                self._failed(envelope)
                outcome = "failed"
            else:
                self._resume = (envelope, coro, awaited)
                self._ready.set()
        finally:
            leave(loop, task)
            if caller is not None:
                enter(loop, caller)
        if outcome is not None:
            # Idle again only once the runner's task has looked (next turn): what else
            # comes in this turn queues, and the task takes it as one batch. A message
            # at a time (a round trip) is handled at once each time; a burst costs one
            # task switch, not one per message, and not a handler call's extra cost.
            self._ready.set()
            if self._finished is not None:
                self._end(envelope, outcome)

    def figures(self) -> dict[str, int]:
        """What a metrics scrape reports of this runner (``wsbus service --metrics``).

        ``inbox``: envelopes waiting now; ``inbox_size``: the most that may;
        ``waiting_senders``: senders waiting for room; ``failures_total``: handlers that
        raised since start.
        """
        return {
            "inbox": len(self._inbox),
            "inbox_size": self._inbox_size,
            "waiting_senders": len(self._waiters),
            "failures_total": self.failures,
        }

    def has_room(self) -> bool:
        """Return True when the inbox has a free place and nobody is waiting for one.

        A sender that gets False and can wait calls :meth:`wait_for_room` (after
        :meth:`take_credit`, if it was let in with a key before): taking the place now
        would jump the queue of those waiting. One that cannot wait refuses.
        """
        return not self._waiters and len(self._inbox) < self._limit

    def take_credit(self, key: object) -> bool:
        """Take one of the places reserved for the sender ``key`` when it was let in.

        Returns:
            True: the caller holds a place and must :meth:`accept` its envelope before it
            next awaits. False: ``key`` has no place reserved (or the inbox is full after
            all): the caller waits its turn with :meth:`wait_for_room`.
        """
        credits = self._credits
        if not credits:
            return False
        left = credits.get(key)
        if not left or len(self._inbox) >= self._inbox_size:
            return False
        if left == 1:
            del credits[key]
        else:
            credits[key] = left - 1
        self._limit += 1
        return True

    async def wait_for_room(self, key: object = None, deadline: float | None = None) -> None:
        """Wait, in turn, until the inbox has a free place for the caller.

        On return the caller holds a place: it must :meth:`accept` its envelope before it
        next awaits, give the place to the next sender with :meth:`release_room`, or keep
        it across awaits with :meth:`hold_room`. Cancelling the wait (a caller's timeout)
        passes the turn on.

        Args:
            key: who is waiting (the in-memory bus passes the client's connection id). A
                sender let in with a key gets its share of the free places: the rest of
                its share is reserved for it, to take with :meth:`take_credit`. Without a
                key, one place.
            deadline: the loop time (``loop.time()``) to give up waiting at if the
                service takes nothing meanwhile. Each envelope it takes moves the deadline
                on to as long after that: the wait is refused only once the service took
                nothing for ``deadline`` less the time of the call (it is stuck), however
                long a slow service makes the caller wait for its turn. One timer per
                runner watches every wait's deadline (a timer per wait, as
                ``asyncio.timeout`` makes, costs a heap entry per message when many
                senders wait their turn).

        Raises:
            BusUnavailable: the runner is stopped (now or while waiting).
            TimeoutError: ``deadline`` passed, the service taking nothing meanwhile,
                before the caller's turn came; the turn is passed on.
        """
        if self._stopped:
            raise BusUnavailable(f"service {self.name!r} has stopped", whole_bus=False)
        if self.has_room():
            return
        turn = _Turn(key, deadline, self._loop.time())
        self._waiters.append(turn)
        if deadline is not None:
            self._watch(deadline)
        if len(self._inbox) <= self._low:
            # The inbox is below its mark already: nothing will drain to it again, so let
            # in now whoever there is room for (shares nobody spent go back first).
            self._let_next_in(reclaim=True)
        holds_place = False
        try:
            while True:
                await turn.event.wait()
                if turn.expired:
                    raise TimeoutError
                if self._stopped:
                    raise BusUnavailable(f"service {self.name!r} has stopped", whole_bus=False)
                share, turn.share = turn.share, 0
                self._limit += share
                if len(self._inbox) < self._limit:
                    holds_place = True
                    # The rest of the share, as far as the inbox really has room for it (an
                    # answer to a request takes a place without waiting).
                    credit = min(share - 1, self._limit - len(self._inbox) - 1)
                    if credit > 0 and key is not None:
                        self._limit -= credit
                        self._credits[key] = self._credits.get(key, 0) + credit
                    return
                # Woken, but the place went to a sender that does not queue: wait again,
                # first among those not woken.
                self._waiters.remove(turn)
                self._woken -= 1
                turn.event.clear()
                self._waiters.insert(self._woken, turn)
                if turn.deadline is not None:
                    self._watch(turn.deadline)
        finally:
            if not turn.expired:
                if turn.event.is_set():
                    self._woken -= 1
                # Woken but cancelled before it ran: its share goes to the next in line.
                self._limit += turn.share
                turn.share = 0
                self._waiters.remove(turn)
            if not holds_place:
                self._let_next_in(floor=False)

    def _watch(self, deadline: float) -> None:
        """Have the runner's timer fire by ``deadline``."""
        timer = self._timer
        if timer is None or deadline < timer.when():
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(deadline, self._expire)

    def _expire(self) -> None:
        """Take out of line, refused, the senders not let in by their deadline."""
        self._timer = None
        now = self._loop.time()
        waiters = self._waiters
        following: float | None = None
        # The first _woken are let in already (their place is theirs): only the others.
        for turn in list(waiters)[self._woken :]:
            deadline = turn.deadline
            if deadline is None:
                continue
            if deadline <= now and turn.patience is not None:
                # Counted from the service's last take: slow is not stuck.
                deadline = turn.deadline = max(deadline, self._took_at + turn.patience)
            if deadline <= now:
                waiters.remove(turn)
                turn.expired = True
                turn.event.set()
            elif following is None or deadline < following:
                following = deadline
        if following is not None:
            self._watch(following)

    def release_room(self) -> None:
        """Give back, unused, the place :meth:`wait_for_room` held for the caller."""
        self._let_next_in(floor=False)

    def hold_room(self) -> None:
        """Keep the caller's place (free now, or given by :meth:`wait_for_room`) across awaits.

        A sender that needs places in several inboxes at once (all or nothing) holds each
        one it gets while it waits for the next: nobody else takes it meanwhile. It then
        calls :meth:`accept_held` or :meth:`release_held` exactly once.
        """
        self._limit -= 1

    def accept_held(self, envelope: Envelope) -> None:
        """Take an envelope into the place :meth:`hold_room` kept for it."""
        self._limit += 1
        self.accept(envelope)

    def release_held(self) -> None:
        """Give back, unused, a place :meth:`hold_room` kept: the next in line gets it."""
        self._limit += 1
        self._let_next_in(floor=False)

    def _let_next_in(self, reclaim: bool = False, floor: bool = True) -> None:
        """Let in, in order, as many senders waiting as there are free places.

        The woken are the first ``_woken`` in line (their events set); each keeps its place
        in line until it has taken its envelope's place, so that newcomers wait behind it.
        The free places are shared out equally between those let in with a key (one each
        for the others), at least ``_least_share`` each, and reserved for them until they
        take them: a service draining fast lets a batch in per turn of the event loop, not
        one envelope. While fewer places than that are free and the inbox holds
        something, nobody is let in: the service's next take calls again.

        Args:
            reclaim: first give back to the pool the places reserved for senders let in
                before and not taken since (the inbox drained to its mark meanwhile).
            floor: keep to ``_least_share``; without it, whatever is free goes out (a
                place given back, unused, goes to the next in line as it is).
        """
        if reclaim and self._credits:
            self._limit += sum(self._credits.values())
            self._credits.clear()
        waiters = self._waiters
        unwoken = len(waiters) - self._woken
        free = self._limit - len(self._inbox)
        if unwoken <= 0 or free <= 0:
            return
        least = self._least_share if floor else 1
        if free < least and self._inbox:
            # Too few places to be worth a wake-up: the next envelope the service takes
            # calls again, with one more (an empty inbox lets in whatever there is).
            return
        share = max(least, free // unwoken)
        woken = self._woken
        while free > 0 and woken < len(waiters):
            turn = waiters[woken]
            turn.share = given = min(share, free) if turn.key is not None else 1
            free -= given
            self._limit -= given
            turn.event.set()
            woken += 1
        self._woken = woken

    async def start(self) -> None:
        """Run the service's ``on_start`` and begin handling messages."""
        await self.service.on_start()
        self._task = asyncio.create_task(
            self._run(), name=f"wsbus-service-{self.name}", context=self._context
        )

    async def stop(self, *, drain: float = 0.0) -> None:
        """Stop handling messages and run ``on_stop``.

        With ``drain`` > 0, first let the service handle what its inbox holds, for up to
        ``drain`` seconds (the runtime stops feeding it first: the runner still takes
        what :meth:`accept` is given meanwhile, answers to the handlers' requests among
        them). What is left then (waiting, or a handler still running: it is cancelled)
        is dropped, each reported ``"stopped"`` to ``finished``. Senders waiting for room
        get BusUnavailable.
        """
        self._stopped = True
        self._idle = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for turn in self._waiters:
            turn.event.set()
        self._woken = len(self._waiters)
        task = self._task
        if task is not None and drain > 0 and not task.done():
            drained = self._drained = asyncio.Event()
            self._ready.set()  # an idle loop looks again, and says so
            try:
                async with asyncio.timeout(drain):
                    await drained.wait()
            except TimeoutError:
                log.warning(
                    "service %r stopped after %g s of draining with a handler still running "
                    "and %d messages waiting; they are dropped",
                    self.name,
                    drain,
                    len(self._inbox),
                )
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self._task = None
        if self._resume is not None:
            # A handler offer started, which the task did not get to carry on.
            envelope, coro, _ = self._resume
            self._resume = None
            try:
                coro.close()
            except RuntimeError as exc:
                # Its finally awaited ("coroutine ignored GeneratorExit"): the handler's
                # bug, which must not fail the stop of the bus and gateway.
                log.warning(
                    "service %r: a handler for %r (id %s) did not stop when closed: %s",
                    self.name,
                    envelope.type,
                    envelope.id,
                    exc,
                )
            self._end(envelope, "stopped")
        inbox, self._inbox = self._inbox, deque()
        for envelope in inbox:
            self._end(envelope, "stopped")
        await self.service.on_stop()

    def _end(self, envelope: Envelope, outcome: Outcome) -> None:
        """Tell the runtime how an envelope's handling ended; never raises."""
        finished = self._finished
        if finished is None:
            return
        try:
            finished(envelope, outcome)
        except Exception:
            log.exception("service %r: the runtime's finished callback failed", self.name)

    async def _run(self) -> None:
        inbox = self._inbox
        dispatch = self._dispatch
        link = self.link
        while True:
            if self._resume is not None:
                await self._carry_on()
                continue
            if not inbox:
                if self._drained is not None:
                    self._drained.set()
                self._ready.clear()
                if self._credits and not self._waiters:
                    # Idle, nobody waiting: places reserved for senders let in before (gone,
                    # or done with their burst) go back to the pool, for senders that
                    # cannot wait (services, the gateway's own envelopes).
                    self._limit += sum(self._credits.values())
                    self._credits.clear()
                self._idle = self._eager and not self._stopped
                handed_on = False
                try:
                    await self._ready.wait()
                except asyncio.CancelledError:
                    if self._resume is None or self._stopped:
                        raise
                    # Meant for the handler offer started, before this task picked it up
                    # (its asyncio.timeout ran out, a cancel of current_task()): the
                    # handler gets it where it awaits, as if this task had been running it.
                    handed_on = True
                finally:
                    self._idle = False
                if handed_on:
                    await self._carry_on(cancelled=True)
                continue
            envelope = inbox.popleft()
            if len(self._waiters) > self._woken:
                self._took_at = self._loop.time()
                if len(inbox) <= self._low:
                    self._let_next_in(reclaim=True)
            entry = dispatch.get(envelope.type)
            outcome: Outcome
            try:
                if entry is None or not entry[1]:
                    outcome = await self._handle(envelope)
                else:
                    # The common case, an async handler, inline: no extra coroutine per
                    # message.
                    try:
                        await entry[0](envelope, Context(link, envelope))
                        outcome = "handled"
                    except Exception:
                        self._failed(envelope)
                        outcome = "failed"
                    except asyncio.CancelledError:
                        if not self._handlers_own_cancel():
                            raise
                        self._failed(envelope)
                        outcome = "failed"
            except asyncio.CancelledError:
                # Stopped mid-handler: the handler did not finish.
                self._end(envelope, "stopped")
                raise
            if self._finished is not None:
                self._end(envelope, outcome)

    async def _carry_on(self, cancelled: bool = False) -> None:
        """Carry on the handler :meth:`offer` started, from where it awaited.

        Args:
            cancelled: the task was cancelled before it picked the handler up: the handler
                gets the cancel first, as a task's coroutine does (what it awaits is
                cancelled; failing that, CancelledError is thrown in where it awaits).
        """
        assert self._resume is not None
        envelope, coro, awaited = self._resume
        self._resume = None
        outcome: Outcome
        try:
            try:
                done = False
                if cancelled and not (asyncio.isfuture(awaited) and awaited.cancel()):
                    try:
                        awaited = coro.throw(asyncio.CancelledError())
                    except StopIteration:
                        done = True
                if not done:
                    await _Resumed(coro, awaited)
                outcome = "handled"
            except Exception:
                self._failed(envelope)
                outcome = "failed"
            except asyncio.CancelledError:
                if not self._handlers_own_cancel():
                    raise
                self._failed(envelope)
                outcome = "failed"
        except asyncio.CancelledError:
            self._end(envelope, "stopped")
            raise
        if self._finished is not None:
            self._end(envelope, outcome)

    def _handlers_own_cancel(self) -> bool:
        """Tell whether a CancelledError out of a handler is its own, not a cancel of the task.

        A cancel of the task (stop, the loop's shutdown, a cancel of ``current_task()``)
        is counted by ``Task.cancelling()``, and ``asyncio.timeout`` takes back the one it
        made; a CancelledError the handler raised, or got from a cancelled future, is not.
        """
        task = asyncio.current_task()
        return not self._stopped and task is not None and task.cancelling() == 0

    async def handle(self, envelope: Envelope) -> None:
        """Call the handler for one envelope; a failing handler is logged, never raised."""
        await self._handle(envelope)

    async def _handle(self, envelope: Envelope) -> Outcome:
        entry = self._dispatch.get(envelope.type)
        if entry is None:
            if envelope.type in _ANSWERS:
                log.debug("service %r: a late %s; dropped", self.name, envelope.type)
            elif envelope.type == control.UNDELIVERABLE:
                log.info(
                    "service %r: message %s was not delivered: %s",
                    self.name,
                    envelope.reply_to,
                    envelope.content,
                )
            else:
                log.warning("service %r has no handler for %r; dropped", self.name, envelope.type)
            return "handled"
        method, is_async = entry
        ctx = Context(self.link, envelope)
        try:
            if is_async:
                await method(envelope, ctx)
            else:
                await asyncio.to_thread(method, envelope, ctx)
        except Exception:
            self._failed(envelope)
            return "failed"
        except asyncio.CancelledError:
            if not self._handlers_own_cancel():
                raise
            self._failed(envelope)
            return "failed"
        return "handled"

    def _failed(self, envelope: Envelope) -> None:
        """Log a handler's exception; tell a client sender ``service_error``.

        Called from the ``except`` block, so the log carries the traceback. Never raises.
        """
        self.failures += 1
        sender = envelope.sender
        if not isinstance(sender, ClientAddress):
            # A service's (or the gateway's) message: its sender has no client to tell, and
            # this log is where the failure belongs.
            log.exception(
                "service %r failed handling %r (id %s) from %s; it carries on with the next "
                "message",
                self.name,
                envelope.type,
                envelope.id,
                sender,
            )
            return
        log.exception(
            "service %r failed handling %r (id %s) from client %s; the client is told "
            "service_error, and the service carries on with the next message",
            self.name,
            envelope.type,
            envelope.id,
            sender.conn_id,
        )
        try:
            # Addressed to the node that owns the connection: on a bus with several
            # gateways, only that one can reach the client. In order after whatever the
            # handler sent before it raised.
            self.link._put(
                control.FAILED,
                msgspec.to_builtins(control.Failed(sender.conn_id, envelope.id)),
                to=GatewayAddress(node_of(sender.conn_id)),
            )
        except Exception as exc:
            log.warning(
                "service %r could not tell client %s that handling %s failed: %s",
                self.name,
                sender.conn_id,
                envelope.id,
                exc,
            )


def load_service(spec: str) -> Service:
    """Import ``MODULE:CLASS`` and return an instance of the service class.

    Raises:
        ConfigError: the spec is malformed, or does not name a Service subclass.
    """
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise ConfigError(f"expected MODULE:CLASS, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import module {module_name!r}: {exc}") from exc
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Service)):
        raise ConfigError(f"{spec!r} is not a wsbus.Service subclass")
    return cls()


class Hosted(Protocol):
    """A bus runtime's host of one service process, as :func:`serve_until_stopped` runs it."""

    async def start(self) -> None:
        """Connect to the bus and start taking the service's messages."""
        ...

    async def close(self) -> None:
        """Stop taking messages, finish or report what is held, and disconnect."""
        ...


_HOSTS: weakref.WeakSet[Hosted] = weakref.WeakSet()
"""The hosts :func:`serve_until_stopped` runs in this process (one, for ``wsbus service``)."""


def hosted_figures() -> list[tuple[str, Mapping[str, int]]]:
    """Each running service host's name and figures, for ``wsbus service --metrics``.

    A host reports figures when it has a ``figures()`` method (the Pyro and NATS hosts do):
    its runner's (:meth:`ServiceRunner.figures`) and its link's. Read at scrape time.
    """
    found: list[tuple[str, Mapping[str, int]]] = []
    for host in list(_HOSTS):
        figures = getattr(host, "figures", None)
        if callable(figures):
            service = getattr(host, "service", None)
            name = service.name if isinstance(service, Service) else getattr(host, "name", "?")
            found.append((str(name), figures()))
    return found


async def serve_until_stopped(make_host: Callable[[], Hosted], name: str) -> None:
    """Run a service process's host until SIGINT or SIGTERM, then close it.

    The body of every bus runtime's ``run_service``. ``make_host`` is called on the running
    loop (a host's runner needs one). Once the host has started it prints
    ``service 'NAME' ready`` on stdout, the line a supervisor waits for.
    """
    host = make_host()
    _HOSTS.add(host)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await host.start()
    print(f"service {name!r} ready", flush=True)
    try:
        await stop.wait()
    finally:
        await host.close()
