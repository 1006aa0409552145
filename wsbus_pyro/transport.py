"""Envelope batches on the wire, and the forwarder threads that send them.

Envelopes cross Pyro as one msgspec-encoded MessagePack blob per call (a list of
envelopes), so Pyro's own serializer handles a single ``bytes`` value however many
envelopes there are. A :class:`Forwarder` is a thread that owns one proxy (Pyro proxies
belong to one thread), takes envelopes in order, and sends them in batches: as many as are
waiting, up to ``batch_size``, after at most ``batch_delay``. Nothing blocking ever runs on
an event loop thread: loops hand envelopes to forwarders and get results back through
callbacks.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from base64 import b64encode
from collections import deque
from collections.abc import Callable
from typing import Any, Final

import msgspec
import serpent
from Pyro5 import errors as pyro_errors
from Pyro5.client import Proxy

from wsbus import control
from wsbus.bus import SHARED_HEADER, is_for_gateway, is_presence_event
from wsbus.envelope import (
    Envelope,
    EnvelopeId,
    GatewayAddress,
    NodeId,
    Recipients,
    ServiceAddress,
    node_of,
)
from wsbus.history import GROUP_HEADER, POSITION_HEADER

from .config import PyroConfig, handshake

__all__ = [
    "BUS_ADDRESS",
    "DIRECT_TIMEOUT",
    "GATEWAY_LOST",
    "NO_ROUTE",
    "OK",
    "REFUSED",
    "REREGISTERING",
    "RETRYABLE",
    "TAKEN",
    "TOO_LARGE",
    "UNAVAILABLE",
    "DirectForwarder",
    "Forwarder",
    "RecentIds",
    "decode_batch",
    "direct_node",
    "encode_batch",
    "from_service",
    "gateway_lost_notice",
    "lookup",
    "make_proxy",
    "name_server",
    "to_bytes",
    "undeliverable_report",
]

log = logging.getLogger("wsbus.pyro")

OK: Final = "ok"
NO_ROUTE: Final = "no_route"
UNAVAILABLE: Final = "unavailable"
TOO_LARGE: Final = "too_large"
TAKEN: Final = "taken"
"""An alias claim's answer: another connection holds the alias."""
REFUSED: Final = "refused"
"""A gateway's answer to a direct delivery it may not take from a service (see
:func:`direct_node` and :func:`from_service`); the service sends it through the bus."""
REREGISTERING: Final = "reregistering"
"""The bus started a moment ago and knows no service for this yet: one may be re-registering."""
RETRYABLE: Final = frozenset({REREGISTERING})
"""Statuses after which a forwarder with ``retry_for`` sends the envelope again.

Only the bus's "I restarted a moment ago": an endpoint that is known and down is reported
at once, so that one dead gateway never holds up a service's other messages."""

BUS_ADDRESS: Final = GatewayAddress(NodeId("bus"))
"""The sender of what the message bus says itself (undeliverable reports, notices, events)."""
GATEWAY_LOST: Final = "wsbus.pyro.gateway_lost"
"""The message bus's notice to a gateway that another gateway died (see
:func:`gateway_lost_notice`). It travels in the gateway's stream, so it arrives in order with
the rest of that gateway's traffic; the gateway's endpoint turns it into a
:meth:`wsbus.bus.HearsGateways.gateway_lost` call and never hands it on as an envelope."""

_ENCODER: Final = msgspec.msgpack.Encoder()
_DECODER: Final = msgspec.msgpack.Decoder(list[Envelope])

Callback = Callable[[str], None]

_WINDOW: Final = 8
"""Batches a pipelined forwarder may have sent and not yet seen settled."""
_RAISED: Final = object()
"""The endpoint raised (a bug there), as opposed to being unreachable."""


def _array_header(count: int) -> bytes:
    """Return the MessagePack header of an array of ``count`` items."""
    if count < 16:
        return bytes([0x90 | count])
    if count < 65536:
        return b"\xdc" + count.to_bytes(2, "big")
    return b"\xdd" + count.to_bytes(4, "big")


def encode_batch(envelopes: list[Envelope]) -> bytes:
    """Encode envelopes for one Pyro call."""
    return _ENCODER.encode(envelopes)


def decode_batch(blob: Any) -> list[Envelope]:
    """Decode what :func:`encode_batch` made, as Pyro's serializer delivers it.

    Raises:
        msgspec.DecodeError: the blob is not a batch of envelopes.
    """
    return _DECODER.decode(to_bytes(blob))


def to_bytes(blob: Any) -> bytes:
    """Return the bytes of a value Pyro's serpent serializer delivered (a base64 dict)."""
    if isinstance(blob, bytes | bytearray | memoryview):
        return bytes(blob)
    data: bytes = serpent.tobytes(blob)
    return data


