"""Running a wsbus :class:`~wsbus.Service` as its own process on the Pyro bus.

The same ``Service`` subclass that runs on the in-memory bus runs here unchanged: a
:class:`ServiceHost` gives it an event loop, a Pyro daemon (in a thread) through which the
message bus delivers to it, and a forwarder thread through which everything it sends goes,
in order and in batches: to the bus, or straight to the gateway that owns the recipients
when they are connections of one gateway (:class:`~wsbus_pyro.transport.DirectForwarder`).
``wsbus service MODULE:CLASS`` does this from the command line; :func:`run_service` does it
from Python.

The service's ``ctx.clients()`` (and ``ctx.presence(group)``) asks every gateway the bus
lists as alive and joins their lists. A service that declares ``wsbus.presence`` gets every
gateway's presence events, and the bus's own ``gateway_lost`` event when a gateway dies;
receipts (``wsbus.receipt``) and client acknowledgements (``wsbus.processed``) come to the
sending service by name, as replies do.

One process serves a service name: the bus refuses a second one while the first answers
(:class:`~wsbus.errors.ConfigError`, saying that Pyro is the single-machine bus and
``--bus nats`` runs several instances), and lets a restarted one replace a dead one at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from typing import Any

from Pyro5 import errors as pyro_errors
from Pyro5.client import Proxy
from Pyro5.server import expose

from wsbus.envelope import Envelope, NodeId
from wsbus.errors import BusUnavailable, ConfigError
from wsbus.service import Service, ServiceRunner, load_service, serve_until_stopped

from .config import PyroConfig, SecureDaemon, apply
from .transport import (
    OK,
    UNAVAILABLE,
    DirectForwarder,
    RecentIds,
    decode_batch,
    lookup,
    undeliverable_report,
)

__all__ = ["ServiceHost", "load_service", "run_service"]

log = logging.getLogger("wsbus.pyro.service")


@expose
class ServiceEndpoint:
    """The Pyro object the message bus delivers to: hands envelopes to the service's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, runner: ServiceRunner, timeout: float):
        self._loop = loop
        self._runner = runner
        self._timeout = timeout
        # The bus may send a service's message again after a crash: take it once.
        self._recent = RecentIds()

    def deliver(self, blob: Any) -> list[str]:
        """Take a batch; return ``ok`` for each envelope the service now holds."""
        envelopes = decode_batch(blob)
        future: concurrent.futures.Future[list[str]] = concurrent.futures.Future()
        self._loop.call_soon_threadsafe(self._accept, envelopes, future)
        try:
            return future.result(self._timeout)
        except concurrent.futures.TimeoutError:
            if future.cancel():
                # The loop never got to this batch and now never will: none was taken.
                return [UNAVAILABLE] * len(envelopes)
            # It is being taken right now (a moment's work on the loop): report the truth.
            return future.result(self._timeout)

    def _accept(
        self, envelopes: list[Envelope], future: concurrent.futures.Future[list[str]]
    ) -> None:
        if not future.set_running_or_notify_cancel():
            return  # deliver() gave up and answered unavailable: take nothing
        recent = self._recent
        statuses = []
        for envelope in envelopes:
            # Checked and recorded here on the loop, one envelope at a time, so a copy
            # arriving in another batch at once, or later in this one, is seen. An id is
            # recorded only once the service took the envelope: one refused (inbox full)
            # must be taken when the sender tries again, not confirmed and lost.
            if recent.seen(envelope):
                statuses.append(OK)  # a second copy of one the service holds already
                continue
            try:
                self._runner.accept(envelope)
            except BusUnavailable:
                statuses.append(UNAVAILABLE)
                continue
            except Exception:
                # A bug in the runner: the batch is still answered, this one as not taken.
                log.exception("the service could not take %s (%s)", envelope.type, envelope.id)
                statuses.append(UNAVAILABLE)
                continue
            recent.remember(envelope)
            statuses.append(OK)
        future.set_result(statuses)


