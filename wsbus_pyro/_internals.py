"""Every Pyro5 internal wsbus relies on, in one place.

Pyro5 offers no public hook for what wsbus needs to be safe with untrusted peers: checking
a message's header before its payload is read, doing the connection handshake off the
worker pool, and refusing the ``FLAGS_KEEPSERIALIZED`` path (which calls ``marshal.loads``
on the peer's bytes whatever the serializer). So wsbus reaches into Pyro5 here, and only
here. :data:`REQUIRED` names each internal; :func:`missing` reports the ones a Pyro5 release
moved, and ``tests/wsbus_pyro/test_internals.py`` fails loudly on any.

Supported: Pyro5 5.15 to 5.17 (the newest at the time of writing).
"""

from __future__ import annotations

import contextlib
import inspect
import socket
import threading
from collections.abc import Callable
from typing import Any, Final

from Pyro5 import config as pyro_config
from Pyro5 import errors as pyro_errors
from Pyro5 import nameserver, protocol, serializers, socketutil, svr_threads
from Pyro5.client import Proxy
from Pyro5.server import Daemon

__all__ = [
    "HEADER_SIZE",
    "MAX_HANDSHAKE_BYTES",
    "MSG_CONNECT",
    "REQUIRED",
    "PrefixedConnection",
    "hand_to_pool",
    "install_accept",
    "is_thread_pool",
    "missing",
    "parse_header",
    "patch_receiving_message",
    "refuse_blob_args",
    "refuse_connection",
]

MAX_HANDSHAKE_BYTES: Final = 4096
"""The largest Pyro connection handshake accepted (annotations and data), in bytes."""

HEADER_SIZE: Final[int] = protocol._header_size
"""Bytes in a Pyro wire message's fixed header."""
MSG_CONNECT: Final[int] = protocol.MSG_CONNECT
"""The message type of a connection handshake."""

_SERPENT_ID: Final = serializers.serializers["serpent"].serializer_id
_PATCH_LOCK: Final = threading.Lock()
_patched = False

_BLOB_ARGS: Final = "_Daemon__deserializeBlobArgs"