def from_service(envelope: Envelope) -> Envelope | None:
    """The envelope as it may travel from a service; None for one a service may not send.

    A service sends as a service (``ServiceAddress``), never as a client or a gateway;
    only a gateway sends presence events and only the message bus sends its notices; only
    the bus stamps history positions (a service's own are removed, never believed). The
    message bus applies this to whatever a service routes through it, and a gateway to
    whatever a service delivers to it directly: the same rule on both paths. (Which
    service: every holder of the shared secret can name any; see docs/pyro.md.)
    """
    if (
        type(envelope.sender) is not ServiceAddress
        or envelope.type == GATEWAY_LOST
        or is_presence_event(envelope)
    ):
        return None
    headers = envelope.headers
    if POSITION_HEADER in headers or GROUP_HEADER in headers:
        kept = {k: v for k, v in headers.items() if k not in (POSITION_HEADER, GROUP_HEADER)}
        return msgspec.structs.replace(envelope, headers=kept)
    return envelope


def _may_reach(envelope: Envelope, node: str) -> bool:
    """Whether the bus may deliver ``envelope`` (from a service) to gateway ``node``."""
    to = envelope.to
    if isinstance(to, ServiceAddress):
        return False
    if isinstance(to, GatewayAddress):
        return to.node == node
    recipients = envelope.recipients
    if recipients is None:
        # To services by type; a wsbus.* request without a node goes to some gateway.
        return envelope.type.startswith("wsbus.")
    if recipients.everyone or recipients.aliases or recipients.users or recipients.groups:
        return True
    return any(node_of(conn_id) == node for conn_id in recipients.conn_ids)


def direct_node(envelope: Envelope) -> NodeId | None:
    """The gateway a service may deliver ``envelope`` to directly, without the message bus.

    Only a service's application message (not a ``wsbus.*`` type) to clients named by
    connection ids alone, every one of them on one gateway (a connection id names its
    gateway: ``<node>.<serial>``), goes direct. Everything else needs the bus: aliases,
    users, groups and everyone may match on any gateway (the bus knows which gateways there
    are), history messages need the bus's positions (only a message to exactly one group
    enters history), and control requests, reports and messages to services follow the
    bus's routing by ``to`` and by type.

    Returns:
        The gateway's node id, or None when the envelope must go through the bus.
    """
    recipients = envelope.recipients
    if (
        recipients is None
        or envelope.to is not None
        or type(envelope.sender) is not ServiceAddress
        or recipients.everyone
        or recipients.aliases
        or recipients.users
        or recipients.groups
        or not recipients.conn_ids
        or envelope.type.startswith("wsbus.")
    ):
        return None
    conn_ids = recipients.conn_ids
    node = node_of(conn_ids[0])
    if not node:
        return None
    for conn_id in conn_ids[1:]:
        if node_of(conn_id) != node:
            return None
    return node


class WsbusProxy(Proxy):  # type: ignore[misc]
    """A proxy that checks the daemon's proof of the shared secret before any call."""

    def _pyroValidateHandshake(self, response: Any) -> None:
        expected = self.__dict__.get("_wsbus_expected")
        if expected is not None and not (
            isinstance(response, str) and hmac.compare_digest(response, expected)
        ):
            raise pyro_errors.SecurityError(
                f"{self._pyroUri} could not prove it knows the shared secret: it is not a "
                "process of this deployment (is the name server trustworthy?)"
            )


def make_proxy(uri: Any, config: PyroConfig, *, authenticate: bool = True) -> Proxy:
    """Return a proxy for a ``PYRO:`` uri with wsbus's timeout and handshake.

    With a secret (and ``authenticate``), the handshake carries a proof bound to this
    uri's address and the daemon must prove the secret back. Every wsbus daemon checks
    it, the name server ``wsbus nameserver`` runs included (:func:`name_server`);
    ``authenticate=False`` is for a daemon that is not wsbus's own.
    """
    proxy = WsbusProxy(uri)
    proxy._pyroTimeout = config.comm_timeout
    if config.secret and authenticate:
        location = proxy._pyroUri.location
        data, expected = handshake(config.secret, location)
        proxy._pyroHandshake = data
        # Set past Proxy.__setattr__, which would send it to the remote object.
        object.__setattr__(proxy, "_wsbus_expected", expected)
    return proxy


def name_server(config: PyroConfig) -> Proxy:
    """Return a proxy for the name server at ``ns_host:ns_port``, proving the secret.

    With a secret set, it must be a name server wsbus runs (``wsbus nameserver``): one
    that cannot prove the secret back (Pyro's own) is refused with ``SecurityError``.
    """
    return make_proxy(f"PYRO:Pyro.NameServer@{config.ns_host}:{config.ns_port}", config)


def lookup(name: str, config: PyroConfig) -> Proxy:
    """Resolve ``name`` in the name server and return an authenticating proxy for it.

    Raises:
        NamingError: the name is not registered.
        CommunicationError: the name server cannot be reached, or refused this
            process's proof (``SecurityError``, a subclass).
    """
    with name_server(config) as ns:
        uri = ns.lookup(name)
    return make_proxy(uri, config)


