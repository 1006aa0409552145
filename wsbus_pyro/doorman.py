"""The doorman: Pyro connection handshakes read off the worker pool.

Pyro5's thread-pool server gives every accepted connection a worker thread at once, and
that worker then waits up to ``COMMTIMEOUT`` for the peer's handshake. 300 idle sockets
that never send a byte would so hold all 128 workers, and the bus's deliveries to the
gateway (or a service's to the bus) would bounce. The doorman is one thread per daemon with
a selector: it reads each new connection's handshake message without blocking, refuses a
connection whose handshake has not fully arrived within ``handshake_timeout``, keeps at
most ``max_pending`` connections waiting (dropping the oldest), and only then hands the
connection, its handshake already read, to a worker. The secret is checked on that worker
as before, so an unauthenticated peer holds a worker for the time it takes to check one
HMAC, never longer.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
import time
from collections import OrderedDict
from typing import Any, Final

from Pyro5 import errors as pyro_errors
from Pyro5.server import Daemon

from . import _internals

__all__ = ["Doorman"]

log = logging.getLogger("wsbus.pyro")

_WARN_EVERY: Final = 10.0
"""Seconds between two warnings about refused connections (one line, with a count)."""


class _Pending:
    __slots__ = ("address", "buffer", "deadline", "needed", "sock")

    def __init__(self, sock: socket.socket, address: Any, deadline: float) -> None:
        self.sock = sock
        self.address = address
        self.deadline = deadline
        self.buffer = bytearray()
        self.needed = _internals.HEADER_SIZE


class Doorman(threading.Thread):
    """Reads Pyro connection handshakes for one daemon, then hands connections to its pool.

    Args:
        daemon: the Pyro daemon (thread-pool server type) whose workers serve calls.
        comm_timeout: socket timeout once a worker has the connection.
        handshake_timeout: seconds a new connection may take to send its whole handshake.
        max_pending: connections that may be waiting for their handshake at once; a new
            one beyond that pushes out the one that has waited longest.
    """

    def __init__(
        self,
        daemon: Daemon,
        *,
        comm_timeout: float,
        handshake_timeout: float,
        max_pending: int = 1024,
    ) -> None:
        super().__init__(name="wsbus-pyro-doorman", daemon=True)
        self._daemon = daemon
        self._comm_timeout = comm_timeout
        self._handshake_timeout = handshake_timeout
        self._max_pending = max_pending
        self._selector = selectors.DefaultSelector()
        self._pending: OrderedDict[int, _Pending] = OrderedDict()
        self._incoming: list[tuple[socket.socket, Any]] = []
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._stopping = False
        self._refused = 0
        self._warned_at = 0.0
        self.handed = 0
        """Connections handed to a worker after a complete handshake."""
        self.dropped = 0
        """Connections closed here: handshake too slow, malformed, or pushed out."""

    # -- any thread ------------------------------------------------------------------------

    def admit(self, sock: socket.socket, address: Any) -> None:
        """Take a freshly accepted connection (from any thread); never blocks."""
        with self._lock:
            if self._stopping:
                sock.close()
                return
            self._incoming.append((sock, address))
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def stop(self) -> None:
        """Close every waiting connection and end the thread."""
        with self._lock:
            self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self.is_alive() and threading.current_thread() is not self:
            self.join(2.0)

    # -- the doorman's thread --------------------------------------------------------------

    def run(self) -> None:
        """Read handshakes until stopped (the thread's body)."""
        try:
            while True:
                timeout = self._next_timeout()
                events = self._selector.select(timeout)
                with self._lock:
                    if self._stopping:
                        return
                    incoming, self._incoming = self._incoming, []
                for sock, address in incoming:
                    self._add(sock, address)
                for key, _ in events:
                    if key.fileobj is self._wake_r:
                        with contextlib.suppress(OSError):
                            while self._wake_r.recv(4096):
                                pass
                        continue
                    pending = self._pending.get(key.fd)
                    if pending is not None:
                        self._read(pending)
                self._expire()
        except Exception:
            log.exception("the Pyro doorman failed; new Pyro connections are refused")
        finally:
            for pending in list(self._pending.values()):
                self._drop(pending, count=False)
            with self._lock:
                self._stopping = True
                leftover, self._incoming = self._incoming, []
            for sock, _ in leftover:
                sock.close()
            self._selector.close()
            self._wake_r.close()
            self._wake_w.close()

    def _next_timeout(self) -> float | None:
        if not self._pending:
            return None
        first = next(iter(self._pending.values()))
        return max(0.0, first.deadline - time.monotonic())

    def _add(self, sock: socket.socket, address: Any) -> None:
        try:
            sock.setblocking(False)
            fd = sock.fileno()
        except OSError:
            sock.close()
            return
        while len(self._pending) >= self._max_pending:
            _, oldest = self._pending.popitem(last=False)
            self._drop(oldest, pop=False)
            self._note_refused()
        pending = _Pending(sock, address, time.monotonic() + self._handshake_timeout)
        self._pending[fd] = pending
        self._selector.register(sock, selectors.EVENT_READ)

    def _read(self, pending: _Pending) -> None:
        try:
            data = pending.sock.recv(pending.needed - len(pending.buffer))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(pending)
            return
        if not data:
            self._drop(pending)
            return
        pending.buffer += data
        if len(pending.buffer) < pending.needed:
            return
        if pending.needed == _internals.HEADER_SIZE:
            try:
                message = _internals.parse_header(bytes(pending.buffer))
            except pyro_errors.PyroError as exc:
                log.info("refused a Pyro connection from %s: %s", pending.address, exc)
                self._drop(pending)
                return
            if message.type != _internals.MSG_CONNECT:
                self._drop(pending)
                return
            pending.needed += message.annotations_size + message.data_size
            if pending.needed > _internals.HEADER_SIZE + _internals.MAX_HANDSHAKE_BYTES:
                # The header check refuses this already once apply() ran; never buffer it.
                self._drop(pending)
                return
            if len(pending.buffer) < pending.needed:
                return
        self._hand_over(pending)

    def _hand_over(self, pending: _Pending) -> None:
        fd = pending.sock.fileno()
        self._selector.unregister(pending.sock)
        del self._pending[fd]
        sock = pending.sock
        try:
            sock.setblocking(True)
            sock.settimeout(self._comm_timeout)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            sock.close()
            return
        conn = _internals.PrefixedConnection(sock, bytes(pending.buffer))
        if _internals.hand_to_pool(self._daemon, conn, pending.address):
            self.handed += 1
            return
        self._note_refused()
        _internals.refuse_connection(
            self._daemon, conn, "all worker threads are busy; try again later"
        )

    def _expire(self) -> None:
        now = time.monotonic()
        while self._pending:
            first = next(iter(self._pending.values()))
            if first.deadline > now:
                return
            self._drop(first)

    def _drop(self, pending: _Pending, *, pop: bool = True, count: bool = True) -> None:
        if pop:
            with contextlib.suppress(KeyError, OSError):
                del self._pending[pending.sock.fileno()]
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(pending.sock)
        pending.sock.close()
        if count:
            self.dropped += 1

    def _note_refused(self) -> None:
        self._refused += 1
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY:
            log.warning(
                "refused %d Pyro connection(s): too many waiting for their handshake, or "
                "every worker busy (raise threadpool_size if this is not an attack)",
                self._refused,
            )
            self._refused = 0
            self._warned_at = now
