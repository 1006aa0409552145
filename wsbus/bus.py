"""The bus side: what the gateway needs from a message bus.

A bus carries envelopes between the gateway and services. The gateway publishes client
messages with :meth:`Bus.publish`; the bus hands the gateway every envelope meant for it
(messages to clients, control requests) by calling :meth:`BusSink.deliver` on the gateway's
event loop thread, in the order the bus received them from each sender.

Routing rules every bus follows:

1. an envelope with ``to`` set goes to that one endpoint (a service by name, a gateway by
   node);
2. an envelope with ``recipients`` goes to the gateway (each gateway, on a bus with several);
3. a ``wsbus.*`` control request from a service goes to the gateway;
4. anything else goes to every service that declared its type; :class:`~wsbus.errors.NoRoute`
   when none did;
5. a presence event (type ``wsbus.presence`` sent by a gateway, see
   :func:`is_presence_event`) goes to every service that declared ``wsbus.presence`` (one
   instance of each) and to every *other* gateway; never NoRoute: nobody listening is fine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

from .envelope import ConnId, Envelope, GatewayAddress, NodeId

if TYPE_CHECKING:
    from .history import HistoryConfig, Position
    from .resume import SessionRecord

__all__ = [
    "SHARED_HEADER",
    "Bus",
    "BusSink",
    "ClaimsAliases",
    "HearsGateways",
    "HearsLoss",
    "KeepsHistory",
    "KeepsSessions",
    "ListsServices",
    "Probes",
    "PublishesFresh",
    "PublishesNowait",
    "ReportsAvailability",
    "is_for_gateway",
    "is_presence_event",
]

PRESENCE_TYPE = "wsbus.presence"
"""The type of a gateway's presence event (see :func:`is_presence_event`)."""

SHARED_HEADER = "wsbus-shared"
"""A bus sets this header to ``"1"`` on a message it sent to several gateways: each gateway
then reports as unmatched only the connection ids of its own node, since aliases, users
and groups may well live on another gateway."""


@runtime_checkable
class BusSink(Protocol):
    """The gateway, as a bus sees it."""

    @property
    def node(self) -> NodeId:
        """The gateway's node id: connection ids start with it."""
        ...

    def deliver(self, envelope: Envelope) -> None:
        """Take one envelope meant for the gateway. Called on the gateway's loop thread."""
        ...


@runtime_checkable
class Bus(Protocol):
    """A message bus, as the gateway uses it."""

    async def start(self, sink: BusSink) -> None:
        """Connect and begin delivering envelopes for the gateway to ``sink``."""
        ...

    async def publish(self, envelope: Envelope) -> None:
        """Put an envelope on the bus; return once the bus has accepted it.

        Raises:
            NoRoute: nothing on the bus handles ``envelope.type``.
            BusUnavailable: the bus, or the service behind it, cannot take it now.
        """
        ...

    async def close(self) -> None:
        """Stop delivering and release every resource. Idempotent."""
        ...


# Optional capabilities, checked once when the gateway attaches the bus (``isinstance``
# against these runtime-checkable protocols); the bus conformance suite tests each one a
# bus has.


@runtime_checkable
class PublishesNowait(Protocol):
    """A bus that can take an envelope without a coroutine (the in-memory bus can).

    The gateway then publishes without creating a coroutine per client frame.
    """

    def publish_nowait(self, envelope: Envelope) -> bool:
        """Take the envelope now if that needs no waiting.

        Returns:
            True when the bus took it; False when taking it would mean waiting (an inbox
            is full): nothing was done, and the caller awaits :meth:`Bus.publish`, which
            waits for room. That is how a full bus slows the client that fills it.
            Only False means wait: any other value (None, from an adapter written to the
            older contract) means the bus took it.

        Raises:
            NoRoute: as :meth:`Bus.publish`.
            BusUnavailable: as :meth:`Bus.publish`.
        """
        ...


@runtime_checkable
class PublishesFresh(Protocol):
    """A bus that can take, without copying, an envelope nobody else holds (the in-memory bus).

    The gateway publishes a client's frame this way when it built the envelope for this
    call alone from the validated frame, with no plugin having seen it: its content is JSON's
    data model as the wire decoder made it (dicts with string keys, lists, strings, floats,
    booleans, None, integers within 64 bits), and the gateway keeps no reference to it or to
    anything in it. A bus that copies each envelope so that services share no object with
    its sender and see only what crosses a process boundary (``MemoryBus(serialize=True)``)
    need not copy this one: only the services it goes to can reach it, and it would cross
    unchanged.
    """

    def publish_fresh_nowait(self, envelope: Envelope, handle_now: bool = False) -> bool:
        """Take such an envelope now if that needs no waiting (as ``publish_nowait``).

        Args:
            envelope: the envelope.
            handle_now: the caller has nothing more to do for this message that must come
                before what a service does with it (no ``wsbus.ack`` to send): a service
                in the caller's process may handle it before this returns.

        Returns:
            True when the bus took it; False when taking it would mean waiting: nothing
            was done, and the caller awaits :meth:`Bus.publish`.

        Raises:
            NoRoute: as :meth:`Bus.publish`.
            BusUnavailable: as :meth:`Bus.publish`.
        """
        ...

    async def publish_fresh(self, envelope: Envelope) -> None:
        """Publish such an envelope, waiting for room (as :meth:`Bus.publish`).

        Raises:
            NoRoute: as :meth:`Bus.publish`.
            BusUnavailable: as :meth:`Bus.publish`.
        """
        ...


