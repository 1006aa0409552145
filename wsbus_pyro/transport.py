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
import itertools
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any, Final

import msgspec
import serpent
from Pyro5 import errors as pyro_errors
from Pyro5.client import Proxy

from wsbus import control
from wsbus.bus import is_for_gateway
from wsbus.envelope import Envelope, GatewayAddress, NodeId, Recipients, ServiceAddress

from .config import PyroConfig, handshake

__all__ = [
    "NO_ROUTE",
    "OK",
    "REREGISTERING",
    "RETRYABLE",
    "TOO_LARGE",
    "UNAVAILABLE",
    "Forwarder",
    "RecentIds",
    "decode_batch",
    "encode_batch",
    "lookup",
    "make_proxy",
    "to_bytes",
    "undeliverable_report",
]

log = logging.getLogger("wsbus.pyro")

OK: Final = "ok"
NO_ROUTE: Final = "no_route"
UNAVAILABLE: Final = "unavailable"
TOO_LARGE: Final = "too_large"
REREGISTERING: Final = "reregistering"
"""The bus started a moment ago and knows no service for this yet: one may be re-registering."""
RETRYABLE: Final = frozenset({UNAVAILABLE, REREGISTERING})
"""Statuses after which a forwarder with ``retry_for`` sends the envelope again."""

_ENCODER: Final = msgspec.msgpack.Encoder()
_DECODER: Final = msgspec.msgpack.Decoder(list[Envelope])

Callback = Callable[[str], None]


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

    With a secret, the handshake carries a proof bound to this uri's address and the
    daemon must prove the secret back. The name server is plain Pyro: reach it with
    ``authenticate=False``.
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


