"""The message bus: a Pyro service that routes envelopes between gateways and services.

Services register with the message types they handle (as the original system did) and
gateways with their node id. The bus then follows the routing rules of :mod:`wsbus.bus`:

- ``publish`` (from gateways: client messages, control answers, delivery reports) goes to
  the services named by ``to`` or handling the type, and returns only once each service
  has taken it, so a gateway never acks a message no service holds. A registered service
  that cannot be reached makes its types ``unavailable`` (clients may retry); a type no
  service declared is ``no_route``.
- ``route`` (from services) goes to the gateway that owns each named connection, to every
  gateway for aliases, users, groups and everyone, or to services. (A service delivers
  what is for connections of one gateway straight to that gateway, the one-hop path of
  :class:`~wsbus_pyro.transport.DirectForwarder`, with the bus's :meth:`MessageBus.directory`
  of gateways; the rest comes here.) It returns once each
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
  its clients; and their addresses (:meth:`MessageBus.directory`), to which services
  deliver directly.
- **One process per service name**: a second process registering a name whose process
  still answers is refused (the Pyro bus is the single-machine bus); one whose process
  is gone is replaced at once.
- **Group history** (a :class:`~wsbus.history.MemoryHistory`, settings from the gateways'
  registrations): the bus is the sequencer. It stamps each history group's envelopes with
  their position as it queues them for the gateways, under one lock, so every gateway
  gets them in offset order; gateways read what a client missed with :meth:`history`.
- **Closed sessions** (a :class:`~wsbus.resume.MemorySessions`): :meth:`save_session` and
  :meth:`take_session`, so a client may resume on any gateway.
- **Presence** (routing rule 5): a gateway's ``wsbus.presence`` event goes to the services
  that declared it and to every other gateway. When a gateway dies (or leaves, or a new
  process takes its node id), the others hear ``gateway_lost`` in their streams and the
  services get the ``gateway_lost`` event from the bus.

History and sessions live in this process's memory: a restarted bus has none, and a new
history epoch (gateways tell their clients to resync those groups).

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
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final

import msgspec
from Pyro5.server import expose

from wsbus import control
from wsbus.bus import SHARED_HEADER, is_for_gateway, is_presence_event
from wsbus.envelope import Envelope, EnvelopeId, GatewayAddress, NodeId, ServiceAddress, node_of
from wsbus.history import (
    HistoryConfig,
    MemoryHistory,
    Position,
    history_group,
)
from wsbus.resume import MemorySessions, SessionRecord

from .config import PyroConfig
from .transport import (
    BUS_ADDRESS,
    NO_ROUTE,
    OK,
    REREGISTERING,
    TAKEN,
    UNAVAILABLE,
    Forwarder,
    _array_header,
    content_digest,
    decode_batch,
    from_service,
    gateway_lost_notice,
    make_proxy,
    name_server,
    to_bytes,
)

__all__ = ["MessageBus"]

log = logging.getLogger("wsbus.pyro.bus")

_HISTORY_CONFIG: Final = msgspec.msgpack.Decoder(HistoryConfig)
_SESSION_RECORD: Final = msgspec.msgpack.Decoder(SessionRecord)
_ENCODER: Final = msgspec.msgpack.Encoder()
_HISTORY_LIMIT: Final = 10_000
"""The most history entries one ``history`` call reads."""
_NAME_LIMIT: Final = 1024
"""The longest group name, epoch or session id the bus looks up (a bound on input)."""
_TTL_LIMIT: Final = 86_400.0
"""The longest a session record is kept, whatever the gateway asks (seconds)."""
_REFUSED: Final = "refused"
_SESSION_BYTES: Final = 256 << 20
"""The most bytes of closed sessions' records the bus keeps; past it the oldest go."""


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
        # The one order every gateway sees: positions are stamped, and envelopes put in the
        # gateways' forwarders, under this lock. Taken before _lock, never while holding it.
        self._order = threading.Lock()
        self._history_config: HistoryConfig | None = None
        self._history: MemoryHistory | None = None
        self._history_warned = False
        # Envelopes stamped lately, by id: a service sends again what a failed call may have
        # delivered, and the copy must keep its position (a second one would be a hole).
        self._stamped = _Recent()
        self._sessions = MemorySessions()
        self._sessions_lock = threading.Lock()
        # Each record's size, in the order the store keeps them (oldest saved first): the
        # store bounds their count, this their bytes.
        self._session_sizes: OrderedDict[str, int] = OrderedDict()
        self._session_bytes = 0
        self.sessions_dropped = 0
        """Records dropped before their time to keep within the count or bytes bound."""
        self._dropped_logged = 0.0
        self._notices = itertools.count(1)

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
        history: Any = None,
    ) -> dict[str, Any]:
        """Add (or replace) a gateway node, with the aliases its connections hold.

        A new gateway process (``fresh``, or at a new address) first loses every alias the
        bus had for its node: its connections are new, though their ids may be the same.
        The gateways still on the bus then hear that the node's old process is gone
        (:meth:`wsbus.bus.HearsGateways.gateway_lost`), as do the services that declared
        ``wsbus.presence``.

        Args:
            node: the gateway's node id.
            uri: its Pyro address.
            aliases: ``[alias, conn_id]`` pairs it holds (when it registers again).
            again: the gateway was registered before (with this bus, which dropped it,
                or with one before a restart).
            fresh: the gateway process is starting.
            history: the gateway's :class:`~wsbus.history.HistoryConfig`, MessagePack
                encoded (None: it says nothing). The bus keeps history as the last gateway
                to register says; a change starts history again under a new epoch.

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
            if history is not None:
                self._keep_history(node, history)
            return self._add_gateway(node, uri, aliases or [], bool(again), bool(fresh))

    def _keep_history(self, node: str, blob: Any) -> None:
        """Keep history as gateway ``node`` says (the last gateway to register wins)."""
        try:
            config = _HISTORY_CONFIG.decode(to_bytes(blob))
        except (msgspec.MsgspecError, TypeError, ValueError) as exc:
            log.warning(
                "gateway %s sent history settings the bus cannot read (%s): ignored", node, exc
            )
            return
        with self._order:
            if config == self._history_config:
                return
            previous, self._history_config = self._history_config, config
            self._history = MemoryHistory(config) if config.groups else None
            self._stamped = _Recent()
            warn = previous is not None and not self._history_warned
            if warn:
                self._history_warned = True
            epoch = self._history.epoch if self._history is not None else None
        if warn:
            log.warning(
                "gateway %s keeps history as %s, where another gateway said %s: the bus keeps "
                "it as the gateway that registered last says, and starts it again (clients "
                "resync those groups). Give every gateway the same [gateway.history] settings",
                node,
                _describe(config),
                _describe(previous),
            )
        elif epoch is not None:
            log.info("the bus keeps history (epoch %s): %s", epoch, _describe(config))

    def _add_gateway(
        self, node: str, uri: str, aliases: list[list[str]], again: bool, fresh: bool
    ) -> dict[str, Any]:
        old: _Endpoint | None = None
        lost = False
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
                # The node's old process died and this one took its place before the sweep
                # found it: its connections are gone all the same.
                lost = current is not None
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
        if lost:
            self._tell_lost([node])
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
        # Its connections are closed: whatever presence the others kept of them is gone.
        self._tell_lost([old.name])
        log.info("gateway %s left the bus (%d alias(es) freed)", node, freed)

    def gateways(self) -> list[str]:
        """Return the node ids of the gateways on the bus now (each checked in lately)."""
        now = time.monotonic()
        with self._lock:
            return sorted(n for n, e in self._gateways.items() if now - e.seen <= self.lifetime)

    def probe(self, blob: Any) -> str:
        """Send a gateway's probe back to it, through its forwarder; return a status.

        The probe (a ``wsbus.probe`` envelope addressed to the gateway that sent it) takes
        the path of that gateway's deliveries: its queue here, its forwarder thread and
        the call to its endpoint. ``ok``: queued; ``no_route``: no such gateway is
        registered (it should register again).
        """
        envelopes = decode_batch(blob)
        if len(envelopes) != 1:
            return NO_ROUTE
        envelope = envelopes[0]
        to = envelope.to
        if (
            envelope.type != control.PROBE
            or not isinstance(to, GatewayAddress)
            or envelope.sender != to
        ):
            return NO_ROUTE
        with self._lock:
            endpoint = self._gateways.get(to.node)
        if endpoint is None:
            return NO_ROUTE
        # A fresh envelope: nothing of the caller's but the id (no headers, no content)
        # reaches the gateway this way.
        probe = Envelope(id=envelope.id, type=control.PROBE, sender=to, to=to)
        endpoint.forwarder.put(probe)
        return OK

    def directory(self) -> list[list[str]]:
        """Return ``[node, address]`` of each gateway on the bus now (each checked in lately).

        A service delivers a message for connections of one of these gateways straight to
        it (:func:`~wsbus_pyro.transport.direct_node`); the rest it routes through the bus.
        """
        now = time.monotonic()
        with self._lock:
            live = sorted(self._gateways.items())
            return [[n, e.uri] for n, e in live if now - e.seen <= self.lifetime]

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
        if stale:
            self._tell_lost([endpoint.name for endpoint in stale])

    def _tell_lost(self, nodes: list[str]) -> None:
        """Tell the gateways and the ``wsbus.presence`` services that ``nodes`` are gone.

        Their connections went with them.

        Each gateway hears it in its own stream, in order with its other traffic (a
        :data:`~wsbus_pyro.transport.GATEWAY_LOST` notice its endpoint turns into a
        ``gateway_lost(node, report=False)`` call); each service gets the ``gateway_lost``
        :class:`~wsbus.control.PresenceEvent` from the bus itself.
        """
        for node in nodes:
            with self._order:
                with self._lock:
                    gateways = [e for n, e in self._gateways.items() if n != node]
                    services = self._presence_services()
                for gateway in gateways:
                    notice = gateway_lost_notice(node, f"{self.instance}-{next(self._notices)}")
                    gateway.forwarder.put(notice)
                event = Envelope(
                    id=EnvelopeId(f"bus-{self.instance}-{next(self._notices)}"),
                    type=control.PRESENCE,
                    sender=BUS_ADDRESS,
                    content=msgspec.to_builtins(
                        control.PresenceEvent(event="gateway_lost", node=NodeId(node))
                    ),
                    created=time.time(),
                )
                for service in services:
                    service.forwarder.put(event, functools.partial(_event_lost, service.name, node))

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
        """Return the services (with their types and state) and gateways on the bus.

        Also the history epoch (None: no history kept), how many closed sessions are kept,
        and the seconds a gateway may go without checking in (``lifetime``).
        """
        with self._lock:
            return {
                "services": {
                    n: {"types": sorted(e.types), "down": e.forwarder.down}
                    for n, e in self._services.items()
                },
                "gateways": {n: {"down": e.forwarder.down} for n, e in self._gateways.items()},
                "aliases": len(self._aliases),
                "history": None if self._history is None else self._history.epoch,
                "sessions": len(self._sessions),
                "lifetime": self.lifetime,
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
            targets: list[_Endpoint] | None
            if is_presence_event(envelope):
                # Routing rule 5: every service that declared it, and every other gateway;
                # nobody listening is fine. The gateways' copies are not waited for.
                targets = self._spread_presence(envelope)
            else:
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

    def _spread_presence(self, envelope: Envelope) -> list[_Endpoint]:
        """Put a gateway's presence event to the other gateways; return its services."""
        sender = envelope.sender
        origin = sender.node if isinstance(sender, GatewayAddress) else None
        with self._order:
            with self._lock:
                gateways = [e for n, e in self._gateways.items() if n != origin]
                services = self._presence_services()
            for gateway in gateways:
                gateway.forwarder.put(envelope)
        return services

    def _presence_services(self) -> list[_Endpoint]:
        """The services that declared ``wsbus.presence`` (with the lock held)."""
        return [self._services[name] for name in self._by_type.get(control.PRESENCE, ())]

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
        state = None if sender is None else self._sender(str(sender))
        waiting: list[tuple[int, concurrent.futures.Future[str]]] = []
        # Stamped and queued for the gateways in one go: every gateway gets each history
        # group's envelopes in offset order, whichever service sent them.
        with self._order:
            for index, envelope in enumerate(envelopes):
                routed = from_service(envelope)
                if routed is None:
                    statuses[index] = NO_ROUTE
                    continue
                if is_for_gateway(routed) or isinstance(routed.to, GatewayAddress):
                    targets, status = self._gateway_targets(routed)
                else:
                    services = self._service_targets(routed)
                    targets = [] if services is None else [(s.forwarder, routed) for s in services]
                    status = NO_ROUTE
                if not targets:
                    statuses[index] = REREGISTERING if settling else status
                    continue
                targets_of.extend((index, forwarder, item) for forwarder, item in targets)
            if state is None:
                for index, forwarder, item in targets_of:
                    future: concurrent.futures.Future[str] = concurrent.futures.Future()
                    forwarder.put(item, _resolver(future))
                    waiting.append((index, future))
            else:
                pending = _PendingCall(int(call or 0), statuses, len(targets_of))
                if not targets_of:
                    state.settle(pending)
                for index, forwarder, item in targets_of:
                    forwarder.put(item, functools.partial(state.answer, pending, index))
        if state is None:
            self._wait(waiting, statuses)
            return statuses
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
        envelope = self._stamp(envelope)
        if len(gateways) > 1 and envelope.recipients is not None:
            headers = {**envelope.headers, SHARED_HEADER: "1"}
            envelope = msgspec.structs.replace(envelope, headers=headers)
        return [(gateways[node].forwarder, envelope) for node in nodes], OK

    def _stamp(self, envelope: Envelope) -> Envelope:
        """Append a history group's envelope to its history (with ``_order`` held).

        Returns:
            The envelope stamped with its position, or as it was when it enters no history.
            A copy sent again (same id) gets the position the first one got.
        """
        history, config = self._history, self._history_config
        if history is None or config is None:
            return envelope
        group = history_group(envelope, config)
        if group is None:
            return envelope
        stamped = self._stamped.get(envelope.id)
        if stamped is not None and content_digest(stamped) != content_digest(envelope):
            # The id of one stamped lately with other content: not a copy sent again (a
            # peer guessing ids must not have the real message take its impostor's place).
            stamped = None
        if stamped is None:
            stamped = history.append(group, envelope, time.time())
            self._stamped.put(envelope.id, stamped)
        return stamped

    # -- history and sessions, for gateways -----------------------------------------------

    def history(self, group: str, after: Any, limit: int) -> list[Any] | None:
        """Return a history group's envelopes after a position, oldest first.

        Args:
            group: the history group.
            after: ``[epoch, offset]``: the position the caller has.
            limit: the most envelopes wanted (at most 10,000 are given).

        Returns:
            None when they cannot all be given (no history kept here, another epoch, or
            entries after ``after`` were trimmed); else ``[batch, more]``: the envelopes
            encoded as one batch (as many as fit in half a Pyro message), and whether some
            were left out for size (ask again after the last one).
        """
        try:
            group, epoch, offset = str(group), str(after[0]), int(after[1])
            limit = max(0, min(int(limit), _HISTORY_LIMIT))
        except (TypeError, ValueError, IndexError, KeyError):
            return None
        if offset < 0 or len(group) > _NAME_LIMIT or len(epoch) > _NAME_LIMIT:
            return None
        with self._order:
            history = self._history
            if history is None:
                return None
            entries = history.read(group, Position(epoch, offset), time.time(), limit)
        if entries is None:
            return None
        budget = self._config.max_message_size // 2
        parts: list[bytes] = []
        size = 0
        for entry in entries:
            part = _ENCODER.encode(entry)
            if parts and size + len(part) > budget:
                break
            parts.append(part)
            size += len(part)
        return [_array_header(len(parts)) + b"".join(parts), len(parts) < len(entries)]

    def save_session(self, blob: Any, ttl: float) -> str:
        """Keep a closed connection's :class:`~wsbus.resume.SessionRecord` for ``ttl`` seconds.

        Args:
            blob: the record, MessagePack encoded.
            ttl: seconds to keep it (at most a day).

        Returns:
            ``ok``; ``refused`` for a record the bus cannot read.
        """
        try:
            data = to_bytes(blob)
            record = _SESSION_RECORD.decode(data)
            ttl = min(float(ttl), _TTL_LIMIT)
        except (msgspec.MsgspecError, TypeError, ValueError) as exc:
            log.warning("a session record the bus cannot read was refused: %s", exc)
            return _REFUSED
        if not ttl > 0:
            return OK
        now = time.monotonic()
        with self._sessions_lock:
            sessions, sizes = self._sessions, self._session_sizes
            before = sessions.dropped
            self._session_bytes -= sizes.pop(record.sid, 0)
            sessions.save(record, ttl, now)
            sizes[record.sid] = len(data)
            self._session_bytes += len(data)
            # The store dropped from its old end (expired, or past its count): the same
            # records, in the same order, as at the head of the sizes.
            while len(sizes) > len(sessions):
                self._session_bytes -= sizes.popitem(last=False)[1]
            while self._session_bytes > _SESSION_BYTES and len(sizes) > 1:
                sid, size = sizes.popitem(last=False)
                self._session_bytes -= size
                if sessions.take(sid, now) is not None:
                    sessions.dropped += 1
            dropped = sessions.dropped - before
            self.sessions_dropped += dropped
            if dropped and now - self._dropped_logged > 60.0:
                self._dropped_logged = now
                log.warning(
                    "the bus keeps at most %d closed sessions (%d MiB): the oldest were "
                    "dropped, and their clients cannot resume (%d so far)",
                    sessions.max_records,
                    _SESSION_BYTES >> 20,
                    self.sessions_dropped,
                )
        return OK

    def take_session(self, sid: str) -> bytes | None:
        """Return the session record of ``sid`` (MessagePack) and forget it; None if none.

        A second take of one record gets None: a resume token works once.
        """
        sid = str(sid)
        if len(sid) > _NAME_LIMIT:
            return None
        with self._sessions_lock:
            record = self._sessions.take(sid, time.monotonic())
            self._session_bytes -= self._session_sizes.pop(sid, 0)
        return None if record is None else _ENCODER.encode(record)

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