REQUIRED: Final[dict[str, Callable[[], bool]]] = {
    # The header check runs inside ReceivingMessage.__init__(header, payload).
    "protocol.ReceivingMessage.__init__(self, header, payload=None)": lambda: (
        list(inspect.signature(protocol.ReceivingMessage.__init__).parameters)
        == ["self", "header", "payload"]
    ),
    "protocol.ReceivingMessage.add_payload": lambda: callable(
        getattr(protocol.ReceivingMessage, "add_payload", None)
    ),
    "protocol._header_size / _header_format": lambda: (
        isinstance(protocol._header_size, int) and isinstance(protocol._header_format, str)
    ),
    "protocol.FLAGS_COMPRESSED / FLAGS_KEEPSERIALIZED / MSG_CONNECT / MSG_CONNECTFAIL": lambda: all(
        isinstance(getattr(protocol, n, None), int)
        for n in ("FLAGS_COMPRESSED", "FLAGS_KEEPSERIALIZED", "MSG_CONNECT", "MSG_CONNECTFAIL")
    ),
    "serializers.serializers['serpent'].serializer_id": lambda: _SERPENT_ID == 1,
    # The keep-serialized path the daemon takes for FLAGS_KEEPSERIALIZED: refused by name.
    "Daemon._Daemon__deserializeBlobArgs": lambda: callable(getattr(Daemon, _BLOB_ARGS, None)),
    "Daemon._handshake(conn, denied_reason=None)": lambda: (
        "denied_reason" in inspect.signature(Daemon._handshake).parameters
    ),
    "Daemon.transportServer.events / .sock / .pool / .shutting_down": lambda: all(
        hasattr(svr_threads.SocketServer_Threadpool, n) for n in ("events", "loop", "shutdown")
    ),
    "svr_threads.ClientConnectionJob: __call__ uses only .csock, .caddr, .daemon": lambda: (
        _attributes_used(svr_threads.ClientConnectionJob) <= {"csock", "caddr", "daemon"}
        and {"csock", "daemon"} <= _attributes_used(svr_threads.ClientConnectionJob)
    ),
    "svr_threads.Pool.process / NoFreeWorkersError": lambda: (
        callable(getattr(svr_threads.Pool, "process", None))
        and issubclass(svr_threads.NoFreeWorkersError, Exception)
    ),
    "socketutil.SocketConnection.recv(size)": lambda: (
        list(inspect.signature(socketutil.SocketConnection.recv).parameters) == ["self", "size"]
    ),
    # Documented Pyro5 API that the rest of wsbus_pyro uses: checked here too.
    "Proxy._pyroHandshake / _pyroValidateHandshake / _pyroRelease / _pyroTimeout": lambda: (
        all(
            hasattr(Proxy, n)
            for n in ("_pyroValidateHandshake", "_pyroRelease", "_pyroBind", "_pyroTimeout")
        )
        and "_pyroHandshake" in inspect.getsource(Proxy.__init__)
    ),
    "nameserver.NameServerDaemon(host, port, ...) / .nameserver": lambda: (
        list(inspect.signature(nameserver.NameServerDaemon.__init__).parameters)[:3]
        == ["self", "host", "port"]
        and "self.nameserver" in inspect.getsource(nameserver.NameServerDaemon.__init__)
    ),
    "Daemon.validateHandshake / events / sock / sockets / locationStr": lambda: (
        all(hasattr(Daemon, n) for n in ("validateHandshake", "events", "sock", "sockets"))
        and "locationStr" in inspect.getsource(Daemon.__init__)
    ),
}
"""Each Pyro5 internal wsbus uses, with a check that it is still there and shaped the same."""


def _attributes_used(cls: type) -> set[str]:
    """The ``self.<name>`` data attributes a class's methods read (not its methods)."""
    import re

    source = inspect.getsource(cls)
    names = set(re.findall(r"self\.([A-Za-z_]\w*)", source))
    return {n for n in names if not callable(getattr(cls, n, None))}


def missing() -> list[str]:
    """Return the internals in :data:`REQUIRED` this Pyro5 release does not have as expected."""
    gone = []
    for name, check in REQUIRED.items():
        try:
            ok = check()
        except Exception:
            ok = False
        if not ok:
            gone.append(name)
    return gone


def parse_header(header: bytes) -> Any:
    """Parse and check a Pyro message header (with wsbus's checks); return the message.

    Raises:
        ProtocolError: not a Pyro header, or one wsbus refuses (see
            :func:`patch_receiving_message`).
    """
    return protocol.ReceivingMessage(header)


def patch_receiving_message() -> None:
    """Make Pyro check every received message's header before reading its payload.

    Refused as soon as the header is read, before a byte of payload is read, inflated or
    deserialized: a compressed message (a zlib bomb never expands), any serializer but
    serpent (marshal and pickle-like decoders trust their input), ``FLAGS_KEEPSERIALIZED``
    (the daemon would call ``marshal.loads`` on the peer's annotation, whatever the
    serializer), and a connection handshake over :data:`MAX_HANDSHAKE_BYTES`.
    Process-wide and idempotent.
    """
    global _patched
    with _PATCH_LOCK:
        if _patched:
            return
        original = protocol.ReceivingMessage.__init__

        def checked_init(self: Any, header: bytes, payload: bytes | None = None) -> None:
            original(self, header, None)
            if self.flags & protocol.FLAGS_COMPRESSED:
                raise pyro_errors.ProtocolError(
                    "compressed Pyro messages are refused: turn COMPRESSION off on the peer"
                )
            if self.serializer_id != _SERPENT_ID:
                raise pyro_errors.ProtocolError("wsbus peers speak serpent only")
            if self.flags & protocol.FLAGS_KEEPSERIALIZED:
                raise pyro_errors.ProtocolError("keep-serialized Pyro calls are refused")
            if (
                self.type == protocol.MSG_CONNECT
                and self.data_size + self.annotations_size > MAX_HANDSHAKE_BYTES
            ):
                raise pyro_errors.ProtocolError("connection handshake too large")
            if payload is not None:
                self.add_payload(payload)

        protocol.ReceivingMessage.__init__ = checked_init
        refuse_blob_args(Daemon)
        _patched = True


