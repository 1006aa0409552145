"""Pyro settings for wsbus, and the safety measures applied to every wsbus Pyro process.

Pyro5 keeps its settings process-wide (``Pyro5.config``); every wsbus process (gateway,
message bus, service) applies :class:`PyroConfig` once at start with :func:`apply`:

- the daemon binds 127.0.0.1 unless configured otherwise;
- ``MAX_MESSAGE_SIZE`` is bounded (4 MiB) and ``COMMTIMEOUT`` is set (5 s), so a peer can
  neither make a process allocate without bound nor hold a worker thread forever;
- compressed Pyro messages, serializers other than serpent and keep-serialized calls are
  refused as soon as their header is read, before a byte of their payload is read (a zlib
  bomb never expands, ``marshal`` never sees a peer's bytes);
- a connection's handshake is read off the worker pool, within ``handshake_timeout``
  (:mod:`wsbus_pyro.doorman`), so idle or half-open peers cannot hold the workers;
- ``SOCK_NODELAY`` is on: small calls are not delayed by Nagle's algorithm;
- with ``secret`` set, a peer must present a token derived from it in Pyro's connection
  handshake, so only trusted processes may deliver to clients; the name server
  ``wsbus nameserver`` runs checks it too (:class:`ProofCheck`), so a process without the
  secret can neither hold its workers nor change its names.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import threading
import time
from typing import Any, Final

import msgspec
from Pyro5 import config as pyro_config
from Pyro5 import errors as pyro_errors
from Pyro5.server import Daemon

from wsbus.errors import ConfigError

from . import _internals
from .doorman import Doorman

__all__ = [
    "ProofCheck",
    "PyroConfig",
    "SecureDaemon",
    "apply",
    "client_proof",
    "guard",
    "handshake",
    "server_proof",
]


class PyroConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Settings of the Pyro bus, shared by the gateway, the message bus and services.

    Attributes:
        ns_host: the name server's host.
        ns_port: the name server's port.
        host: the address this process's Pyro daemon binds: loopback unless you mean
            to accept peers from other machines (then also set ``secret``).
        port: the daemon's port; 0 picks a free one.
        bus_name: the message bus's name in the name server.
        gateway_prefix: gateways register as ``<prefix><node>``.
        service_prefix: services register as ``<prefix><name>``.
        max_message_size: the largest Pyro message accepted, in bytes.
        comm_timeout: seconds a socket operation may take before the peer is dropped.
        call_timeout: seconds a gateway waits for the bus to accept a message.
        threadpool_size: worker threads for Pyro connections (one per connected peer).
        secret: a shared secret every peer must prove it knows; None disables the check.
        batch_size: the most envelopes sent in one Pyro call.
        batch_delay: seconds to wait for more envelopes before sending a short batch.
        reregister_interval: seconds between checks that this process is still
            registered with the name server and the bus (re-registering if not).
        handshake_timeout: seconds a new Pyro connection may take to send its whole
            handshake; it holds no worker thread meanwhile.
        retry_for: seconds a service keeps sending again what the bus could not confirm
            (the bus crashed, or a gateway is re-registering) before it reports the
            message undeliverable to itself.
        single_thread: run the gateway's Pyro daemon fully inside its event loop
            (multiplex server). For trusted loopback set-ups only: a peer that stalls
            mid-message stalls the loop for up to ``comm_timeout``.
    """

    ns_host: str = "127.0.0.1"
    ns_port: int = 9090
    host: str = "127.0.0.1"
    port: int = 0
    bus_name: str = "wsbus.bus"
    gateway_prefix: str = "wsbus.gateway."
    service_prefix: str = "wsbus.service."
    max_message_size: int = 4 * 1024 * 1024
    comm_timeout: float = 5.0
    call_timeout: float = 5.0
    threadpool_size: int = 128
    secret: str | None = None
    batch_size: int = 256
    batch_delay: float = 0.0
    reregister_interval: float = 1.0
    handshake_timeout: float = 2.0
    retry_for: float = 10.0
    single_thread: bool = False

    def __post_init__(self) -> None:
        if self.max_message_size < 64 * 1024:
            raise ConfigError("max_message_size must be at least 64 KiB")
        if self.comm_timeout <= 0 or self.call_timeout <= 0:
            raise ConfigError("comm_timeout and call_timeout must be > 0")
        if self.threadpool_size < 4:
            raise ConfigError("threadpool_size must be at least 4")
        if self.batch_size < 1 or self.batch_delay < 0:
            raise ConfigError("batch_size must be >= 1 and batch_delay >= 0")
        if self.handshake_timeout <= 0 or self.retry_for < 0:
            raise ConfigError("handshake_timeout must be > 0 and retry_for >= 0")


MAX_HANDSHAKE_BYTES: Final = _internals.MAX_HANDSHAKE_BYTES
"""The largest Pyro connection handshake accepted, in bytes."""
HANDSHAKE_WINDOW: Final = 120.0
"""Seconds a handshake proof stays valid (clocks of the processes must agree that well)."""