class Forwarder(threading.Thread):
    """A thread that sends envelopes to one Pyro endpoint, in order, in batches.

    Args:
        name: for logs: what the endpoint is.
        connect: returns a new proxy; called on this thread only (proxies belong to one
            thread).
        method: the remote method taking one batch blob; it may return a list with one
            status per envelope, or None for all ``ok``.
        config: batch size and delay.
        on_down: called (on this thread) when a call fails: the endpoint is unreachable.
        on_up: called (on this thread) when a call succeeds after a failure.
        retry_after: seconds to fail fast (``unavailable``) after a failure before trying
            the endpoint again.
        retry_for: when above 0, the forwarder pipelines and confirms: it calls
            ``method(blob, sender, call)``, which returns at once, and learns each batch's
            statuses later (from that call's and ``confirm(sender, timeout)``'s results,
            see :meth:`wsbus_pyro.messagebus.MessageBus.route`), with up to 8 batches
            unsettled. What the endpoint did not confirm is sent again, in order, after
            ``retry_after``, until ``retry_for`` seconds after the envelope was created:
            the batches of a call that failed or of an endpoint that restarted (it may or
            may not have taken them: receivers drop second copies by envelope id, see
            :class:`RecentIds`), and envelopes settled with a status in
            :data:`RETRYABLE`.
        on_undelivered: called (on this thread) with each envelope that has no callback
            and ended with a status other than ``ok``.
        call_timeout: the proxy's timeout for one call; ``comm_timeout`` when None.
    """

    def __init__(
        self,
        name: str,
        connect: Callable[[], Proxy],
        method: str,
        config: PyroConfig,
        *,
        on_down: Callable[[], None] | None = None,
        on_up: Callable[[], None] | None = None,
        retry_after: float = 0.5,
        retry_for: float = 0.0,
        on_undelivered: Callable[[Envelope, str], None] | None = None,
    ) -> None:
        super().__init__(name=f"wsbus-forwarder-{name}", daemon=True)
        self.endpoint = name
        self._connect = connect
        self._method = method
        self._batch_size = config.batch_size
        self._batch_delay = config.batch_delay
        self._on_down = on_down
        self._on_up = on_up
        self._retry_after = retry_after
        self._retry_for = retry_for
        self._on_undelivered = on_undelivered
        self._items: deque[tuple[Envelope, Callback | None]] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._proxy: Proxy | None = None
        self._failed_at: float | None = None
        self._last_call = 0.0
        # The peer's daemon drops a connection idle for comm_timeout; reconnect well before.
        self._idle_limit = config.comm_timeout / 2
        self._max_bytes = config.max_message_size // 2
        self.calls = 0
        # Pipelined mode: batches sent and not yet settled, by call number.
        self._window: dict[int, tuple[str, float, list[tuple[Envelope, Callback | None]]]] = {}
        self._sender_id = f"{name}-{os.urandom(8).hex()}"
        self._call_no = 0
        self._hold_until = 0.0
        self._confirm_limit = config.call_timeout + 2 * config.comm_timeout

    @property
    def queued(self) -> int:
        """Envelopes waiting to be sent now (those sent and not yet confirmed not counted)."""
        return len(self._items)

    def put(self, envelope: Envelope, callback: Callback | None = None) -> None:
        """Queue one envelope; ``callback(status)`` runs on this thread once it is sent."""
        with self._cond:
            stopping = self._stopping
            if not stopping:
                self._items.append((envelope, callback))
                if len(self._items) == 1 or len(self._items) >= self._batch_size:
                    self._cond.notify()
        if stopping:
            self._finish([(envelope, callback)], [UNAVAILABLE])

    @property
    def down(self) -> bool:
        """True while the last call to the endpoint failed."""
        return self._failed_at is not None

    def stop(self, timeout: float = 5.0) -> None:
        """Stop after sending what is queued (bounded by ``timeout``); fail the rest."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)

    def run(self) -> None:
        """Send batches until stopped (the thread's body)."""
        try:
            while True:
                batch = self._take()
                if batch is None:
                    return
                if batch:
                    self._send(batch)
                else:
                    self._poll()
        finally:
            self._fail_all(UNAVAILABLE)
            unconfirmed = [item for _, _, batch in self._window.values() for item in batch]
            self._window.clear()
            self._finish(unconfirmed, [UNAVAILABLE] * len(unconfirmed))
            if self._proxy is not None:
                self._proxy._pyroRelease()

    def _take(self) -> list[tuple[Envelope, Callback | None]] | None:
        """The next batch; ``[]`` to collect confirmations first; None to end."""
        with self._cond:
            waited = False
            while not self._items:
                if self._window:
                    if waited or self._stopping:
                        return []
                    # Under traffic, the next call brings the confirmations: ask only
                    # when no envelope comes for a moment.
                    self._cond.wait(0.005)
                    waited = True
                    continue
                if self._stopping:
                    return None
                self._cond.wait()
            if len(self._window) >= _WINDOW:
                return []
            if self._batch_delay and len(self._items) < self._batch_size and not self._stopping:
                # A short wait lets a burst collect into one call.
                self._cond.wait(self._batch_delay)
            count = min(len(self._items), self._batch_size)
            return [self._items.popleft() for _ in range(count)]

    def _send(self, batch: list[tuple[Envelope, Callback | None]]) -> None:
        if self._retry_for > 0:
            self._send_pipelined(batch)
            return
        now = time.monotonic()
        if self._failed_at is not None and now - self._failed_at < self._retry_after:
            self._finish(batch, [UNAVAILABLE] * len(batch))
            return
        blob, batch = self._encode(batch)
        if not batch:
            return
        statuses = self._call(blob, len(batch))
        self._finish(batch, statuses if statuses is not None else [UNAVAILABLE] * len(batch))

    # -- confirmed, pipelined sending (retry_for > 0) ----------------------------------------

    def _send_pipelined(self, batch: list[tuple[Envelope, Callback | None]]) -> None:
        """Send one batch without waiting for its fate; :meth:`_confirmed` learns it."""
        if self._failed_at is not None or self._hold_until > time.monotonic():
            # The endpoint is down (or asked for a pause): what is too old fails without
            # another attempt, the rest goes after the pause.
            batch = self._expire(batch)
            if not batch:
                return
            resume = self._hold_until
            if self._failed_at is not None:
                resume = max(resume, self._failed_at + self._retry_after)
            self._pause(resume)
        blob, batch = self._encode(batch)
        if not batch:
            return
        self._call_no += 1
        call = self._call_no
        ok, result = self._invoke(blob, self._sender_id, call)
        if not ok:
            if result is _RAISED:
                self._finish(batch, [UNAVAILABLE] * len(batch))
                return
            # The call failed: the endpoint may or may not have taken this batch and those
            # it had not confirmed. All of them go again, in order, once it is back.
            self._requeue([*self._take_window(), *batch])
            return
        self._window[call] = (self._bus_of(result), time.monotonic(), batch)
        self._confirmed(result)

    def _poll(self) -> None:
        """Ask the endpoint which batches it has settled (waiting a little for one)."""
        oldest = min(sent for _, sent, _ in self._window.values())
        if time.monotonic() - oldest > self._confirm_limit:
            # Not settled in far longer than any destination may take: its fate is
            # unknown. Send it again (receivers drop what they have already).
            log.warning("%s did not settle a batch in time; sending it again", self.endpoint)
            self._requeue(self._take_window())
            return
        wait = 0.5 if len(self._window) >= _WINDOW else 0.01
        ok, result = self._invoke_method("confirm", self._sender_id, wait)
        if not ok:
            if result is _RAISED:
                # The endpoint cannot confirm (a bug there): what it has is settled as sent.
                unconfirmed = self._take_window()
                self._finish(unconfirmed, [UNAVAILABLE] * len(unconfirmed))
                return
            self._requeue(self._take_window())
            return
        self._confirmed(result)

    def _confirmed(self, result: Any) -> None:
        """Settle the batches the endpoint reports; send again what it asks to."""
        bus = self._bus_of(result)
        settled = result[1] if isinstance(result, list | tuple) and len(result) == 2 else []
        again: list[tuple[Envelope, Callback | None]] = []
        for entry in settled:
            call, count = int(entry[0]), int(entry[1])
            sent = self._window.pop(call, None)
            if sent is None or count != len(sent[2]):
                continue
            statuses = [OK] * count
            for index, status in entry[2]:
                statuses[int(index)] = str(status)
            done: list[tuple[Envelope, Callback | None]] = []
            final: list[str] = []
            for item, status in zip(sent[2], statuses, strict=True):
                if status in RETRYABLE:
                    again.append(item)
                else:
                    done.append(item)
                    final.append(status)
            self._finish(done, final)
        # A batch sent to an endpoint that has restarted since will never be settled.
        stale = sorted(call for call, (sent_to, _, _) in self._window.items() if sent_to != bus)
        lost = [item for call in stale for item in self._window.pop(call)[2]]
        if again:
            self._hold_until = time.monotonic() + self._retry_after
        if lost or again:
            self._requeue([*lost, *again])

    def _take_window(self) -> list[tuple[Envelope, Callback | None]]:
        """Empty the window; return its envelopes in the order they were sent."""
        items = [item for call in sorted(self._window) for item in self._window[call][2]]
        self._window.clear()
        return items

    def _requeue(self, items: list[tuple[Envelope, Callback | None]]) -> None:
        """Put envelopes back at the head of the queue, to be sent again, in order."""
        items = self._expire(items)
        with self._cond:
            self._items.extendleft(reversed(items))

    @staticmethod
    def _bus_of(result: Any) -> str:
        if isinstance(result, list | tuple) and result:
            return str(result[0])
        return ""

    def _pause(self, until: float) -> None:
        """Wait until ``until`` (monotonic), or until asked to stop."""
        with self._cond:
            while not self._stopping:
                left = until - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)

    def _expire(
        self, items: list[tuple[Envelope, Callback | None]]
    ) -> list[tuple[Envelope, Callback | None]]:
        """Fail the items older than ``retry_for`` (all, when stopping); return the rest."""
        oldest = time.time() - self._retry_for
        if self._stopping:
            kept: list[tuple[Envelope, Callback | None]] = []
        else:
            kept = [item for item in items if item[0].created > oldest]
        if len(kept) < len(items):
            expired = [item for item in items if self._stopping or item[0].created <= oldest]
            log.warning(
                "%s did not confirm %d envelope(s) within %g s; they are reported undeliverable",
                self.endpoint,
                len(expired),
                self._retry_for,
            )
            self._finish(expired, [UNAVAILABLE] * len(expired))
        return kept

    # -- calls ---------------------------------------------------------------------------------

    def _invoke(self, *args: Any) -> tuple[bool, Any]:
        return self._invoke_method(self._method, *args)

    def _invoke_method(self, method: str, *args: Any) -> tuple[bool, Any]:
        """Call ``method``; return (True, result), or (False, :data:`_RAISED` or None)."""
        now = time.monotonic()
        if self._proxy is not None and now - self._last_call > self._idle_limit:
            # A fresh connection, rather than a call on one the peer may have dropped.
            self._proxy._pyroRelease()
            self._proxy = None
        try:
            try:
                reused = self._proxy is not None
                if self._proxy is None:
                    self._proxy = self._connect()
                result = getattr(self._proxy, method)(*args)
            except pyro_errors.ConnectionClosedError:
                if not reused:
                    raise
                # The peer closed a connection we held (its own idle timeout may be
                # shorter than ours): it never read this call, so one retry is safe.
                self._proxy._pyroRelease()  # type: ignore[union-attr]
                self._proxy = self._connect()
                result = getattr(self._proxy, method)(*args)
            self.calls += 1
            self._last_call = time.monotonic()
        except (pyro_errors.CommunicationError, pyro_errors.NamingError, OSError) as exc:
            self._failed(exc)
            return False, None
        except Exception as exc:
            # The endpoint raised: a bug over there. Its messages are not accepted.
            log.error("%s.%s raised: %s", self.endpoint, method, exc)
            return False, _RAISED
        if self._failed_at is not None:
            self._failed_at = None
            log.info("%s is reachable again", self.endpoint)
            if self._on_up is not None:
                self._on_up()
        return True, result

    def _call(self, blob: bytes, count: int) -> list[str] | None:
        """Make one call; return a status per envelope, or None when the call failed."""
        ok, result = self._invoke(blob)
        if not ok:
            return [UNAVAILABLE] * count if result is _RAISED else None
        statuses = result if isinstance(result, list) else [OK] * count
        if len(statuses) != count:
            return [UNAVAILABLE] * count
        return [str(s) for s in statuses]

    def _encode(
        self, batch: list[tuple[Envelope, Callback | None]]
    ) -> tuple[bytes, list[tuple[Envelope, Callback | None]]]:
        """Encode what fits in one Pyro message; put the rest back at the queue's head."""
        parts: list[bytes] = []
        kept: list[tuple[Envelope, Callback | None]] = []
        size = 0
        for index, (envelope, callback) in enumerate(batch):
            part = _ENCODER.encode(envelope)
            if len(part) > self._max_bytes:
                log.error(
                    "%s (%s) is %d bytes, more than a Pyro message may carry; not sent",
                    envelope.type,
                    envelope.id,
                    len(part),
                )
                self._finish([(envelope, callback)], [TOO_LARGE])
                continue
            if parts and size + len(part) > self._max_bytes:
                with self._cond:
                    self._items.extendleft(reversed(batch[index:]))
                break
            parts.append(part)
            kept.append((envelope, callback))
            size += len(part)
        return _array_header(len(parts)) + b"".join(parts), kept

    def _failed(self, exc: BaseException) -> None:
        if self._failed_at is None:
            log.warning("%s is unreachable: %s", self.endpoint, exc)
        self._failed_at = time.monotonic()
        if self._proxy is not None:
            self._proxy._pyroRelease()
            self._proxy = None
        if self._on_down is not None:
            self._on_down()

    def _finish(self, batch: list[tuple[Envelope, Callback | None]], statuses: list[str]) -> None:
        on_undelivered = self._on_undelivered
        for (envelope, callback), status in zip(batch, statuses, strict=True):
            try:
                if callback is not None:
                    callback(status)
                elif status != OK and on_undelivered is not None:
                    on_undelivered(envelope, status)
            except Exception:
                log.exception("a delivery callback failed")

    def _fail_all(self, status: str) -> None:
        with self._cond:
            items = list(self._items)
            self._items.clear()
        self._finish(items, [status] * len(items))