def lookup(name: str, config: PyroConfig) -> Proxy:
    """Resolve ``name`` in the name server and return an authenticating proxy for it.

    Raises:
        NamingError: the name is not registered.
        CommunicationError: the name server cannot be reached.
    """
    ns_uri = f"PYRO:Pyro.NameServer@{config.ns_host}:{config.ns_port}"
    with make_proxy(ns_uri, config, authenticate=False) as ns:
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
        retry_for: when above 0, what the endpoint did not confirm is not failed but sent
            again, in order, every ``retry_after``, until this many seconds after the
            envelope was created: envelopes of a call that failed (the endpoint may or may
            not have taken them: receivers drop duplicates by envelope id, see
            :class:`RecentIds`) and envelopes it answered with a status in
            :data:`RETRYABLE`. Later envelopes wait meanwhile.
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
                self._send(batch)
        finally:
            self._fail_all(UNAVAILABLE)
            if self._proxy is not None:
                self._proxy._pyroRelease()

    def _take(self) -> list[tuple[Envelope, Callback | None]] | None:
        with self._cond:
            while not self._items:
                if self._stopping:
                    return None
                self._cond.wait()
            if self._batch_delay and len(self._items) < self._batch_size and not self._stopping:
                # A short wait lets a burst collect into one call.
                self._cond.wait(self._batch_delay)
            count = min(len(self._items), self._batch_size)
            return [self._items.popleft() for _ in range(count)]

    def _send(self, batch: list[tuple[Envelope, Callback | None]]) -> None:
        if self._retry_for > 0:
            self._send_until_confirmed(batch)
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

    def _send_until_confirmed(self, batch: list[tuple[Envelope, Callback | None]]) -> None:
        """Send, and send again what the endpoint did not confirm, in order.

        Each envelope is tried until ``retry_for`` after it was created: so a backlog that
        built up while the endpoint was down drains at once when it is older than that.
        """
        blob, pending = self._encode(batch)
        while pending:
            if self._failed_at is not None:
                # The endpoint is down: what is too old fails without another attempt.
                pending = self._expire(pending)
                if not pending:
                    return
                self._pause(self._failed_at + self._retry_after)
                blob, pending = self._encode(pending)
            statuses = self._call(blob, len(pending))
            if statuses is None:
                # The call failed: the endpoint may or may not have taken the batch.
                statuses = [UNAVAILABLE] * len(pending)
            again: list[tuple[Envelope, Callback | None]] = []
            done: list[tuple[Envelope, Callback | None]] = []
            final: list[str] = []
            for item, status in zip(pending, statuses, strict=True):
                if status in RETRYABLE:
                    again.append(item)
                else:
                    done.append(item)
                    final.append(status)
            self._finish(done, final)
            pending = again if self._stopping else self._expire(again)
            if not pending:
                return
            if self._stopping:
                self._finish(pending, [UNAVAILABLE] * len(pending))
                return
            if self._failed_at is None:
                self._pause(time.monotonic() + self._retry_after)
            blob, pending = self._encode(pending)

    def _expire(
        self, items: list[tuple[Envelope, Callback | None]]
    ) -> list[tuple[Envelope, Callback | None]]:
        """Fail the items older than ``retry_for``; return the others."""
        oldest = time.time() - self._retry_for
        kept = [item for item in items if item[0].created > oldest]
        if len(kept) < len(items):
            expired = [item for item in items if item[0].created <= oldest]
            log.warning(
                "%s did not confirm %d envelope(s) within %g s; they are reported undeliverable",
                self.endpoint,
                len(expired),
                self._retry_for,
            )
            self._finish(expired, [UNAVAILABLE] * len(expired))
        return kept

    def _pause(self, until: float) -> None:
        """Wait until ``until`` (monotonic), or until asked to stop."""
        with self._cond:
            while not self._stopping:
                left = until - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)

    def _call(self, blob: bytes, count: int) -> list[str] | None:
        """Make one call; return a status per envelope, or None when the call failed."""
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
                result = getattr(self._proxy, self._method)(blob)
            except pyro_errors.ConnectionClosedError:
                if not reused:
                    raise
                # The peer closed a connection we held (its own idle timeout may be
                # shorter than ours): it never read this call, so one retry is safe.
                self._proxy._pyroRelease()  # type: ignore[union-attr]
                self._proxy = self._connect()
                result = getattr(self._proxy, self._method)(blob)
            self.calls += 1
            self._last_call = time.monotonic()
        except (pyro_errors.CommunicationError, pyro_errors.NamingError, OSError) as exc:
            self._failed(exc)
            return None
        except Exception as exc:
            # The endpoint raised: a bug over there. Its messages are not accepted.
            log.error("%s.%s raised: %s", self.endpoint, self._method, exc)
            return [UNAVAILABLE] * count
        if self._failed_at is not None:
            self._failed_at = None
            log.info("%s is reachable again", self.endpoint)
            if self._on_up is not None:
                self._on_up()
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


class RecentIds:
    """The last ``size`` envelopes from services a receiver took, to drop a second copy.

    A forwarder with ``retry_for`` sends a batch again when its call failed, though the
    far side may have taken it before the failure: the receiver drops what it has seen.
    Only envelopes from services count (their ids are unique per sender): a client may
    reuse its frame ids. Thread-safe.
    """

    def __init__(self, size: int = 65536) -> None:
        self._size = size
        self._seen: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._lock = threading.Lock()
        self.duplicates = 0
        """Envelopes dropped as seen already."""

    def fresh(self, envelopes: list[Envelope]) -> list[Envelope]:
        """Return the envelopes not seen before, in order, and remember them."""
        return list(itertools.compress(envelopes, self.mask(envelopes)))

    def mask(self, envelopes: list[Envelope]) -> list[bool]:
        """Return, for each envelope, whether it is new; remember the new ones."""
        seen = self._seen
        new: list[bool] = []
        with self._lock:
            for envelope in envelopes:
                sender = envelope.sender
                if not isinstance(sender, ServiceAddress):
                    new.append(True)
                    continue
                key = (sender.name, envelope.id)
                if key in seen:
                    self.duplicates += 1
                    new.append(False)
                    continue
                seen[key] = None
                new.append(True)
            while len(seen) > self._size:
                seen.popitem(last=False)
        return new


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
        sender=GatewayAddress(NodeId("bus")),
        content=msgspec.to_builtins(control.Undeliverable(status, recipients, detail)),
        reply_to=envelope.id,
        created=time.time(),
        to=envelope.sender if isinstance(envelope.sender, ServiceAddress) else None,
    )