def apply(config: PyroConfig) -> None:
    """Apply the settings to this process's Pyro5 configuration, and the safety patch."""
    pyro_config.MAX_MESSAGE_SIZE = config.max_message_size
    pyro_config.COMMTIMEOUT = config.comm_timeout
    pyro_config.COMPRESSION = False
    pyro_config.SOCK_NODELAY = True
    pyro_config.SERIALIZER = "serpent"
    pyro_config.THREADPOOL_SIZE = config.threadpool_size
    pyro_config.THREADPOOL_SIZE_MIN = min(8, config.threadpool_size)
    pyro_config.SERVERTYPE = "multiplex" if config.single_thread else "thread"
    pyro_config.POLLTIMEOUT = 0.5
    pyro_config.DETAILED_TRACEBACK = False
    _internals.patch_receiving_message()


def guard(daemon: Daemon, config: PyroConfig) -> Doorman | None:
    """Give a thread-pool daemon a :class:`Doorman`: handshakes are read off its pool.

    Returns the doorman (stop it when the daemon closes), or None for a multiplexing
    daemon, which reads everything on its own thread anyway.
    """
    if not _internals.is_thread_pool(daemon):
        return None
    doorman = Doorman(
        daemon,
        comm_timeout=config.comm_timeout,
        handshake_timeout=config.handshake_timeout,
    )
    _internals.install_accept(daemon, doorman.admit)
    doorman.start()
    return doorman


def client_proof(secret: str, nonce: str, stamp: int, location: str) -> str:
    """Return the proof a connecting peer sends.

    It is bound to a fresh nonce, a time, and the address the peer connects to, so that a
    daemon at another address (one a hijacked name server pointed at) cannot replay it.
    """
    message = f"wsbus-pyro-client|{nonce}|{stamp}|{location}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def server_proof(secret: str, nonce: str, location: str) -> str:
    """The proof a daemon answers with: a peer talks only to a daemon that knows the secret."""
    message = f"wsbus-pyro-server|{nonce}|{location}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def handshake(secret: str, location: str) -> tuple[dict[str, Any], str]:
    """Return (the handshake data to send, the answer to expect) for one connection."""
    nonce = os.urandom(16).hex()
    stamp = int(time.time())
    data = {"nonce": nonce, "ts": stamp, "mac": client_proof(secret, nonce, stamp, location)}
    return data, server_proof(secret, nonce, location)


class ProofCheck:
    """The shared-secret handshake, for any Pyro daemon class (mix it in before the daemon).

    Each peer's proof is bound to a nonce used once, a time within
    :data:`HANDSHAKE_WINDOW`, and this daemon's address; the daemon proves the secret back.
    Call :meth:`_init_proof` before the daemon's ``__init__``. With no secret, every
    handshake is accepted, as by plain Pyro.
    """

    locationStr: str

    def _init_proof(self, secret: str | None) -> None:
        self._secret = secret
        self._seen: dict[str, float] = {}
        self._seen_lock = threading.Lock()

    def validateHandshake(self, conn: Any, data: Any) -> Any:
        """Refuse a peer that cannot prove it knows the secret (when one is set)."""
        secret = self._secret
        if secret is None:
            return "wsbus"
        refused = pyro_errors.SecurityError("this wsbus peer does not know the shared secret")
        if not isinstance(data, dict):
            raise refused
        nonce, stamp, mac = data.get("nonce"), data.get("ts"), data.get("mac")
        if not (isinstance(nonce, str) and isinstance(stamp, int) and isinstance(mac, str)):
            raise refused
        now = time.time()
        if abs(now - stamp) > HANDSHAKE_WINDOW or len(nonce) > 64:
            raise refused
        expected = client_proof(secret, nonce, stamp, self.locationStr)
        if not hmac.compare_digest(mac, expected):
            raise refused
        with self._seen_lock:
            if nonce in self._seen:
                raise refused  # a replay
            if len(self._seen) > 100_000:
                self._seen = {n: t for n, t in self._seen.items() if t > now}
            self._seen[nonce] = now + 2 * HANDSHAKE_WINDOW
        return server_proof(secret, nonce, self.locationStr)


class SecureDaemon(ProofCheck, Daemon):  # type: ignore[misc]
    """A Pyro daemon that checks each peer's proof of the shared secret, and proves its own.

    Its handshakes are read by a :class:`~wsbus_pyro.doorman.Doorman`, off the worker pool.
    """

    def __init__(self, config: PyroConfig, **kwargs: Any) -> None:
        self._init_proof(config.secret)
        super().__init__(host=config.host, port=config.port, **kwargs)
        self.doorman = guard(self, config)

    def admit(self, sock: socket.socket, address: Any) -> None:
        """Take a connection accepted outside the daemon's own loop (the gateway's loop)."""
        if self.doorman is None:
            sock.close()
            return
        self.doorman.admit(sock, address)

    def close(self) -> None:
        """Close the daemon and its doorman."""
        super().close()
        doorman = getattr(self, "doorman", None)
        if doorman is not None:
            doorman.stop()
