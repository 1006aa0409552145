"""The gateway's side of the Pyro bus: :class:`PyroBus`, a :class:`wsbus.Bus` on Pyro5.

The gateway is a Pyro object (``wsbus.gateway.<node>`` in the name server) whose daemon's
listening socket sits in the gateway's asyncio loop (``loop.add_reader``), as in the
original design. Each accepted Pyro connection's handshake is read by the daemon's doorman
thread (:mod:`wsbus_pyro.doorman`) and the connection then served by a thread of Pyro's pool;
every envelope it delivers is handed to the loop with ``call_soon_threadsafe``: a stalled
or hostile peer holds one pool thread for at most ``comm_timeout``, never the loop.

``PyroConfig(single_thread=True)`` runs the original single-thread mode instead: a
multiplexing daemon fully inside the loop, its reader set re-synced by file descriptor
after every event. Only for trusted loopback set-ups: a peer that stops mid-message
stalls the loop for up to ``comm_timeout``.

Publishing never blocks the loop either: a forwarder thread owns the proxy to the message
bus, batches envelopes, and reports each one's fate back to the loop.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from typing import Any

from Pyro5 import errors as pyro_errors
from Pyro5.client import Proxy
from Pyro5.server import expose

from wsbus.bus import BusSink
from wsbus.envelope import Envelope, ServiceAddress
from wsbus.errors import BusUnavailable, ConfigError, NoRoute

from .config import PyroConfig, SecureDaemon, apply
from .transport import (
    NO_ROUTE,
    OK,
    REREGISTERING,
    Forwarder,
    RecentIds,
    decode_batch,
    lookup,
    name_server,
)

__all__ = ["PyroBus"]

log = logging.getLogger("wsbus.pyro.gateway")

_SERVED_LIMIT = 100_000
"""The most types and service names a gateway remembers as served (a bound on memory)."""


@expose
class GatewayEndpoint:
    """The Pyro object the message bus delivers to: hands envelopes to the gateway's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sink: BusSink, on_loop: bool) -> None:
        self._loop = loop
        self._sink = sink
        self._on_loop = on_loop
        # A service sends again what a crashed bus did not confirm: deliver it once.
        self.recent = RecentIds()

    def deliver(self, blob: Any) -> None:
        """Take a batch of envelopes for the gateway; returns before they are processed."""
        envelopes = decode_batch(blob)
        if self._on_loop:
            self._deliver_all(envelopes)
        else:
            self._loop.call_soon_threadsafe(self._deliver_all, envelopes)

    def _deliver_all(self, envelopes: list[Envelope]) -> None:
        # The duplicate check runs here, on the loop, where the gateway takes each
        # envelope: an id is recorded only once its envelope was handed to the gateway
        # (never for a batch whose hand-off failed), and copies arriving in two batches
        # at once are checked one after the other.
        deliver = self._sink.deliver
        recent = self.recent
        for envelope in envelopes:
            if recent.seen(envelope):
                continue
            deliver(envelope)
            recent.remember(envelope)


