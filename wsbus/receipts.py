"""Delivery receipts, sans-I/O: one gateway's part, and a service's merged view.

A service that sends with the ``wsbus-receipt`` header (``ServiceLink.send(...,
receipt=True)``) gets one ``wsbus.receipt`` from each gateway the message reached (content
:class:`~wsbus.control.Receipt`, ``reply_to`` the message's id): what became of it for each
connection there (written to the socket, dropped by a close, refused by a full queue) and
which recipients matched nothing there. A gateway sends its receipt once every outcome is
known, and also when it had nothing to deliver (so that a service knows every gateway
answered).

:class:`ReceiptTracker` is the gateway's record of one such message while its outcomes
come in; :func:`merge` joins the gateways' receipts into the :class:`Receipts` a service's
``send_with_receipt`` returns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import msgspec

from .control import Delivery, Receipt
from .envelope import ClientAddress, ConnId, Envelope, NodeId, Recipients, node_of

__all__ = ["ReceiptTracker", "Receipts", "merge"]


class ReceiptTracker:
    """One receipted message at one gateway, while the outcomes of its deliveries come in.

    A session holds it in place of the plain ``True`` that marks a delivery, so a message
    without a receipt costs nothing more per delivery.

    Args:
        envelope: the message (its id and sender address the receipt).
        node: the gateway's node id.
        expected: how many outcomes to wait for (one per connection delivered to).
        unmatched: the recipients that matched nothing at this gateway.
        addresses: the connections' addresses (the registry's live view), for the
            alias and user of each delivery.
        finish: called once, with this tracker, when the last outcome is in.
        wall: when the gateway took the message (seconds since the epoch): the receipt's
            creation time.
    """

    __slots__ = (
        "_addresses",
        "_finish",
        "deliveries",
        "envelope",
        "node",
        "remaining",
        "unmatched",
        "wall",
    )

    def __init__(
        self,
        envelope: Envelope,
        node: NodeId,
        expected: int,
        unmatched: Recipients,
        addresses: Mapping[ConnId, ClientAddress],
        finish: Callable[[ReceiptTracker], None],
        wall: float,
    ) -> None:
        self.envelope = envelope
        self.wall = wall
        self.node = node
        self.remaining = expected
        self.unmatched = unmatched
        self.deliveries: list[Delivery] = []
        self._addresses = addresses
        self._finish = finish

    def outcome(self, conn_id: ConnId, outcome: str, code: int | None = None) -> None:
        """Record what became of the delivery to ``conn_id``: written, dropped or refused."""
        address = self._addresses.get(conn_id)
        alias = address.alias if address is not None else None
        user = address.user if address is not None else None
        self.deliveries.append(Delivery(conn_id, outcome, alias, user, code))
        self.remaining -= 1
        if self.remaining == 0:
            self._finish(self)

    def receipt(self) -> Receipt:
        """Return this gateway's receipt (once every outcome is in)."""
        return Receipt(self.node, tuple(self.deliveries), self.unmatched)


class Receipts(msgspec.Struct, frozen=True, kw_only=True):
    """What became of a message sent with ``send_with_receipt``, from every gateway's receipt.

    Attributes:
        id: the message's id.
        written: deliveries written to their client's socket.
        dropped: deliveries lost because the connection closed first (``code`` says how).
        refused: deliveries refused because the connection's queue was full (the gateway's
            slow-consumer policy is ``drop``).
        unmatched: the recipients that reached nobody: a connection id when the gateway
            that owns it says so; an alias, user or group (or ``everyone``) when every
            gateway says so.
        failed: per gateway, why it delivered nothing at all (``filtered``: a plugin
            dropped the message; ``encode_failed``: its content cannot be encoded).
        nodes: the gateways that answered.
    """

    id: str
    written: list[Delivery] = msgspec.field(default_factory=list)
    dropped: list[Delivery] = msgspec.field(default_factory=list)
    refused: list[Delivery] = msgspec.field(default_factory=list)
    unmatched: Recipients = Recipients()
    failed: dict[str, str] = msgspec.field(default_factory=dict)
    nodes: tuple[str, ...] = ()


def merge(id: str, receipts: Iterable[Receipt], absent: Iterable[ConnId] = ()) -> Receipts:
    """Join gateways' receipts for message ``id`` into one :class:`Receipts`.

    ``absent``: connection ids whose gateway is not alive (nobody was asked): unmatched.
    """
    parts = list(receipts)
    by_node = {part.node: part for part in parts}
    written: list[Delivery] = []
    dropped: list[Delivery] = []
    refused: list[Delivery] = []
    for part in parts:
        for delivery in part.deliveries:
            if delivery.outcome == "written":
                written.append(delivery)
            elif delivery.outcome == "dropped":
                dropped.append(delivery)
            else:
                refused.append(delivery)
    # A gateway that delivered nothing (a plugin dropped the message) looked nothing up.
    voters = [part for part in parts if part.failed is None]
    conn_ids: dict[ConnId, None] = dict.fromkeys(absent)
    for part in parts:
        for conn_id in part.unmatched.conn_ids:
            owner = by_node.get(node_of(conn_id))
            # The owning gateway's word; another's only when the owner did not answer
            # (a connection id naming no live gateway).
            if owner is None or owner is part:
                conn_ids[conn_id] = None
    unmatched = Recipients(
        conn_ids=tuple(conn_ids),
        aliases=_everyone_says(voters, "aliases"),
        users=_everyone_says(voters, "users"),
        groups=_everyone_says(voters, "groups"),
        everyone=bool(voters) and all(part.unmatched.everyone for part in voters),
    )
    failed: dict[str, str] = {part.node: part.failed for part in parts if part.failed is not None}
    return Receipts(
        id=id,
        written=written,
        dropped=dropped,
        refused=refused,
        unmatched=unmatched,
        failed=failed,
        nodes=tuple(by_node),
    )


def _everyone_says(parts: list[Receipt], field: str) -> tuple[str, ...]:
    """The names every gateway's receipt lists as unmatched, in the first one's order."""
    if not parts:
        return ()
    first: tuple[str, ...] = getattr(parts[0].unmatched, field)
    rest = [frozenset(getattr(part.unmatched, field)) for part in parts[1:]]
    return tuple(name for name in first if all(name in names for names in rest))
