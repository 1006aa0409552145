"""The message bus: a Pyro service that routes envelopes between gateways and services.

Services register with the message types they handle (as the original system did) and
gateways with their node id. The bus then follows the routing rules of :mod:`wsbus.bus`:

- ``publish`` (from gateways: client messages, control answers, delivery reports) goes to
  the services named by ``to`` or handling the type, and returns only once each service
  has taken it, so a gateway never acks a message no service holds. A registered service
  that cannot be reached makes its types ``unavailable`` (clients may retry); a type no
  service declared is ``no_route``.
- ``route`` (from services) goes to the gateway that owns each named connection, to every
  gateway for aliases, users, groups and everyone, or to services. It returns once each
  destination has taken each envelope, with a status per envelope, so that a service
  knows what it must send again when the bus crashed with envelopes in its queues.
- For a while after it starts (``3 * reregister_interval + comm_timeout``), the bus knows
  only the services and gateways that have re-registered since: what it cannot route
  then is ``reregistering`` rather than ``no_route``. A gateway answers its client
  ``unavailable`` (retry) for a type it saw served and ``no_route`` otherwise; a service
  sends the envelope again.

It also keeps the cluster's shared state:

- **The alias table** (alias -> connection id; the connection id names its gateway):
  :meth:`MessageBus.claim_alias` and :meth:`MessageBus.release_alias`, so that an alias is
  unique across every gateway. A gateway that unregisters, or has not checked in
  (:meth:`MessageBus.registered`) for ``3 * reregister_interval``, is dropped and its
  aliases are freed. A restarted bus starts with an empty table: each gateway claims its
  aliases again when it re-registers (:meth:`MessageBus.register_gateway`), and until
  every gateway in the name server has, a new claim is answered ``reregistering``.
- **The live gateways** (:meth:`MessageBus.gateways`): a service asks each of them for
  its clients.
- **One process per service name**: a second process registering a name whose process
  still answers is refused (the Pyro bus is the single-machine bus); one whose process
  is gone is replaced at once.

Each destination has one :class:`~wsbus_pyro.transport.Forwarder` thread that owns its
proxy and keeps the order in which the bus received envelopes.
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import msgspec
from Pyro5.server import expose

from wsbus.bus import SHARED_HEADER, is_for_gateway
from wsbus.envelope import Envelope, GatewayAddress, ServiceAddress, node_of

from .config import PyroConfig
from .transport import (
    NO_ROUTE,
    OK,
    REREGISTERING,
    TAKEN,
    UNAVAILABLE,
    Forwarder,
    decode_batch,
    make_proxy,
    name_server,
)

__all__ = ["MessageBus"]

log = logging.getLogger("wsbus.pyro.bus")


class _Endpoint:
    def __init__(self, name: str, uri: str, forwarder: Forwarder, types: frozenset[str]) -> None:
        self.name = name
        self.uri = uri
        self.forwarder = forwarder
        self.types = types
        self.seen = time.monotonic()
        """When it last registered or checked its registration (monotonic)."""


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
        self.instance = os.urandom(8).hex()
        """This bus process's id: a service learns from it that the bus restarted."""
        self._senders: dict[str, _SenderCalls] = {}
        # Until then, services and gateways of the deployment may still be re-registering.
        self._settled_at = time.monotonic() + 3 * config.reregister_interval + config.comm_timeout
        self.lifetime = 3 * config.reregister_interval
        """Seconds a gateway may go without checking in before the bus drops it."""
        self._aliases: dict[str, str] = {}
        # One registration decided at a time: deciding may probe the process registered
        # before under that name, which takes a while and must not hold the routing lock.
        self._register_lock = threading.Lock()
        self._aliases_back = False
        # Envelopes for gateways settled so far, and the count when each gateway was
        # dropped: a gateway that comes back after more were settled may have missed some.
        self._gateway_sends = 0
        self._dropped_at: dict[str, int] = {}
        self._closed = False

    def _settling(self) -> bool:
        return time.monotonic() < self._settled_at

    # -- registration --------------------------------------------------------------------

    def register_service(self, name: str, types: list[str], uri: str) -> str | None:
        """Add a service and the message types it handles, or refuse a second process.

        A service registered under ``name`` at another address is replaced only when its
        process no longer answers (it died; it is probed at once, so a restarted service
        takes over without a wait).

        Returns:
            None when ``name`` is registered at ``uri`` now; the address of the process
            that holds ``name`` when this one is refused.
        """
        name, uri = str(name), str(uri)
        self._check_open()
        with self._register_lock:
            with self._lock:
                old = self._services.get(name)
                if old is not None and old.uri == uri:
                    old.seen = time.monotonic()
                    return None
            if old is not None and self._answers(old):
                log.warning(
                    "a second process of service %r (at %s) was refused: %s still serves it",
                    name,
                    uri,
                    old.uri,
                )
                return old.uri
            with self._lock:
                forwarder = self._forwarder(f"service {name!r}", uri)
                self._services[name] = _Endpoint(name, uri, forwarder, frozenset(map(str, types)))
                self._reindex()
        if old is not None:
            old.forwarder.stop(0)
            log.info(
                "service %r at %s replaces its process at %s, which is gone", name, uri, old.uri
            )
        log.info("service %r registered at %s, handling %s", name, uri, sorted(types))
        return None

    def unregister_service(self, name: str, uri: str | None = None) -> None:
        """Remove a service (only if registered at ``uri``, when given).

        Its types get ``no_route`` afterwards.
        """
        with self._lock:
            old = self._services.get(str(name))
            if old is None or (uri is not None and old.uri != str(uri)):
                return
            del self._services[old.name]
            self._reindex()
        old.forwarder.stop(1.0)
        log.info("service %r left the bus", name)

    def _answers(self, endpoint: _Endpoint) -> bool:
        """True when the process registered as ``endpoint`` is still serving."""
        if time.monotonic() - endpoint.seen > self.lifetime:
            return False  # it stopped checking in: gone (or cut off, which is the same here)
        try:
            with make_proxy(endpoint.uri, self._config) as proxy:
                proxy._pyroBind()
        except Exception:
            # Refused at once when the process is gone; a timeout when it is stuck.
            return False
        return True

    def register_gateway(
        self,
        node: str,
        uri: str,
        aliases: list[list[str]] | None = None,
        again: bool = False,
        fresh: bool = False,
    ) -> dict[str, Any]:
        """Add (or replace) a gateway node, with the aliases its connections hold.

        A new gateway process (``fresh``, or at a new address) first loses every alias the
        bus had for its node: its connections are new, though their ids may be the same.

        Args:
            node: the gateway's node id.
            uri: its Pyro address.
            aliases: ``[alias, conn_id]`` pairs it holds (when it registers again).
            again: the gateway was registered before (with this bus, which dropped it,
                or with one before a restart).
            fresh: the gateway process is starting.

        Returns:
            ``{"refused": pairs, "missed": bool}``: the pairs refused because another
            gateway's connection holds the alias (the gateway clears them on its side);
            whether, registering ``again``, it may have missed envelopes meant for its
            clients (the bus settled some for gateways while it was not registered). With
            ``"taken_by": address`` when another gateway process that still answers has
            this node id: nothing was registered.
        """
        node, uri = str(node), str(uri)
        self._check_open()
        with self._register_lock:
            with self._lock:
                current = self._gateways.get(node)
            if current is not None and current.uri != uri and self._answers(current):
                # Two gateways with one node id would number their connections alike: the
                # same connection ids, and so the same claims, on two gateways.
                log.warning(
                    "a second gateway with node id %s (at %s) was refused: %s still serves it",
                    node,
                    uri,
                    current.uri,
                )
                return {"refused": [], "missed": False, "taken_by": current.uri}
            return self._add_gateway(node, uri, aliases or [], bool(again), bool(fresh))

    def _add_gateway(
        self, node: str, uri: str, aliases: list[list[str]], again: bool, fresh: bool
    ) -> dict[str, Any]:
        old: _Endpoint | None = None
        refused: list[list[str]] = []
        with self._lock:
            dropped_at = self._dropped_at.pop(node, 0)
            missed = again and self._gateway_sends > dropped_at
            current = self._gateways.get(node)
            new = current is None or current.uri != uri
            if current is not None and not new:
                current.seen = time.monotonic()
            else:
                old = current
                forwarder = self._forwarder(f"gateway {node}", uri)
                self._gateways[node] = _Endpoint(node, uri, forwarder, frozenset())
            if new or fresh:
                # A process restarted on a fixed port has the same address: fresh says so.
                self._free_aliases(node)
            for alias, conn_id in aliases:
                alias, conn_id = str(alias), str(conn_id)
                holder = self._aliases.get(alias)
                if node_of(conn_id) != node or (
                    holder not in (None, conn_id) and node_of(str(holder)) in self._gateways
                ):
                    refused.append([alias, conn_id])
                else:
                    self._aliases[alias] = conn_id
        if old is not None:
            old.forwarder.stop(0)
        if new:
            log.info("gateway %s registered at %s with %d alias(es)", node, uri, len(aliases))
        if refused:
            log.warning(
                "gateway %s re-registered holding %d alias(es) other gateways' connections "
                "hold now (%s): it clears them",
                node,
                len(refused),
                ", ".join(alias for alias, _ in refused[:10]),
            )
        return {"refused": refused, "missed": missed}

    def unregister_gateway(self, node: str, uri: str | None = None) -> None:
        """Remove a gateway node (only if registered at ``uri``, when given); free its aliases."""
        with self._lock:
            old = self._gateways.get(str(node))
            if old is None or (uri is not None and old.uri != str(uri)):
                return
            del self._gateways[old.name]
            freed = self._free_aliases(old.name)
            self._forget(old.name)
        old.forwarder.stop(1.0)
        log.info("gateway %s left the bus (%d alias(es) freed)", node, freed)

    def gateways(self) -> list[str]:
        """Return the node ids of the gateways on the bus now (each checked in lately)."""
        now = time.monotonic()
        with self._lock:
            return sorted(n for n, e in self._gateways.items() if now - e.seen <= self.lifetime)

    # -- the alias table -------------------------------------------------------------------

    def claim_alias(self, alias: str, conn_id: str) -> str:
        """Claim ``alias`` for ``conn_id`` (of a registered gateway) across every gateway.

        Returns:
            ``ok``: ``conn_id`` holds it now (or did already); ``taken``: another
            connection does; ``unavailable``: ``conn_id``'s gateway is not registered (it is
            re-registering); ``reregistering``: the bus restarted a moment ago and a gateway
            may not have claimed its aliases again yet.
        """
        alias, conn_id = str(alias), str(conn_id)
        node = node_of(conn_id)
        with self._lock:
            if self._closed or node not in self._gateways:
                return UNAVAILABLE
            holder = self._aliases.get(alias)
            if holder == conn_id:
                return OK
            if holder is not None and node_of(holder) in self._gateways:
                return TAKEN
            settled = self._aliases_back or not self._settling()
        if not settled and not self._every_gateway_back():
            return REREGISTERING
        with self._lock:
            holder = self._aliases.get(alias)
            if holder is not None and holder != conn_id and node_of(holder) in self._gateways:
                return TAKEN
            if node not in self._gateways:
                return UNAVAILABLE
            self._aliases[alias] = conn_id
        return OK

    def release_alias(self, alias: str, conn_id: str) -> None:
        """Free ``alias`` if ``conn_id`` holds it; nothing otherwise."""
        with self._lock:
            if self._aliases.get(str(alias)) == str(conn_id):
                del self._aliases[str(alias)]

    def _free_aliases(self, node: str) -> int:
        """Drop every alias held by a connection of ``node`` (with the lock held)."""
        gone = [a for a, c in self._aliases.items() if node_of(c) == node]
        for alias in gone:
            del self._aliases[alias]
        return len(gone)

    def _forget(self, node: str) -> None:
        """Note when a gateway left (with the lock held), to tell it what it missed."""
        if len(self._dropped_at) >= 10_000:
            self._dropped_at.clear()  # a bound on memory: those gateways are long gone
        self._dropped_at[node] = self._gateway_sends

    def _every_gateway_back(self) -> bool:
        """True when every gateway in the name server has registered with this bus.

        Right after a restart, a claim must wait for them: a gateway that has not
        re-registered yet may hold the alias. A gateway that died without leaving the
        name server holds claims up until the bus has settled.
        """
        prefix = self._config.gateway_prefix
        try:
            with name_server(self._config) as ns:
                names = ns.list(prefix=prefix)
        except Exception as exc:
            log.info("the name server did not list the gateways: %s", exc)
            return False
        with self._lock:
            back = all(name[len(prefix) :] in self._gateways for name in names)
            if back:
                self._aliases_back = True
        return back

    def _sweep(self) -> None:
        """Drop the gateways that stopped checking in; free their aliases.

        Underscored so that Pyro peers cannot call it: the bus's own thread does.
        """
        now = time.monotonic()
        with self._lock:
            stale = [e for e in self._gateways.values() if now - e.seen > self.lifetime]
            freed = {}
            for endpoint in stale:
                del self._gateways[endpoint.name]
                freed[endpoint.name] = self._free_aliases(endpoint.name)
                self._forget(endpoint.name)
        for endpoint in stale:
            endpoint.forwarder.stop(0)
            log.warning(
                "gateway %s has not checked in for %g s: dropped from the bus, %d alias(es) freed",
                endpoint.name,
                self.lifetime,
                freed[endpoint.name],
            )

    def registered(self, kind: str, name: str, uri: str) -> bool:
        """Return True when ``name`` is registered at ``uri``.

        Services and gateways ask every ``reregister_interval``: that is how the bus knows
        they are alive (a gateway that stops asking is dropped, see :meth:`_sweep`).
        """
        self._check_open()
        table = self._services if kind == "service" else self._gateways
        with self._lock:
            endpoint = table.get(str(name))
            if endpoint is None or endpoint.uri != uri:
                return False
            endpoint.seen = time.monotonic()
        return True

    def info(self) -> dict[str, Any]:
        """Return the services (with their types and state) and gateways on the bus."""
        with self._lock:
            return {
                "services": {
                    n: {"types": sorted(e.types), "down": e.forwarder.down}
                    for n, e in self._services.items()
                },
                "gateways": {n: {"down": e.forwarder.down} for n, e in self._gateways.items()},
                "aliases": len(self._aliases),
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
        it; ``reregistering``: no service handles it yet, a moment after the bus started;
        ``unavailable``: a service it was for cannot take it now.
        """
        envelopes = decode_batch(blob)
        statuses: list[str] = [OK] * len(envelopes)
        waiting: list[tuple[int, concurrent.futures.Future[str]]] = []
        for index, envelope in enumerate(envelopes):
            targets = self._service_targets(envelope)
            if targets is None:
                statuses[index] = REREGISTERING if self._settling() else NO_ROUTE
                continue
            # A forwarder whose endpoint is down answers at once, and tries it again
            # after a short while: a service that comes back is used again by itself.
            for target in targets:
                future: concurrent.futures.Future[str] = concurrent.futures.Future()
                target.forwarder.put(envelope, _resolver(future))
                waiting.append((index, future))
        self._wait(waiting, statuses)
        return statuses

    def _wait(
        self, waiting: list[tuple[int, concurrent.futures.Future[str]]], statuses: list[str]
    ) -> None:
        """Fill in each envelope's status from its destinations' answers."""
        deadline = time.monotonic() + self._config.call_timeout
        for index, future in waiting:
            try:
                status = future.result(max(0.0, deadline - time.monotonic()))
            except concurrent.futures.TimeoutError:
                status = UNAVAILABLE
            if status != OK and statuses[index] == OK:
                statuses[index] = UNAVAILABLE if status != NO_ROUTE else NO_ROUTE

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

    def route(self, blob: Any, sender: str | None = None, call: int | None = None) -> Any:
        """Route envelopes from a service, in order; report each one's fate.

        The statuses: ``ok``: every destination has taken it. ``no_route``: no gateway owns
        the named connections, or no service handles the type. ``unavailable``: a
        destination could not take it now, or no gateway is on the bus. The sending
        service reports these to itself as ``wsbus.undeliverable``. ``reregistering``:
        the bus started a moment ago and the destination may be re-registering: the
        sending service sends it again.

        Without ``sender``, returns the statuses once every destination has answered.
        With ``sender`` (the calling forwarder's id) and ``call`` (its number for this
        batch), returns at once, so that the forwarder can send its next batch: the
        statuses come back later, by call number, from this and :meth:`confirm`.

        Returns:
            The statuses; or, with ``sender``, ``[bus id, [[call, count, failed], ...]]``
            for the calls of that sender settled since it last asked, where ``failed``
            lists ``[index, status]`` for each envelope whose status is not ``ok``.
        """
        envelopes = decode_batch(blob)
        statuses: list[str] = [OK] * len(envelopes)
        targets_of: list[tuple[int, Forwarder, Envelope]] = []
        settling = self._settling()
        for index, envelope in enumerate(envelopes):
            if is_for_gateway(envelope) or isinstance(envelope.to, GatewayAddress):
                targets, status = self._gateway_targets(envelope)
            else:
                services = self._service_targets(envelope)
                targets = [] if services is None else [(s.forwarder, envelope) for s in services]
                status = NO_ROUTE
            if not targets:
                statuses[index] = REREGISTERING if settling else status
                continue
            targets_of.extend((index, forwarder, item) for forwarder, item in targets)
        if sender is None:
            waiting: list[tuple[int, concurrent.futures.Future[str]]] = []
            for index, forwarder, item in targets_of:
                future: concurrent.futures.Future[str] = concurrent.futures.Future()
                forwarder.put(item, _resolver(future))
                waiting.append((index, future))
            self._wait(waiting, statuses)
            return statuses
        state = self._sender(str(sender))
        pending = _PendingCall(int(call or 0), statuses, len(targets_of))
        if not targets_of:
            state.settle(pending)
        for index, forwarder, item in targets_of:
            forwarder.put(item, functools.partial(state.answer, pending, index))
        return [self.instance, state.take()]

    def confirm(self, sender: str, timeout: float) -> list[Any]:
        """Return ``[bus id, settled calls]`` for a sender, waiting up to ``timeout`` for one.

        See :meth:`route`. The wait is capped at one second.
        """
        state = self._sender(str(sender))
        return [self.instance, state.take(min(max(float(timeout), 0.0), 1.0))]

    def _sender(self, sender: str) -> _SenderCalls:
        with self._lock:
            state = self._senders.get(sender)
            if state is None:
                now = time.monotonic()
                if len(self._senders) >= 64:
                    # Forget senders gone quiet (services that stopped or restarted).
                    for key, old in list(self._senders.items()):
                        if old.idle_since(now) > 60.0:
                            del self._senders[key]
                state = self._senders[sender] = _SenderCalls()
            return state

    def _gateway_targets(self, envelope: Envelope) -> tuple[list[tuple[Forwarder, Envelope]], str]:
        """Return the gateways' forwarders it goes to, and the status when there are none."""
        with self._lock:
            gateways = dict(self._gateways)
            if gateways or not self._settling():
                # Settled for the gateways there are (a service does not send it again): a
                # gateway not among them that registers later may have missed it.
                self._gateway_sends += 1
        if not gateways:
            return [], UNAVAILABLE
        nodes = _gateway_nodes(envelope, gateways)
        if not nodes:
            return [], NO_ROUTE
        if len(gateways) > 1 and envelope.recipients is not None:
            headers = {**envelope.headers, SHARED_HEADER: "1"}
            envelope = msgspec.structs.replace(envelope, headers=headers)
        return [(gateways[node].forwarder, envelope) for node in nodes], OK

    def _check_open(self) -> None:
        """Refuse registrations once the bus is stopping.

        Pyro's workers may still serve a connection after the daemon closed: a gateway or
        service must not register again with a bus on its way out.

        Raises:
            ConnectionRefusedError: the bus is stopping (the caller sees it unreachable).
        """
        if self._closed:
            raise ConnectionRefusedError("the message bus is stopping")

    def _shutdown(self) -> None:
        """Refuse registrations; stop every forwarder. Underscored: Pyro peers cannot call it."""
        with self._lock:
            self._closed = True
            endpoints = [*self._services.values(), *self._gateways.values()]
            self._services.clear()
            self._gateways.clear()
            self._aliases.clear()
            self._by_type = {}
        for endpoint in endpoints:
            endpoint.forwarder.stop(1.0)


class _PendingCall:
    """One pipelined ``route`` call: its statuses, filled in as its destinations answer."""

    __slots__ = ("answered", "call", "expected", "statuses")

    def __init__(self, call: int, statuses: list[str], expected: int) -> None:
        self.call = call
        self.statuses = statuses
        self.expected = expected
        # next() on a count is atomic: no lock per answer on the forwarders' threads.
        self.answered = itertools.count(1)


class _SenderCalls:
    """The pipelined calls of one service forwarder: settled ones wait to be collected."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._settled: list[list[Any]] = []
        self._touched = time.monotonic()

    def answer(self, pending: _PendingCall, index: int, status: str) -> None:
        """One destination's answer for one envelope (on that destination's forwarder)."""
        if status != OK and pending.statuses[index] == OK:
            pending.statuses[index] = NO_ROUTE if status == NO_ROUTE else UNAVAILABLE
        if next(pending.answered) == pending.expected:
            self.settle(pending)

    def settle(self, pending: _PendingCall) -> None:
        """Every destination has answered for every envelope of the call."""
        # Only the exceptions travel: serpent is slow on long lists of "ok".
        failed = [[i, status] for i, status in enumerate(pending.statuses) if status != OK]
        with self._cond:
            self._settled.append([pending.call, len(pending.statuses), failed])
            self._cond.notify_all()

    def take(self, timeout: float = 0.0) -> list[list[Any]]:
        """Return the calls settled since the last take, waiting up to ``timeout`` for one."""
        with self._cond:
            self._touched = time.monotonic()
            if not self._settled and timeout > 0:
                self._cond.wait_for(lambda: bool(self._settled), timeout)
            settled, self._settled = self._settled, []
            return settled

    def idle_since(self, now: float) -> float:
        """Seconds since the sender last asked."""
        return now - self._touched


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