def refuse_blob_args(daemon_class: type[Daemon]) -> None:
    """Make ``daemon_class`` refuse the keep-serialized call path outright.

    The header check refuses the flag already; this is the second wall, in case a message
    reaches the daemon some other way.
    """

    def refused(self: Any, message: Any) -> Any:
        raise pyro_errors.SecurityError("keep-serialized Pyro calls are refused")

    setattr(daemon_class, _BLOB_ARGS, refused)


class PrefixedConnection(socketutil.SocketConnection):  # type: ignore[misc]
    """A Pyro socket connection whose first bytes were read already (the handshake)."""

    def __init__(self, sock: socket.socket, prefix: bytes) -> None:
        super().__init__(sock)
        self._prefix = memoryview(prefix)

    def recv(self, size: int) -> bytes:
        """Return ``size`` bytes: the buffered ones first, then from the socket."""
        prefix = self._prefix
        if not prefix:
            data: bytes = socketutil.receive_data(self.sock, size)
            return data
        head = bytes(prefix[:size])
        self._prefix = prefix[size:]
        if len(head) < size:
            head += socketutil.receive_data(self.sock, size - len(head))
        return head


def hand_to_pool(daemon: Daemon, conn: PrefixedConnection, address: Any) -> bool:
    """Give a connection whose handshake is buffered to a worker of the daemon's pool.

    Returns False (and leaves the connection open) when every worker is busy.
    """
    # Made without __init__: it would wrap the socket in a second SocketConnection whose
    # __del__ closes the socket.
    job = svr_threads.ClientConnectionJob.__new__(svr_threads.ClientConnectionJob)
    job.csock, job.caddr, job.daemon = conn, address, daemon
    try:
        daemon.transportServer.pool.process(job)
    except svr_threads.NoFreeWorkersError:
        return False
    return True


def refuse_connection(daemon: Daemon, conn: PrefixedConnection, reason: str) -> None:
    """Answer a buffered handshake with ``MSG_CONNECTFAIL`` and close (never blocks long)."""
    with contextlib.suppress(Exception):
        daemon._handshake(conn, denied_reason=reason)
    conn.close()


def is_thread_pool(daemon: Daemon) -> bool:
    """True for a daemon whose transport server is Pyro's thread-pool server."""
    return isinstance(daemon.transportServer, svr_threads.SocketServer_Threadpool)


def install_accept(daemon: Daemon, admit: Callable[[socket.socket, Any], None]) -> bool:
    """Make a thread-pool daemon's request loop pass each accepted socket to ``admit``.

    Pyro's own loop would hand the connection straight to a worker, which then waits up to
    ``COMMTIMEOUT`` for the handshake: idle peers could hold every worker. Returns False
    for a daemon that is not a thread-pool server (left as it is).
    """
    server = daemon.transportServer
    if not isinstance(server, svr_threads.SocketServer_Threadpool):
        return False
    import selectors

    selector = selectors.DefaultSelector()
    selector.register(server.sock, selectors.EVENT_READ)

    def events(eventsockets: Any) -> None:
        try:
            if not selector.select(pyro_config.POLLTIMEOUT):
                return
            sock, address = server.sock.accept()
        except (BlockingIOError, InterruptedError, TimeoutError):
            return
        if server.shutting_down:
            sock.close()
            return
        admit(sock, address)

    server.events = events
    return True
