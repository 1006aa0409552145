"""The message bus: a Pyro service that routes envelopes between gateways and services.

Services register with the message types they handle (as the original system did) and
gateways with their node id. The bus then follows the routing rules of :mod:`wsbus.bus`:

- ``publish`` (from gateways: client messages, control answers, delivery reports) goes to
  the services named by ``to`` or handling the type, and returns only once each service
  has taken it, so a gateway never acks a message no service holds. A registered service
  that cannot be reached makes its types ``unavailable`` (clients may retry); a type no
  service declared is ``no_route``.
- ``route`` (from services) goes to the gateway that owns each named connection, to every
  gateway for aliases, users, groups and everyone, or to services; it returns at once.

Each destination has one :class:`~wsbus_pyro.transport.Forwarder` thread that owns its
proxy and keeps the order in which the bus received envelopes.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import msgspec
from Pyro5.server import expose

from wsbus import control
from wsbus.bus import SHARED_HEADER, is_for_gateway
from wsbus.envelope import Envelope, GatewayAddress, NodeId, Recipients, ServiceAddress, node_of

from .config import PyroConfig
from .transport import NO_ROUTE, OK, UNAVAILABLE, Forwarder, decode_batch, make_proxy

__all__ = ["MessageBus"]

log = logging.getLogger("wsbus.pyro.bus")


class _Endpoint:
    def __init__(self, name: str, uri: str, forwarder: Forwarder, types: frozenset[str]) -> None:
        self.name = name
        self.uri = uri
        self.forwarder = forwarder
        self.types = types


@expose
class MessageBus:
    """The Pyro object behind ``wsbus bus``. Thread-safe: Pyro calls it from many threads.

    Args:
        config: the Pyro settings (timeouts, batches, secret).
    """

    def __init__(self, config: PyroConfig) -> None:
        self._config = config
        self._lock = threading.Lock()
        self._services: dict[str, _Endpoint] = {}
        self._by_type: dict[str, list[str]] = {}
        self._gateways: dict[str, _Endpoint] = {}
        self.started = time.time()

    # -- registration --------------------------------------------------------------------

    def register_service(self, name: str, types: list[str], uri: str) -> None:
        """Add (or replace) a service and the message types it handles."""
        name = str(name)
        with self._lock:
            old = self._services.get(name)
            if old is not None and old.uri == uri:
                return
            forwarder = self._forwarder(f"service {name!r}", str(uri))
            self._services[name] = _Endpoint(name, str(uri), forwarder, frozenset(map(str, types)))
            self._reindex()
        if old is not None:
            old.forwarder.stop(0)
        log.info("service %r registered at %s, handling %s", name, uri, sorted(types))

    def unregister_service(self, name: str) -> None:
        """Remove a service; its types get ``no_route`` afterwards."""
        with self._lock:
            old = self._services.pop(str(name), None)
            self._reindex()
        if old is not None:
            old.forwarder.stop(1.0)
            log.info("service %r left the bus", name)

    def register_gateway(self, node: str, uri: str) -> None:
        """Add (or replace) a gateway node."""
        node = str(node)
        with self._lock:
            old = self._gateways.get(node)
            if old is not None and old.uri == uri:
                return
            forwarder = self._forwarder(f"gateway {node}", str(uri))
            self._gateways[node] = _Endpoint(node, str(uri), forwarder, frozenset())
        if old is not None:
            old.forwarder.stop(0)
        log.info("gateway %s registered at %s", node, uri)

    def unregister_gateway(self, node: str) -> None:
        """Remove a gateway node."""
        with self._lock:
            old = self._gateways.pop(str(node), None)
        if old is not None:
            old.forwarder.stop(1.0)
            log.info("gateway %s left the bus", node)

    def registered(self, kind: str, name: str, uri: str) -> bool:
        """Return True when ``name`` is registered at ``uri`` (for re-registration checks)."""
        table = self._services if kind == "service" else self._gateways
        with self._lock:
            endpoint = table.get(str(name))
        return endpoint is not None and endpoint.uri == uri

    def info(self) -> dict[str, Any]:
        """Return the services (with their types and state) and gateways on the bus."""
        with self._lock:
            return {
                "services": {
                    n: {"types": sorted(e.types), "down": e.forwarder.down}
                    for n, e in self._services.items()
                },
                "gateways": {n: {"down": e.forwarder.down} for n, e in self._gateways.items()},
            }

    def _forwarder(self, name: str, uri: str) -> Forwarder:
        config = self._config
        forwarder = Forwarder(name, lambda: make_proxy(uri, config), "deliver", config)
        forwarder.start()
        return forwarder

    def _reindex(self) -> None:
        by_type: dict[str, list[str]] = {}
        for name, endpoint in self._services.items():
            for type_ in endpoint.types:
                by_type.setdefault(type_, []).append(name)
        self._by_type = by_type

    # -- from gateways -------------------------------------------------------------------

    def publish(self, blob: Any) -> list[str]:
        """Route envelopes from a gateway to services; return a status for each.

        ``ok``: every service it was for has taken it; ``no_route``: no service handles
        it; ``unavailable``: a service it was for cannot take it now.
        """
        envelopes = decode_batch(blob)
        statuses: list[str] = [OK] * len(envelopes)
        waiting: list[tuple[int, concurrent.futures.Future[str]]] = []
        for index, envelope in enumerate(envelopes):
            targets = self._service_targets(envelope)
            if targets is None:
                statuses[index] = NO_ROUTE
                continue
            # A forwarder whose endpoint is down answers at once, and tries it again
            # after a short while: a service that comes back is used again by itself.
            for target in targets:
                future: concurrent.futures.Future[str] = concurrent.futures.Future()
                target.forwarder.put(envelope, _resolver(future))
                waiting.append((index, future))
        deadline = time.monotonic() + self._config.call_timeout
        for index, future in waiting:
            try:
                status = future.result(max(0.0, deadline - time.monotonic()))
            except concurrent.futures.TimeoutError:
                status = UNAVAILABLE
            if status != OK and statuses[index] == OK:
                statuses[index] = UNAVAILABLE if status != NO_ROUTE else NO_ROUTE
        return statuses

    def _service_targets(self, envelope: Envelope) -> list[_Endpoint] | None:
        with self._lock:
            to = envelope.to
            if isinstance(to, ServiceAddress):
                endpoint = self._services.get(to.name)
                return None if endpoint is None else [endpoint]
            names = self._by_type.get(envelope.type)
            if not names:
                return None
            return [self._services[n] for n in names]

    # -- from services -------------------------------------------------------------------

    def route(self, blob: Any) -> None:
        """Route envelopes from a service, in order; return at once.

        What cannot be routed is reported back to the sending service as
        ``wsbus.undeliverable`` (``reason`` ``no_route`` or ``unavailable``).
        """
        for envelope in decode_batch(blob):
            if is_for_gateway(envelope) or isinstance(envelope.to, GatewayAddress):
                self._to_gateways(envelope)
                continue
            targets = self._service_targets(envelope)
            if targets is None:
                self._bounce(envelope, NO_ROUTE, "no service handles this type")
                continue
            for target in targets:
                target.forwarder.put(envelope, self._bounce_on_failure(envelope))

    def _to_gateways(self, envelope: Envelope) -> None:
        with self._lock:
            gateways = dict(self._gateways)
        if not gateways:
            self._bounce(envelope, UNAVAILABLE, "no gateway is on the bus")
            return
        nodes = _gateway_nodes(envelope, gateways)
        if not nodes:
            self._bounce(envelope, NO_ROUTE, "no gateway owns these connections")
            return
        if len(gateways) > 1 and envelope.recipients is not None:
            headers = {**envelope.headers, SHARED_HEADER: "1"}
            envelope = msgspec.structs.replace(envelope, headers=headers)
        for node in nodes:
            gateways[node].forwarder.put(envelope, self._bounce_on_failure(envelope))

    def _bounce_on_failure(self, envelope: Envelope) -> Callable[[str], None]:
        def check(status: str) -> None:
            if status != OK:
                self._bounce(envelope, status, "the destination could not be reached")

        return check

    def _bounce(self, envelope: Envelope, reason: str, detail: str) -> None:
        sender = envelope.sender
        if not isinstance(sender, ServiceAddress) or envelope.type.startswith("wsbus."):
            log.warning(
                "%s (%s) from %s could not be routed: %s",
                envelope.type,
                envelope.id,
                sender,
                detail,
            )
            return
        with self._lock:
            endpoint = self._services.get(sender.name)
        if endpoint is None:
            return
        report = Envelope(
            id=envelope.id,
            type=control.UNDELIVERABLE,
            sender=GatewayAddress(NodeId("bus")),
            content=msgspec.to_builtins(
                control.Undeliverable(
                    reason,
                    envelope.recipients if envelope.recipients is not None else _NOBODY,
                    detail,
                )
            ),
            reply_to=envelope.id,
            created=time.time(),
            to=sender,
        )
        endpoint.forwarder.put(report)

    def _shutdown(self) -> None:
        """Stop every forwarder. Underscored so that Pyro peers cannot call it."""
        with self._lock:
            endpoints = [*self._services.values(), *self._gateways.values()]
            self._services.clear()
            self._gateways.clear()
            self._by_type = {}
        for endpoint in endpoints:
            endpoint.forwarder.stop(1.0)


def _resolver(future: concurrent.futures.Future[str]) -> Callable[[str], None]:
    def resolve(status: str) -> None:
        if not future.done():
            future.set_result(status)

    return resolve


def _gateway_nodes(envelope: Envelope, gateways: dict[str, _Endpoint]) -> list[str]:
    to = envelope.to
    if isinstance(to, GatewayAddress):
        return [to.node] if to.node in gateways else []
    recipients = envelope.recipients
    if recipients is None:
        # A control request with no node: the first gateway answers it.
        return [next(iter(gateways))]
    if recipients.everyone or recipients.aliases or recipients.users or recipients.groups:
        return list(gateways)
    owners = {node_of(c) for c in recipients.conn_ids}
    return [n for n in gateways if n in owners]


_NOBODY = Recipients()