class _Recent:
    """The envelopes stamped lately, by id: between 65,536 and twice that many."""

    def __init__(self, size: int = 65536) -> None:
        self._size = size
        self._current: dict[str, Envelope] = {}
        self._previous: dict[str, Envelope] = {}

    def get(self, id_: str) -> Envelope | None:
        found = self._current.get(id_)
        return found if found is not None else self._previous.get(id_)

    def put(self, id_: str, envelope: Envelope) -> None:
        self._current[id_] = envelope
        if len(self._current) >= self._size:
            self._previous, self._current = self._current, {}


def _event_lost(service: str, node: str, status: str) -> None:
    """A forwarder's callback: log a ``gateway_lost`` event a service did not take."""
    if status != OK:
        log.warning(
            "service %r did not take the presence event that gateway %s is gone (%s)",
            service,
            node,
            status,
        )


def _describe(config: HistoryConfig | None) -> str:
    if config is None or not config.groups:
        return "no history"
    return f"groups {list(config.groups)}, {config.size} entries, {config.age:g} s"


def bus_figures(bus: MessageBus) -> dict[str, Any]:
    """What ``wsbus bus --metrics`` reports of the message bus, read at scrape time.

    Not a method: every public method of :class:`MessageBus` is callable over Pyro.

    Returns:
        ``endpoints``: ``(kind, name, up, queued, calls)`` for each registered service and
        gateway (``queued``: envelopes waiting to be forwarded to it, unbounded for a
        gateway, see docs/pyro.md); ``aliases``, ``sessions``: entries kept now;
        ``sessions_dropped``: session records dropped to stay within their bytes.
    """
    with bus._lock:
        endpoints = [
            (kind, name, not e.forwarder.down, e.forwarder.queued, e.forwarder.calls)
            for kind, table in (("service", bus._services), ("gateway", bus._gateways))
            for name, e in table.items()
        ]
        return {
            "endpoints": endpoints,
            "aliases": len(bus._aliases),
            "sessions": len(bus._sessions),
            "sessions_dropped": bus.sessions_dropped,
        }