class PyroBus:
    """A :class:`wsbus.Bus` over Pyro5: the gateway joins a message bus found by name.

    Args:
        config: Pyro settings; the name server at ``ns_host:ns_port`` must be running, and
            a message bus (``wsbus bus``) registered in it.
    """

    def __init__(self, config: PyroConfig | None = None) -> None:
        self.config = config if config is not None else PyroConfig()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._daemon: SecureDaemon | None = None
        self._publisher: Forwarder | None = None
        self._watchdog: threading.Thread | None = None
        self._stop = threading.Event()
        self._watched: dict[int, socket.socket] = {}
        self._node = ""
        self._bus_reachable = True
        # Types (and service names) the bus took from this gateway: after a bus restart,
        # they are "unavailable" (retry) while their services re-register, not "no_route".
        self._served: set[tuple[bool, str]] = set()
        self.uri = ""
        self.name = ""

    # -- Bus -----------------------------------------------------------------------------

    async def start(self, sink: BusSink) -> None:
        """Start the daemon in the loop, join the bus, and keep the registration alive.

        Raises:
            BusUnavailable: no name server or message bus could be reached; the message
                says where it looked.
        """
        if self._loop is not None:
            raise ConfigError("this PyroBus is started already")
        config = self.config
        apply(config)
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._node = str(sink.node)
        self.name = f"{config.gateway_prefix}{self._node}"
        daemon = SecureDaemon(config)
        self._daemon = daemon
        endpoint = GatewayEndpoint(loop, sink, on_loop=config.single_thread)
        self.uri = str(daemon.register(endpoint, objectId=self.name))
        if config.single_thread:
            self._sync_readers()
        else:
            listener: socket.socket = daemon.sock
            listener.setblocking(False)
            loop.add_reader(listener.fileno(), self._accept, listener)
            self._watched[listener.fileno()] = listener
        self._publisher = Forwarder(
            "message bus", self._bus_proxy, "publish", config, retry_after=0.2
        )
        self._publisher.start()
        try:
            await asyncio.to_thread(self._register)
        except Exception:
            await self.close()
            raise
        self._watchdog = threading.Thread(
            target=self._watch, name=f"wsbus-watchdog-{self._node}", daemon=True
        )
        self._watchdog.start()
        log.info("gateway %s on the Pyro bus at %s", self._node, self.uri)

    async def publish(self, envelope: Envelope) -> None:
        """Put an envelope on the bus; return once the services it is for have it.

        Raises:
            NoRoute: no service handles its type.
            BusUnavailable: the bus or the service cannot take it now; retry later.
        """
        assert self._loop is not None and self._publisher is not None
        loop = self._loop
        future: asyncio.Future[str] = loop.create_future()

        def settle(status: str) -> None:
            loop.call_soon_threadsafe(_set, future, status)

        self._publisher.put(envelope, settle)
        try:
            async with asyncio.timeout(self.config.call_timeout + self.config.comm_timeout):
                status = await future
        except TimeoutError:
            raise BusUnavailable("the message bus did not answer in time") from None
        to = envelope.to
        key = (True, to.name) if isinstance(to, ServiceAddress) else (False, envelope.type)
        if status == OK:
            if key not in self._served and len(self._served) < _SERVED_LIMIT:
                self._served.add(key)
            return
        if status == NO_ROUTE or (status == REREGISTERING and key not in self._served):
            raise NoRoute(envelope.type)
        if status == REREGISTERING:
            raise BusUnavailable(f"the service for {envelope.type!r} is re-registering", False)
        # The bus answered but a service could not take it: the bus itself is fine.
        whole_bus = self._publisher is None or self._publisher.down
        raise BusUnavailable(f"the bus could not deliver {envelope.type!r} now", whole_bus)

    @property
    def available(self) -> bool:
        """True while the message bus is reachable.

        That is, the watchdog's last check (every ``reregister_interval``) or the last
        publish reached it.
        """
        if self._publisher is None:
            return False
        return self._bus_reachable or not self._publisher.down

    async def close(self) -> None:
        """Leave the bus, stop the daemon and the threads. Idempotent."""
        self._stop.set()
        loop = self._loop
        if loop is not None:
            for fd in list(self._watched):
                loop.remove_reader(fd)
            self._watched.clear()
        if self._watchdog is not None:
            await asyncio.to_thread(self._watchdog.join, self.config.reregister_interval + 1)
            self._watchdog = None
            await asyncio.to_thread(self._unregister)
        if self._publisher is not None:
            await asyncio.to_thread(self._publisher.stop, 2.0)
            self._publisher = None
        if self._daemon is not None:
            daemon, self._daemon = self._daemon, None
            await asyncio.to_thread(daemon.close)

    # -- the daemon in the loop ----------------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        """Accept one Pyro connection and give it to a pool thread (threadpool mode)."""
        try:
            conn, address = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("accepting a Pyro connection failed: %s", exc)
            return
        daemon = self._daemon
        if daemon is None:
            conn.close()
            return
        # The doorman reads the handshake off the pool (never on this loop, never on a
        # worker), so idle or half-open peers cannot hold the workers.
        daemon.admit(conn, address)

    def _on_event(self, sock: socket.socket) -> None:
        """Serve one event of the multiplexing daemon (single-thread mode)."""
        daemon = self._daemon
        if daemon is None:
            return
        try:
            daemon.events([sock])
        except Exception:
            log.exception("the Pyro daemon failed on an event")
        self._sync_readers()

    def _sync_readers(self) -> None:
        """Watch exactly the daemon's sockets, by file descriptor (they come and go)."""
        loop = self._loop
        daemon = self._daemon
        if loop is None or daemon is None:
            return
        current: dict[int, socket.socket] = {}
        for sock in daemon.sockets:
            fd = sock.fileno()
            if fd >= 0:
                current[fd] = sock
        for fd in list(self._watched):
            if fd not in current or current[fd] is not self._watched[fd]:
                loop.remove_reader(fd)
                del self._watched[fd]
        for fd, sock in current.items():
            if fd not in self._watched:
                loop.add_reader(fd, self._on_event, sock)
                self._watched[fd] = sock

    # -- registration (threads only) -----------------------------------------------------

    def _bus_proxy(self) -> Proxy:
        config = self.config
        # Resolved here, not with PYRONAME: the proof in the handshake names the address.
        return lookup(config.bus_name, config)

    def _register(self) -> None:
        """Register with the name server and the bus (blocking: a thread's work)."""
        config = self.config
        try:
            with name_server(config) as ns:
                ns.register(self.name, self.uri)
        except (pyro_errors.CommunicationError, OSError) as exc:
            raise BusUnavailable(
                f"no Pyro name server at {config.ns_host}:{config.ns_port} ({exc}); "
                "start one with `wsbus nameserver`, or pass its address"
            ) from None
        try:
            with self._bus_proxy() as bus:
                bus.register_gateway(self._node, self.uri)
        except (pyro_errors.CommunicationError, pyro_errors.NamingError, OSError) as exc:
            raise BusUnavailable(
                f"no message bus named {config.bus_name!r} in the name server ({exc}); "
                "start one with `wsbus bus`"
            ) from None

    def _unregister(self) -> None:
        config = self.config
        try:
            with name_server(config) as ns:
                ns.remove(self.name)
            with self._bus_proxy() as bus:
                bus.unregister_gateway(self._node)
        except Exception as exc:
            log.info("leaving the bus: %s", exc)

    def _watch(self) -> None:
        """Re-register when the name server or the bus restarted (within an interval)."""
        config = self.config
        ns: Proxy | None = None
        bus: Proxy | None = None
        while not self._stop.wait(config.reregister_interval):
            try:
                if ns is None:
                    ns = name_server(config)
                if str(ns.lookup(self.name)) != self.uri:
                    raise pyro_errors.NamingError("registration changed")
            except pyro_errors.NamingError:
                self._try_register(ns, "name server")
            except Exception as exc:  # never let the watchdog die: it is how we recover
                if not isinstance(exc, pyro_errors.CommunicationError | OSError):
                    log.warning("checking the name server registration failed: %s", exc)
                if ns is not None:
                    ns._pyroRelease()
                ns = None
                continue
            try:
                if bus is None:
                    bus = self._bus_proxy()
                if not bus.registered("gateway", self._node, self.uri):
                    bus.register_gateway(self._node, self.uri)
                    log.info("gateway %s re-registered with the message bus", self._node)
                self._bus_reachable = True
            except Exception as exc:
                self._bus_reachable = False
                if not isinstance(exc, pyro_errors.PyroError | OSError):
                    log.warning("checking the message bus registration failed: %s", exc)
                if bus is not None:
                    bus._pyroRelease()
                bus = None
        for proxy in (ns, bus):
            if proxy is not None:
                proxy._pyroRelease()

    def _try_register(self, ns: Proxy | None, what: str) -> None:
        if ns is None:
            return
        try:
            ns.register(self.name, self.uri)
            log.info("gateway %s re-registered with the %s", self._node, what)
        except Exception as exc:
            log.info("re-registering with the %s failed: %s", what, exc)


def _set(future: asyncio.Future[str], status: str) -> None:
    if not future.done():
        future.set_result(status)