_DIRECT_PROXIES: Final = 64
"""The most gateways one service's forwarder keeps a direct connection to at once."""
DIRECT_TIMEOUT: Final = 0.5
"""Seconds a direct call to a gateway may take, connecting included (at most
``comm_timeout``); past it, its batch goes through the message bus instead."""
_AVOID_FIRST: Final = 0.5
"""Seconds a gateway is not called directly after a direct call failed; doubled at each
failure in a row, up to :data:`_AVOID_MOST`."""
_AVOID_MOST: Final = 8.0
_ASK_EVERY: Final = 0.25
"""Seconds between two requests for a fresh directory of gateways (DirectForwarder)."""
_REROUTED_LIMIT: Final = 65536
"""The most ids of envelopes given back by direct calls remembered (a bound on memory)."""


class DirectForwarder(Forwarder):
    """A service's forwarder: to the message bus, and straight to a gateway where it may.

    A message for connections of one gateway (:func:`direct_node`) goes in a call of that
    gateway's ``deliver_direct``, at the address the message bus's directory of gateways
    gives (:attr:`directory`, set by the service's watchdog every
    ``reregister_interval``): one Pyro hop and one thread hand-off instead of two and
    three. Everything else goes to the bus as before, and so does a message for a
    gateway the directory does not list (the bus knows better: ``no_route`` for a gateway
    that left).

    Per-sender order holds across the two paths. The queue is sent in order, in runs of
    one path. A direct run waits until the bus has settled every routed batch sent before
    it: settled means each gateway's ``deliver`` returned, and a gateway returns once it
    handed the envelopes to its event loop, so they are on the loop before the direct
    ones. A routed run after a direct one goes once the direct call returned, which the
    gateway does once those are on its loop. A direct call that fails, or that the gateway
    refuses (the directory was stale), puts its envelopes back at the head of the queue to
    go through the bus, and that gateway is not tried directly again for ``retry_after``.
    The failed call may have delivered them: the gateway drops the second copy (one
    :class:`RecentIds` for both of its endpoints).

    The proxies to the gateways belong to this thread, as the one to the bus does.
    Arguments as :class:`Forwarder`'s, with ``retry_for`` above 0 (a service's).
    """

    def __init__(
        self,
        name: str,
        connect: Callable[[], Proxy],
        method: str,
        config: PyroConfig,
        **options: Any,
    ) -> None:
        super().__init__(name, connect, method, config, **options)
        self._config = config
        self.directory: dict[str, str] = {}
        """Node id -> Pyro address of each live gateway, from the message bus.

        Replaced as a whole by another thread (never changed in place)."""
        self.direct_calls = 0
        """Calls made straight to gateways."""
        # The direct proxies (this thread only): node -> (address, proxy, last used).
        self._direct: dict[str, tuple[str, Proxy, float]] = {}
        self._avoid: dict[str, float] = {}
        self._backoff: dict[str, float] = {}
        """The last avoidance of each gateway whose direct calls keep failing (seconds)."""
        """Gateways not to call directly until then (monotonic): a direct call failed."""
        self._rerouted: set[str] = set()
        """Ids of envelopes a direct call gave back: they go through the bus."""
        self._run_node: str | None = None
        self.on_unknown: Callable[[], None] | None = None
        """Called (on this thread, at most every 0.25 s) when a message could go straight
        to a gateway the directory does not list: the directory may be out of date."""
        self._asked = 0.0

    def run(self) -> None:
        """Send batches until stopped (the thread's body); release the direct proxies."""
        try:
            super().run()
        finally:
            for _, proxy, _ in self._direct.values():
                proxy._pyroRelease()
            self._direct.clear()

    def _path(self, envelope: Envelope, now: float) -> str | None:
        """The gateway to deliver ``envelope`` to directly, or None for the bus."""
        node = direct_node(envelope)
        if node is None:
            return None
        if node not in self.directory:
            if self.on_unknown is not None and now - self._asked > _ASK_EVERY:
                self._asked = now
                self.on_unknown()
            return None
        if self._rerouted and envelope.id in self._rerouted:
            return None
        until = self._avoid.get(node)
        if until is not None:
            if until > now:
                return None
            del self._avoid[node]
        return node

    def _take(self) -> list[tuple[Envelope, Callback | None]] | None:
        """The next run of one path (see the class); ``[]`` to collect confirmations first."""
        batch = super()._take()
        if not batch:
            return batch
        now = time.monotonic()
        node = self._path(batch[0][0], now)
        cut = 1
        while cut < len(batch) and self._path(batch[cut][0], now) == node:
            cut += 1
        # Routed batches not yet settled that may reach this gateway: a direct run waits
        # for them (per-sender order). One for another gateway only (a stalled one, say)
        # holds nothing up here.
        barrier = node is not None and self._unsettled_for(node)
        back = batch if barrier else batch[cut:]
        if back:
            with self._cond:
                self._items.extendleft(reversed(back))
        if barrier:
            return []
        self._run_node = node
        return batch[:cut]

    def _unsettled_for(self, node: str) -> bool:
        """True when a routed batch sent and not yet settled may reach gateway ``node``."""
        for _, _, batch in self._window.values():
            for envelope, _ in batch:
                if _may_reach(envelope, node):
                    return True
        return False

    def _send(self, batch: list[tuple[Envelope, Callback | None]]) -> None:
        node, self._run_node = self._run_node, None
        if node is None:
            super()._send(batch)
            if self._rerouted:
                for envelope, _ in batch:
                    self._rerouted.discard(envelope.id)
            return
        blob, batch = self._encode(batch)
        if not batch:
            return
        statuses = self._call_direct(node, blob, len(batch))
        if statuses is None or any(status != OK for status in statuses):
            # Not delivered here, or not known to be (the call failed or took longer than
            # DIRECT_TIMEOUT, the gateway's loop is behind, the directory was stale):
            # through the bus, in order, at once. The gateway is not called directly again
            # for a while, longer each time it keeps failing.
            delay = min(2 * self._backoff.get(node, _AVOID_FIRST / 2), _AVOID_MOST)
            if len(self._backoff) >= _DIRECT_PROXIES * 16:
                self._backoff.clear()  # a bound on memory: gateways long gone
            self._backoff[node] = delay
            self._avoid[node] = time.monotonic() + delay
            if len(self._rerouted) > _REROUTED_LIMIT:
                # Ids of envelopes that expired before they were sent again: forgotten.
                self._rerouted.clear()
            for envelope, _ in batch:
                self._rerouted.add(envelope.id)
            self._requeue(batch)
            return
        self._backoff.pop(node, None)
        self._finish(batch, statuses)

    def _call_direct(self, node: str, blob: bytes, count: int) -> list[str] | None:
        """Call ``deliver_direct`` on ``node``'s gateway; its statuses, or None if it failed."""
        uri = self.directory.get(node)
        if uri is None:
            return None
        now = time.monotonic()
        entry = self._direct.pop(node, None)
        if entry is not None and (entry[0] != uri or now - entry[2] > self._idle_limit):
            # Moved, or idle long enough that the gateway may have closed the connection.
            entry[1]._pyroRelease()
            entry = None
        proxy: Proxy | None = None if entry is None else entry[1]
        # Base64 text, not bytes: Pyro's serpent reads a string faster than the dict it
        # wraps bytes in (the gateway takes either).
        text = b64encode(blob).decode("ascii")
        try:
            try:
                reused = proxy is not None
                if proxy is None:
                    proxy = self._connect_direct(uri)
                result = proxy.deliver_direct(text)
            except pyro_errors.ConnectionClosedError:
                if not reused or proxy is None:
                    raise
                # The gateway closed a connection we held: it never read this call.
                proxy._pyroRelease()
                proxy = self._connect_direct(uri)
                result = proxy.deliver_direct(text)
        except Exception as exc:
            # Unreachable, gone, or a gateway without deliver_direct: the bus takes these.
            log.info("gateway %s not reached directly (%s): sending through the bus", node, exc)
            if proxy is not None:
                proxy._pyroRelease()
            return None
        self.direct_calls += 1
        self._direct[node] = (uri, proxy, time.monotonic())
        if len(self._direct) > _DIRECT_PROXIES:
            oldest = min(self._direct, key=lambda n: self._direct[n][2])
            self._direct.pop(oldest)[1]._pyroRelease()
        if result is None:
            return [OK] * count
        # One status for the whole batch, none of which was taken.
        return [str(result)] * count

    def _connect_direct(self, uri: str) -> Proxy:
        proxy = make_proxy(uri, self._config)
        # Short: this thread carries the service's traffic to every gateway and the bus, so
        # one stalled gateway (its loop blocked: it accepts connections on its loop) must
        # not hold it. A call that takes longer goes through the bus instead.
        proxy._pyroTimeout = min(DIRECT_TIMEOUT, self._config.comm_timeout)
        return proxy


