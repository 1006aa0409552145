"""Gateway control: the ``wsbus.*`` messages services exchange with the gateway.

A service asks the gateway for something by sending one of the request types below; the
gateway answers with ``wsbus.result`` (``reply_to`` = the request's id) addressed to the
service. When a service message misses recipients the gateway sends ``wsbus.undeliverable``
(``reply_to`` = the message's id). When a handler raises on a client's message, the service
runtime sends ``wsbus.failed`` to the gateway that owns the client's connection, which tells
the client ``service_error``; nothing answers it. These travel over any bus, so services
never need a transport-specific API. :class:`~wsbus.service.Context` wraps them in plain
methods.
"""

from __future__ import annotations

import os
from typing import Any, Final

import msgspec

from .envelope import ConnId, Envelope, EnvelopeId, GatewayAddress, NodeId, Recipients

__all__ = [
    "ACK_HEADER",
    "ALIAS_CLEAR",
    "ALIAS_SET",
    "CLIENTS",
    "DISCONNECT",
    "FAILED",
    "JOIN",
    "LEAVE",
    "PRESENCE",
    "PROBE",
    "PROCESSED",
    "RECEIPT",
    "RECEIPT_HEADER",
    "REQUEST_TYPES",
    "RESULT",
    "UNDELIVERABLE",
    "AliasRequest",
    "ClientsRequest",
    "ConnRequest",
    "Delivery",
    "DisconnectRequest",
    "Failed",
    "GroupRequest",
    "PresenceEvent",
    "Processed",
    "Receipt",
    "Result",
    "Undeliverable",
    "alias_lost",
]

JOIN: Final = "wsbus.join"
"""Request: put a connection in a group (content :class:`GroupRequest`)."""
LEAVE: Final = "wsbus.leave"
"""Request: take a connection out of a group (content :class:`GroupRequest`)."""
ALIAS_SET: Final = "wsbus.alias.set"
"""Request: give a connection an alias (content :class:`AliasRequest`)."""
ALIAS_CLEAR: Final = "wsbus.alias.clear"
"""Request: remove a connection's alias (content :class:`ConnRequest`)."""
CLIENTS: Final = "wsbus.clients"
"""Request: list the clients, or one group's (content :class:`ClientsRequest`)."""
DISCONNECT: Final = "wsbus.disconnect"
"""Request: close a connection (content :class:`DisconnectRequest`)."""
RESULT: Final = "wsbus.result"
"""The gateway's answer to a request (content :class:`Result`)."""
UNDELIVERABLE: Final = "wsbus.undeliverable"
"""The gateway's report that a service message missed recipients (:class:`Undeliverable`)."""
FAILED: Final = "wsbus.failed"
"""A service runtime's notice that a handler raised on a client's message (:class:`Failed`)."""
PRESENCE: Final = "wsbus.presence"
"""Event: a connection joined or left a group, or a gateway died (:class:`PresenceEvent`).

A gateway publishes it (sender its :class:`~wsbus.envelope.GatewayAddress`, no recipients);
the bus hands it to every service that declared the type and to every other gateway.
"""
PROBE: Final = "wsbus.probe"
"""A gateway's probe of its bus: sent by the gateway to itself round the bus (see
:class:`~wsbus.bus.Probes`). Not a request: nothing answers it."""
RECEIPT: Final = "wsbus.receipt"
"""One gateway's delivery receipt to the sending service (:class:`Receipt`).

``reply_to`` is the id of the message the receipt is for.
"""
PROCESSED: Final = "wsbus.processed"
"""A client acknowledged messages it processed (:class:`Processed`).

From a client: content ``{"ids": [...]}``. From a gateway to the sending service: content
:class:`Processed`.
"""
RECEIPT_HEADER: Final = "wsbus-receipt"
"""Envelope header: ``"1"`` on a service's message that wants a :data:`RECEIPT`."""
ACK_HEADER: Final = "wsbus-ack"
"""Envelope header: ``"1"`` asks each client for an end-to-end :data:`PROCESSED`."""


class GroupRequest(msgspec.Struct, frozen=True):
    """Content of ``wsbus.join`` and ``wsbus.leave``."""

    conn_id: ConnId
    group: str


class AliasRequest(msgspec.Struct, frozen=True):
    """Content of ``wsbus.alias.set``. The result's value is the alias given."""

    conn_id: ConnId
    alias: str


class ConnRequest(msgspec.Struct, frozen=True):
    """Content of ``wsbus.alias.clear``."""

    conn_id: ConnId


class ClientsRequest(msgspec.Struct, frozen=True):
    """Content of ``wsbus.clients``: every client, or one group's members.

    The result's value is a list of :class:`~wsbus.registry.ClientInfo`.
    """

    group: str | None = None


class DisconnectRequest(msgspec.Struct, frozen=True):
    """Content of ``wsbus.disconnect``.

    Attributes:
        conn_id: the connection to close.
        code: 1000, 1001, 1008 or an application code in 4000-4999.
        reason: the close reason the client sees (at most 120 characters).
    """

    conn_id: ConnId
    code: int = 4000
    reason: str = ""


REQUEST_TYPES: Final[dict[str, type[msgspec.Struct]]] = {
    JOIN: GroupRequest,
    LEAVE: GroupRequest,
    ALIAS_SET: AliasRequest,
    ALIAS_CLEAR: ConnRequest,
    CLIENTS: ClientsRequest,
    DISCONNECT: DisconnectRequest,
}
"""Each control request type and the shape of its content."""