class ServiceHost:
    """One service on the Pyro bus, in this process.

    Args:
        service: the service instance.
        config: Pyro settings.
        inbox_size: envelopes that may wait for the service before the bus is told
            ``unavailable``.
    """

    def __init__(
        self, service: Service, config: PyroConfig | None = None, *, inbox_size: int = 1000
    ) -> None:
        self.service = service
        self.config = config if config is not None else PyroConfig()
        self.inbox_size = inbox_size
        self.name = f"{self.config.service_prefix}{service.name}"
        self.uri = ""
        self._daemon: SecureDaemon | None = None
        self._daemon_thread: threading.Thread | None = None
        self._sender: DirectForwarder | None = None
        self._runner: ServiceRunner | None = None
        self._watchdog: threading.Thread | None = None
        self._stop = threading.Event()
        # Wakes the watchdog before its interval: stopping, or the forwarder met a gateway
        # its directory does not list (one that started a moment ago, most likely).
        self._wake = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._displaced_by: str | None = None

    async def start(self) -> None:
        """Join the bus: start the daemon, register, and begin handling messages.

        Raises:
            BusUnavailable: no name server or message bus could be reached.
        """
        config = self.config
        apply(config)
        loop = asyncio.get_running_loop()
        self._loop = loop
        # What the bus does not confirm (it crashed, or a gateway is re-registering) is
        # sent again for up to retry_for, then reported to the service as undeliverable.
        # A message for connections of one gateway goes straight to it (one Pyro hop); the
        # rest through the bus, which keeps routing by type and the directory of gateways.
        self._sender = DirectForwarder(
            "message bus",
            self._route_proxy,
            "route",
            config,
            retry_after=0.2,
            retry_for=config.retry_for,
            on_undelivered=self._undelivered,
        )
        self._sender.on_unknown = self._wake.set
        self._sender.start()
        self._runner = ServiceRunner(
            self.service,
            self._sender.put,
            inbox_size=self.inbox_size,
            timeout=config.call_timeout,
            gateways=self.gateways,
        )
        self._daemon = SecureDaemon(config)
        endpoint = ServiceEndpoint(loop, self._runner, config.call_timeout)
        self.uri = str(self._daemon.register(endpoint, objectId=self.name))
        self._daemon_thread = threading.Thread(
            target=self._daemon.requestLoop, name="wsbus-service-daemon", daemon=True
        )
        self._daemon_thread.start()
        await self._runner.start()
        try:
            await asyncio.to_thread(self._register)
        except Exception:
            await self.close()
            raise
        self._watchdog = threading.Thread(target=self._watch, name="wsbus-watchdog", daemon=True)
        self._watchdog.start()
        log.info(
            "service %r on the Pyro bus at %s, handling %s",
            self.service.name,
            self.uri,
            sorted(self._runner.types),
        )

    async def gateways(self) -> list[NodeId]:
        """Return the node ids of the gateways on the bus now (``ctx.clients()`` asks each).

        Raises:
            BusUnavailable: the message bus cannot be reached.
        """
        return await asyncio.to_thread(self._live_gateways)

    def _live_gateways(self) -> list[NodeId]:
        # A proxy per call: Pyro proxies belong to one thread, and clients() is rare.
        try:
            with self._bus_proxy() as bus:
                nodes = bus.gateways()
        except (pyro_errors.CommunicationError, pyro_errors.NamingError, OSError) as exc:
            raise BusUnavailable(f"the message bus cannot be reached ({exc})") from None
        return [NodeId(str(node)) for node in nodes]

    def figures(self) -> dict[str, int]:
        """What ``wsbus service --metrics`` reports: the runner's figures and the sender's.

        ``bus_available``: 1 while the message bus takes what this service sends;
        ``send_queue``: envelopes waiting to be sent to it; ``send_calls_total``: calls made.
        """
        figures = {} if self._runner is None else self._runner.figures()
        sender = self._sender
        if sender is not None:
            figures["bus_available"] = 0 if sender.down else 1
            figures["send_queue"] = sender.queued
            figures["send_calls_total"] = sender.calls
        return figures

    async def close(self) -> None:
        """Leave the bus and stop. Idempotent."""
        self._stop.set()
        self._wake.set()
        if self._watchdog is not None:
            await asyncio.to_thread(self._watchdog.join, self.config.reregister_interval + 1)
            self._watchdog = None
            await asyncio.to_thread(self._unregister)
        if self._runner is not None:
            await self._runner.stop()
            self._runner = None
        if self._sender is not None:
            await asyncio.to_thread(self._sender.stop, 2.0)
            self._sender = None
        if self._daemon is not None:
            daemon, self._daemon = self._daemon, None
            await asyncio.to_thread(daemon.shutdown)
            if self._daemon_thread is not None:
                await asyncio.to_thread(self._daemon_thread.join, 2.0)

    def _bus_proxy(self) -> Proxy:
        config = self.config
        # Resolved here, not with PYRONAME: the proof in the handshake names the address.
        return lookup(config.bus_name, config)

    def _route_proxy(self) -> Proxy:
        # The forwarder's calls return at once, but the wait for the bus's confirmations
        # (confirm) may take up to a second: more than comm_timeout allows on its own.
        proxy = self._bus_proxy()
        proxy._pyroTimeout = self.config.call_timeout + self.config.comm_timeout
        return proxy

    def _undelivered(self, envelope: Envelope, status: str) -> None:
        """Tell the service what the bus did not deliver (on the forwarder's thread)."""
        loop, runner = self._loop, self._runner
        if envelope.type.startswith("wsbus.") or loop is None or runner is None:
            log.warning("%s (%s) was not delivered: %s", envelope.type, envelope.id, status)
            return
        report = undeliverable_report(envelope, status, self.config.retry_for)
        with contextlib.suppress(RuntimeError):  # the loop closed
            loop.call_soon_threadsafe(self._take_report, runner, report)

    @staticmethod
    def _take_report(runner: ServiceRunner, report: Envelope) -> None:
        try:
            runner.accept(report)
        except BusUnavailable:
            log.warning("an undeliverable report for %s was lost: inbox full", report.reply_to)

    def _register(self) -> None:
        assert self._runner is not None
        config = self.config
        try:
            with self._bus_proxy() as bus:
                holder = bus.register_service(
                    self.service.name, sorted(self._runner.types), self.uri
                )
        except (pyro_errors.CommunicationError, pyro_errors.NamingError, OSError) as exc:
            raise BusUnavailable(
                f"no message bus {config.bus_name!r} via the name server at "
                f"{config.ns_host}:{config.ns_port} ({exc}); start it with `wsbus bus`"
            ) from None
        self._learn_directory(bus_proxy=None)
        if holder is not None:
            # Worded without "ready": that word is how a supervisor sees a service start.
            raise ConfigError(
                f"another process serves service {self.service.name!r} on this bus (at "
                f"{holder}): the Pyro bus is the single-machine bus and runs one process per "
                "service. Stop the other process first, or run several instances with "
                "`--bus nats`"
            )

    def _learn_directory(self, bus_proxy: Proxy | None) -> None:
        """Ask the bus where the live gateways are; the forwarder delivers to them directly.

        A thread's work (a Pyro call). A bus that cannot say (unreachable, or one without
        a directory) leaves the directory as it was: a gateway gone since is found out by
        the forwarder's direct call failing, and its messages then go through the bus.
        """
        sender = self._sender
        if sender is None:
            return
        try:
            if bus_proxy is None:
                with self._bus_proxy() as bus:
                    entries = bus.directory()
            else:
                entries = bus_proxy.directory()
            directory = {str(node): str(uri) for node, uri in entries}
        except (pyro_errors.CommunicationError, pyro_errors.NamingError, OSError):
            return  # the bus is down: the watchdog's next check finds it out
        except Exception as exc:
            log.info("the message bus gave no directory of gateways (%s): all through the bus", exc)
            return
        sender.directory = directory

    def _unregister(self) -> None:
        try:
            with self._bus_proxy() as bus:
                # Only this process's registration: never another process's of this name.
                bus.unregister_service(self.service.name, self.uri)
        except Exception as exc:
            log.info("leaving the bus: %s", exc)

    def _watch(self) -> None:
        """Check in with the bus every interval; register again when it restarted.

        The checks are how the bus knows this process is alive: a second process of this
        service is refused while they come. Each check also fetches the directory of
        gateways, and the forwarder wakes this thread early (at most every 0.25 s) when it
        has a message for a gateway the directory does not list.
        """
        assert self._runner is not None
        types = sorted(self._runner.types)
        bus: Proxy | None = None
        name = self.service.name
        while True:
            self._wake.wait(self.config.reregister_interval)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                if bus is None:
                    bus = self._bus_proxy()
                if not bus.registered("service", name, self.uri):
                    holder = bus.register_service(name, types, self.uri)
                    self._displaced(holder)
                    if holder is None:
                        log.info("service %r re-registered with the message bus", name)
                self._learn_directory(bus)
            except (pyro_errors.CommunicationError, pyro_errors.NamingError, OSError):
                if bus is not None:
                    bus._pyroRelease()
                bus = None
        if bus is not None:
            bus._pyroRelease()

    def _displaced(self, holder: str | None) -> None:
        """Log once when another process of this service holds the name, and when it ends."""
        if holder is not None and self._displaced_by is None:
            log.error(
                "another process of service %r holds its name on the bus (at %s): this one "
                "gets no messages while that one runs. The Pyro bus runs one process per "
                "service: stop one of them (or run several with `--bus nats`)",
                self.service.name,
                holder,
            )
        self._displaced_by = holder


def run_service(service: Service | str, config: PyroConfig | None = None) -> None:
    """Run a service on the Pyro bus until SIGINT or SIGTERM (blocks)."""
    instance = load_service(service) if isinstance(service, str) else service
    asyncio.run(serve_until_stopped(lambda: ServiceHost(instance, config), instance.name))