_BUS_HEADERS: Final = frozenset({SHARED_HEADER, POSITION_HEADER, GROUP_HEADER})
"""Headers the message bus sets on the way (a copy that came through it may differ)."""


def content_digest(envelope: Envelope) -> int:
    """A digest of what a service sent in ``envelope``, the same for every copy of it.

    Headers the bus sets on the way (shared, history position) are left out: a copy sent
    again through the bus, or through a restarted bus, is still the same message. Python's
    ``hash`` of the encoding: keyed per process (``PYTHONHASHSEED``), so a peer cannot make
    another message with the digest of one it has not seen.
    """
    headers = envelope.headers
    if headers and not _BUS_HEADERS.isdisjoint(headers):
        kept = {k: v for k, v in headers.items() if k not in _BUS_HEADERS}
        envelope = msgspec.structs.replace(envelope, headers=kept)
    return hash(_ENCODER.encode(envelope))


class RecentIds:
    """The envelopes from services a receiver took lately, to drop a second copy.

    A forwarder with ``retry_for`` sends a batch again when its call failed, though the
    far side may have taken it before the failure, and a service sends through the bus
    what a direct call may have delivered: the receiver drops what it has seen.
    Between ``size`` and twice that many of the latest ids are remembered, each with the
    digest of its envelope (:func:`content_digest`): only a true copy is dropped. An
    envelope with an id seen before and other content is delivered (and counted in
    :attr:`impostors`): a peer that guesses a service's next id cannot have the real
    message dropped in silence. Only envelopes from services count: their ids are unique
    (the service's name, a random part and a counter), while a client may reuse its frame
    ids.

    A receiver asks :meth:`seen` before it takes an envelope and calls :meth:`remember`
    only once it took it, both on one thread (its event loop): an envelope it refused
    (inbox full) is taken when sent again, never confirmed as a duplicate and lost.
    Thread-safe.
    """

    def __init__(self, size: int = 65536) -> None:
        self._size = size
        self._current: dict[str, int] = {}
        self._previous: dict[str, int] = {}
        self._lock = threading.Lock()
        self._last: tuple[Envelope | None, int] = (None, 0)
        self.duplicates = 0
        """Envelopes dropped as seen already."""
        self.impostors = 0
        """Envelopes delivered though their id was seen before, with other content."""

    def _digest(self, envelope: Envelope) -> int:
        last, digest = self._last
        if last is not envelope:
            digest = content_digest(envelope)
            self._last = (envelope, digest)
        return digest

    def seen(self, envelope: Envelope) -> bool:
        """Return True (and count a duplicate) when a copy of ``envelope`` was taken lately.

        Records nothing: call :meth:`remember` once the receiver has taken it.
        """
        if type(envelope.sender) is not ServiceAddress:
            return False
        id_ = envelope.id
        with self._lock:
            known = self._current.get(id_)
            if known is None:
                known = self._previous.get(id_)
            if known is None:
                return False
            if known == self._digest(envelope):
                self.duplicates += 1
                return True
            self.impostors += 1
            count = self.impostors
        if count & (count - 1) == 0:  # the 1st, 2nd, 4th, 8th, ...: a flood logs little
            log.warning(
                "an envelope with the id of one taken lately (%s) and other content was delivered: "
                "a peer that holds the secret may be guessing a service's ids (%d so far)",
                id_,
                count,
            )
        return False

    def remember(self, envelope: Envelope) -> None:
        """Record that the receiver took ``envelope``: a later copy is then dropped."""
        if type(envelope.sender) is not ServiceAddress:
            return
        with self._lock:
            self._current[envelope.id] = self._digest(envelope)
            if len(self._current) >= self._size:
                self._previous, self._current = self._current, {}


