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
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

import msgspec
import serpent
from Pyro5 import errors as pyro_errors
from Pyro5.client import Proxy

from wsbus.envelope import Envelope

from .config import PyroConfig, handshake

__all__ = [
    "NO_ROUTE",
    "OK",
    "TOO_LARGE",
    "UNAVAILABLE",
    "Forwarder",
    "decode_batch",
    "encode_batch",
    "lookup",
    "make_proxy",
    "to_bytes",
]

log = logging.getLogger("wsbus.pyro")

OK: Final = "ok"
NO_ROUTE: Final = "no_route"
UNAVAILABLE: Final = "unavailable"
TOO_LARGE: Final = "too_large"

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
            if self._stopping:
                if callback is not None:
                    callback(UNAVAILABLE)
                return
            self._items.append((envelope, callback))
            if len(self._items) == 1 or len(self._items) >= self._batch_size:
                self._cond.notify()

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
        now = time.monotonic()
        if self._failed_at is not None and now - self._failed_at < self._retry_after:
            self._finish(batch, [UNAVAILABLE] * len(batch))
            return
        blob, batch = self._encode(batch)
        if not batch:
            return
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
            self._finish(batch, [UNAVAILABLE] * len(batch))
            return
        except Exception as exc:
            # The endpoint raised: a bug over there. Its messages are not accepted.
            log.error("%s.%s raised: %s", self.endpoint, self._method, exc)
            self._finish(batch, [UNAVAILABLE] * len(batch))
            return
        if self._failed_at is not None:
            self._failed_at = None
            log.info("%s is reachable again", self.endpoint)
            if self._on_up is not None:
                self._on_up()
        statuses = result if isinstance(result, list) else [OK] * len(batch)
        if len(statuses) != len(batch):
            statuses = [UNAVAILABLE] * len(batch)
        self._finish(batch, [str(s) for s in statuses])

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
                if callback is not None:
                    callback(TOO_LARGE)
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

    @staticmethod
    def _finish(batch: list[tuple[Envelope, Callback | None]], statuses: list[str]) -> None:
        for (_, callback), status in zip(batch, statuses, strict=True):
            if callback is not None:
                try:
                    callback(status)
                except Exception:
                    log.exception("a delivery callback failed")

    def _fail_all(self, status: str) -> None:
        with self._cond:
            items = list(self._items)
            self._items.clear()
        self._finish(items, [status] * len(items))