@runtime_checkable
class ReportsAvailability(Protocol):
    """A bus that knows whether it can take envelopes now (connected, not marked down)."""

    @property
    def available(self) -> bool:
        """True while the bus can take envelopes; the gateway admits clients again then."""
        ...


@runtime_checkable
class ClaimsAliases(Protocol):
    """A bus that spans gateways and keeps aliases unique across all of them.

    A gateway whose bus has this claims an alias on the bus before it sets it in its own
    registry, and releases it when the alias is cleared or its connection ends. A bus with
    one gateway (the in-memory bus) does not need it: the registry keeps aliases unique.
    """

    async def claim_alias(self, alias: str, conn_id: ConnId) -> bool:
        """Claim ``alias`` for ``conn_id`` across every gateway on the bus.

        Returns:
            True when ``conn_id`` holds ``alias`` now (also when it already did); False
            when another connection holds it.

        Raises:
            BusUnavailable: the alias table cannot be reached; nothing was claimed.
        """
        ...

    async def release_alias(self, alias: str, conn_id: ConnId) -> None:
        """Give ``alias`` up if ``conn_id`` holds it; do nothing otherwise.

        Raises:
            BusUnavailable: the alias table cannot be reached. The claim then ends when
                the bus learns that the gateway holding it died.
        """
        ...


@runtime_checkable
class HearsLoss(Protocol):
    """A :class:`BusSink` that can be told deliveries meant for it may have been lost."""

    def deliveries_lost(self, reason: str, detail: str) -> None:
        """Hear that envelopes meant for this gateway may have been lost.

        Called on the gateway's loop thread.

        Args:
            reason: ``"bus_disconnected"`` (the link to the bus broke: anything in flight
                to this gateway may be gone) or ``"slow_consumer"`` (the bus dropped
                envelopes for this gateway: its subscription overflowed).
            detail: what happened, in words for a log or a user.
        """
        ...


@runtime_checkable
class HearsGateways(Protocol):
    """A :class:`BusSink` that can be told another gateway on the bus died."""

    def gateway_lost(self, node: NodeId, report: bool) -> None:
        """Hear that gateway ``node`` is dead: its connections are gone.

        Called on the gateway's loop thread. The gateway sends leave frames for the members
        of that node it knew of; with ``report`` it also publishes the ``gateway_lost``
        presence event for services (a bus picks exactly one gateway to report, or reports
        itself and passes False).
        """
        ...


@runtime_checkable
class KeepsHistory(Protocol):
    """A bus that keeps group history: it stamps positions and can replay them."""

    def keep_history(self, config: HistoryConfig) -> None:
        """Say which groups keep history and how much; called once, before ``start``."""
        ...

    async def history(self, group: str, after: Position, limit: int) -> list[Envelope] | None:
        """Return the group's envelopes after ``after``, oldest first, at most ``limit``.

        Each carries its position headers. None when they cannot all be given: ``after``
        is from another epoch, or entries after it were trimmed.

        Raises:
            BusUnavailable: the history cannot be read now.
        """
        ...


@runtime_checkable
class KeepsSessions(Protocol):
    """A bus that keeps closed sessions' records, so a client may resume on any gateway."""

    async def save_session(self, record: SessionRecord, ttl: float) -> None:
        """Keep ``record`` for ``ttl`` seconds.

        Raises:
            BusUnavailable: it cannot be kept now.
        """
        ...

    async def take_session(self, sid: str) -> SessionRecord | None:
        """Return the record of ``sid`` and delete it, atomically: a second take gets None.

        Raises:
            BusUnavailable: the records cannot be read now.
        """
        ...


@runtime_checkable
class Probes(Protocol):
    """A bus that can send a gateway's probe round the bus and back to that gateway.

    ``/readyz`` (:class:`wsbus.ready.Readiness`) uses it: a gateway whose bus still takes
    its publishes but no longer delivers to it is deaf, and must not be called ready.
    """

    async def probe(self, envelope: Envelope) -> None:
        """Send ``envelope`` (type ``wsbus.probe``, ``to`` this gateway) back to this gateway.

        The bus hands it to the gateway's :meth:`BusSink.deliver` the way it hands it
        messages from services (through the same connection, queue and thread), or, where
        the gateway may not publish to its own inbox, after a round trip on the connection
        that carries them. Returns once the bus has taken it.

        Raises:
            BusUnavailable: the bus cannot take it now.
        """
        ...


@runtime_checkable
class ListsServices(Protocol):
    """A bus that knows which services are on it now (``/readyz`` reports them)."""

    async def live_services(self) -> dict[str, int]:
        """Return each service on the bus now, with how many live instances it has.

        Raises:
            BusUnavailable: the bus cannot say now.
        """
        ...


def is_for_gateway(envelope: Envelope) -> bool:
    """Return True when routing rules 2 and 3 send this envelope to the gateway."""
    return envelope.recipients is not None or (
        envelope.to is None
        and envelope.type.startswith("wsbus.")
        and not is_presence_event(envelope)
    )


def is_presence_event(envelope: Envelope) -> bool:
    """Return True for a gateway's presence event (routing rule 5)."""
    return (
        envelope.type == PRESENCE_TYPE
        and envelope.to is None
        and envelope.recipients is None
        and isinstance(envelope.sender, GatewayAddress)
    )