class Result(msgspec.Struct, frozen=True, omit_defaults=True):
    """Content of ``wsbus.result``.

    Attributes:
        ok: whether the request was done.
        value: what it returned, when ``ok``.
        code: why not (``invalid_request``, ``unknown_connection``, ``alias_taken``,
            ``invalid_name``, ``unknown_request``, or ``unavailable``: on a bus that keeps
            aliases unique across gateways, its alias table could not be reached and nothing
            was set; retry later), when not ``ok``.
        message: an explanation, when not ``ok``.
    """

    ok: bool
    value: Any = None
    code: str | None = None
    message: str | None = None


class Undeliverable(msgspec.Struct, frozen=True, omit_defaults=True):
    """Why a message did not reach some recipients.

    The content of the ``wsbus.undeliverable`` report to the sending service, and what
    the ``wsbus_delivery_failed`` hook is given.

    Attributes:
        reason: ``no_match`` (recipients matched no connection), ``filtered`` (a hook
            dropped it), ``slow_consumer`` (a connection's queue was full and the policy is
            ``drop``), ``encode_failed`` (the content cannot be encoded).
        recipients: the recipients missed.
        detail: an explanation.
    """

    reason: str
    recipients: Recipients
    detail: str = ""


class Failed(msgspec.Struct, frozen=True):
    """Content of ``wsbus.failed``: a service's handler raised on a client's message.

    The service runtime sends it to the gateway node that owns ``conn_id``; that gateway
    answers the client ``service_error`` with ``ref``. It carries nothing of the exception:
    the traceback stays in the service's log.

    Attributes:
        conn_id: the connection that sent the message.
        ref: the message's envelope id (the frame's own id, when the client gave one).
    """

    conn_id: ConnId
    ref: str


class PresenceEvent(msgspec.Struct, frozen=True, omit_defaults=True):
    """Content of ``wsbus.presence``: who joined or left a group, or which gateway died.

    Attributes:
        event: ``join``, ``leave`` or ``gateway_lost``.
        node: the gateway it happened on (the dead one, for ``gateway_lost``).
        group: the group joined or left (``None`` for ``gateway_lost``).
        conn_id: the connection that joined or left.
        alias: its alias, when it had one.
        user: its authenticated user, when it had one.
        reason: for ``leave``: ``left`` (asked to), ``disconnected`` (its connection
            closed) or ``gateway_lost`` (its gateway died).
    """

    event: str
    node: NodeId
    group: str | None = None
    conn_id: ConnId | None = None
    alias: str | None = None
    user: str | None = None
    reason: str | None = None


class Delivery(msgspec.Struct, frozen=True, omit_defaults=True):
    """What became of a message for one connection, in a :class:`Receipt`.

    Attributes:
        conn_id: the connection.
        outcome: ``written`` (confirmed written to its socket), ``dropped`` (its connection
            closed before it was written: see ``code``) or ``refused`` (its queue was full
            and the slow-consumer policy is ``drop``).
        alias: the connection's alias, when it had one.
        user: the connection's authenticated user, when it had one.
        code: the close code, for ``dropped``.
    """

    conn_id: ConnId
    outcome: str
    alias: str | None = None
    user: str | None = None
    code: int | None = None


class Receipt(msgspec.Struct, frozen=True, omit_defaults=True):
    """Content of ``wsbus.receipt``: one gateway's part of a delivery receipt.

    Attributes:
        node: the gateway answering.
        deliveries: one per connection this gateway delivered to (or tried).
        unmatched: the recipients that matched nothing at this gateway.
        failed: ``filtered`` (a hook dropped the message) or ``encode_failed`` (its content
            cannot be encoded): nothing was delivered here.
    """

    node: NodeId
    deliveries: tuple[Delivery, ...] = ()
    unmatched: Recipients = Recipients()
    failed: str | None = None


class Processed(msgspec.Struct, frozen=True, omit_defaults=True):
    """Content of the gateway's ``wsbus.processed`` to the service that sent the messages.

    Attributes:
        conn_id: the connection whose client acknowledged them.
        ids: the envelope ids it acknowledged (each one the gateway was waiting for).
        alias: the connection's alias, when it had one.
        user: the connection's authenticated user, when it had one.
    """

    conn_id: ConnId
    ids: tuple[str, ...]
    alias: str | None = None
    user: str | None = None


def alias_lost(node: NodeId, conn_id: ConnId, created: float) -> Envelope:
    """Return the ``wsbus.alias.clear`` a bus hands its own gateway for a lost alias.

    A bus sends it when its alias table gave a connection's alias to another connection
    (while the gateway was cut off, say). Sender and addressee are the gateway itself, so
    it clears the alias in its registry as a service's request would, and answers nobody
    (no service asked).

    Args:
        node: the gateway's node id.
        conn_id: the connection that lost its alias.
        created: the time, in seconds since the epoch.
    """
    gateway = GatewayAddress(node)
    return Envelope(
        id=EnvelopeId(f"{node}-bus-{os.urandom(6).hex()}"),
        type=ALIAS_CLEAR,
        sender=gateway,
        content={"conn_id": conn_id},
        created=created,
        to=gateway,
    )
