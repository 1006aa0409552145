"""The processes of a Pyro deployment: the name server and the message bus.

``wsbus nameserver`` and ``wsbus bus`` call these; each runs until SIGINT or SIGTERM.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from Pyro5 import errors as pyro_errors
from Pyro5 import nameserver

from wsbus.errors import BusUnavailable

from .config import ProofCheck, PyroConfig, SecureDaemon, apply, guard
from .messagebus import MessageBus, bus_figures
from .transport import name_server

__all__ = ["NameServerDaemon", "run_bus", "run_name_server"]

log = logging.getLogger("wsbus.pyro")


class _Stop:
    """A stop flag a signal handler can set: no lock, so a second signal cannot deadlock."""

    def __init__(self) -> None:
        self.requested = False

    def set(self) -> None:
        self.requested = True

    def is_set(self) -> bool:
        return self.requested

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.requested and time.monotonic() < deadline:
            time.sleep(min(0.1, timeout))
        return self.requested


def _stop_on_signals() -> _Stop:
    stop = _Stop()

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.requested = True

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handler)
    return stop


class NameServerDaemon(ProofCheck, nameserver.NameServerDaemon):  # type: ignore[misc]
    """Pyro's name server daemon, checking the shared-secret handshake as every wsbus daemon.

    With a secret set, a peer without it (Pyro's ``nsc``, a plain proxy) is refused at the
    handshake: it can neither look up, register nor remove names, nor hold a worker for
    longer than one HMAC check. Without a secret it is open, as Pyro's own.
    """

    def __init__(self, config: PyroConfig) -> None:
        self._init_proof(config.secret)
        super().__init__(config.ns_host, config.ns_port)
        self.doorman = guard(self, config)

    def close(self) -> None:
        """Close the daemon and its doorman."""
        super().close()
        doorman = getattr(self, "doorman", None)
        if doorman is not None:
            doorman.stop()


def run_name_server(config: PyroConfig | None = None) -> None:
    """Run a Pyro name server at ``ns_host:ns_port`` until a signal (blocks).

    With ``config.secret`` set, only peers that prove it may use it (see
    :class:`NameServerDaemon`).

    Raises:
        OSError: the port is taken.
    """
    config = config if config is not None else PyroConfig()
    apply(config)
    stop = _stop_on_signals()
    daemon = NameServerDaemon(config)
    uri = daemon.uriFor(daemon.nameserver)
    print(f"name server ready at {uri}", flush=True)
    try:
        daemon.requestLoop(loopCondition=lambda: not stop.is_set())
    finally:
        daemon.close()


def run_bus(config: PyroConfig | None = None, *, metrics: str | None = None) -> None:
    """Run the message bus until a signal (blocks); it registers as ``bus_name``.

    Args:
        config: the Pyro settings.
        metrics: ``[HOST:]PORT`` to serve Prometheus metrics at (``wsbus bus --metrics``);
            None: no metrics.

    Raises:
        BusUnavailable: the name server cannot be reached.
        ConfigError: ``metrics`` is not an address.
        OSError: the configured port (or the metrics port) is taken.
    """
    config = config if config is not None else PyroConfig()
    apply(config)
    stop = _stop_on_signals()
    bus = MessageBus(config)
    stop_metrics = None if metrics is None else _serve_bus_metrics(bus, metrics)
    daemon = SecureDaemon(config)
    uri = str(daemon.register(bus, objectId=config.bus_name))
    try:
        with name_server(config) as ns:
            ns.register(config.bus_name, uri)
    except (pyro_errors.CommunicationError, OSError) as exc:
        daemon.close()
        raise BusUnavailable(
            f"no Pyro name server at {config.ns_host}:{config.ns_port} ({exc}); "
            "start one with `wsbus nameserver`"
        ) from None
    watchdog = threading.Thread(
        target=_keep_registered, args=(config, uri, stop), name="wsbus-bus-watchdog", daemon=True
    )
    watchdog.start()
    sweeper = threading.Thread(
        target=_sweep, args=(config, bus, stop), name="wsbus-bus-sweeper", daemon=True
    )
    sweeper.start()
    print(f"message bus ready at {uri}", flush=True)
    try:
        daemon.requestLoop(loopCondition=lambda: not stop.is_set())
    finally:
        stop.set()
        # First: from now on it refuses registrations (Pyro's workers may still serve
        # calls until the daemon is closed).
        bus._shutdown()
        try:
            with name_server(config) as ns:
                ns.remove(config.bus_name)
        except Exception as exc:
            log.info("leaving the name server: %s", exc)
        daemon.close()
        if stop_metrics is not None:
            stop_metrics()


def _serve_bus_metrics(bus: MessageBus, address: str) -> Callable[[], None]:
    """Serve the message bus's figures (:func:`bus_figures`) as Prometheus metrics."""
    from wsbus.metrics import family, serve_metrics

    def collect() -> list[Any]:
        figures = bus_figures(bus)
        endpoints = figures["endpoints"]
        labels = ("kind", "name")
        return [
            family(
                "wsbus_pyro_bus_endpoint_up",
                "1 while the bus can reach a registered service or gateway, else 0",
                (((kind, name), int(up)) for kind, name, up, _, _ in endpoints),
                labels,
            ),
            family(
                "wsbus_pyro_bus_queue_depth",
                "envelopes waiting on the bus to be forwarded to each endpoint",
                (((kind, name), queued) for kind, name, _, queued, _ in endpoints),
                labels,
            ),
            family(
                "wsbus_pyro_bus_forward_calls",
                "calls the bus made to forward batches to each endpoint (a gauge: an "
                "endpoint registering again starts from zero)",
                (((kind, name), calls) for kind, name, _, _, calls in endpoints),
                labels,
            ),
            family("wsbus_pyro_bus_aliases", "aliases held now", [((), figures["aliases"])], ()),
            family(
                "wsbus_pyro_bus_sessions",
                "closed sessions kept for resume now",
                [((), figures["sessions"])],
                (),
            ),
            family(
                "wsbus_pyro_bus_sessions_dropped",
                "session records dropped to stay within their bytes since start",
                [((), figures["sessions_dropped"])],
                (),
            ),
        ]

    return serve_metrics(address, collect, "message bus")


def _sweep(config: PyroConfig, bus: MessageBus, stop: _Stop) -> None:
    """Drop gateways that stopped checking in, twice per ``reregister_interval``."""
    while not stop.wait(config.reregister_interval / 2):
        try:
            bus._sweep()
        except Exception:  # never let the sweeper die: dead gateways would keep their aliases
            log.exception("sweeping the gateways failed")


def _keep_registered(config: PyroConfig, uri: str, stop: _Stop) -> None:
    """Re-register the bus when the name server restarted."""
    while not stop.wait(config.reregister_interval):
        try:
            with name_server(config) as ns:
                try:
                    current = str(ns.lookup(config.bus_name))
                except pyro_errors.NamingError:
                    current = None
                if current != uri:
                    ns.register(config.bus_name, uri)
                    log.info("message bus re-registered with the name server")
        except (pyro_errors.CommunicationError, OSError):
            continue