def gateway_lost_notice(node: str, serial: str) -> Envelope:
    """The message bus's :data:`GATEWAY_LOST` notice to the live gateways: ``node`` died.

    Args:
        node: the dead gateway's node id.
        serial: makes the notice's id unique (the bus's instance id and a count).
    """
    return Envelope(
        id=EnvelopeId(f"bus-lost-{serial}"),
        type=GATEWAY_LOST,
        sender=BUS_ADDRESS,
        content={"node": node},
        created=time.time(),
    )


def undeliverable_report(envelope: Envelope, status: str, retry_for: float) -> Envelope:
    """The ``wsbus.undeliverable`` report a service gets for what the bus did not deliver.

    Its sender is ``GatewayAddress("bus")``, as for the bus's own reports.
    """
    if status == NO_ROUTE:
        detail = (
            "no gateway owns these connections"
            if is_for_gateway(envelope) or isinstance(envelope.to, GatewayAddress)
            else "no service handles this type"
        )
    elif status == TOO_LARGE:
        detail = "larger than a Pyro message may carry"
    else:
        status = UNAVAILABLE
        detail = f"the bus did not confirm delivery within {retry_for:g} s"
    recipients = envelope.recipients if envelope.recipients is not None else Recipients()
    return Envelope(
        id=envelope.id,
        type=control.UNDELIVERABLE,
        sender=BUS_ADDRESS,
        content=msgspec.to_builtins(control.Undeliverable(status, recipients, detail)),
        reply_to=envelope.id,
        created=time.time(),
        to=envelope.sender if isinstance(envelope.sender, ServiceAddress) else None,
    )
