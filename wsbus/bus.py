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
   when none did.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from .envelope import Envelope, NodeId

__all__ = ["SHARED_HEADER", "Bus", "BusSink", "is_for_gateway"]

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


# A bus may also offer ``publish_nowait(envelope) -> None``, raising as ``publish`` does,
# when it can take an envelope without waiting (the in-memory bus can). The gateway then
# publishes without creating a coroutine per client frame.


def is_for_gateway(envelope: Envelope) -> bool:
    """Return True when routing rules 2 and 3 send this envelope to the gateway."""
    return envelope.recipients is not None or (
        envelope.to is None and envelope.type.startswith("wsbus.")
    )
