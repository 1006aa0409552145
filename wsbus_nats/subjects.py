"""The NATS subjects and key-value buckets wsbus uses, under one prefix ``P`` (``wsbus``).

Every subject names its sender, so that NATS permissions can let each service publish only
as itself, and a receiver can check an envelope's sender against the subject it came on:

==================================  ===========================================================
``P.svc.<service>.gw.<node>``       to a service, from gateway ``<node>`` (a NATS request: an
                                    instance answers once its runner holds the envelope)
``P.svc.<service>.svc.<sender>``    to a service, from service ``<sender>`` (a request too)
``P.gw.<node>.svc.<sender>``        to gateway ``<node>``, from service ``<sender>``
``P.reply.<service>.<instance>``    a gateway's answers to one instance's control requests
``P.ev.gw.<node>``                  a presence event from gateway ``<node>`` (every other
                                    gateway, and one instance of each service that declared
                                    ``wsbus.presence``, in queue group ``<service>``)
``P.hist.<group>.<service>``        a history entry of ``<group>`` (its UTF-8 in hex) appended
                                    by ``<service>``: the JetStream stream ``P_history``
==================================  ===========================================================

Each service instance subscribes ``P.svc.<service>.>`` in queue group ``<service>``: the
instances of a service share its traffic, and one subscription per receiving endpoint keeps
each sender's order (nats-py runs a task per subscription: two would interleave). Each
gateway subscribes ``P.gw.<node>.>`` once.

What travels: one envelope (MessagePack) per NATS message; to a gateway, also a batch of
envelopes from one service in one message (a MessagePack array, in order). Two notices
travel as NATS headers on ``P.gw.<node>.svc.<sender>``, never as envelopes: ``wsbus-nats-lost``
(the service's link broke: what it sent may be lost) and ``wsbus-nats-done`` (an instance's
handlers are done with the client messages listed).

Key-value buckets: ``P_gateways`` (live gateways), ``P_services`` (live service instances and
their types), ``P_aliases`` (alias -> the connection holding it), ``P_sessions`` (closed
sessions a client may resume: gateways only).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from wsbus.envelope import ClientAddress, Envelope, GatewayAddress, ServiceAddress, node_of
from wsbus.errors import ConfigError

__all__ = [
    "FROM_GATEWAY",
    "FROM_SERVICE",
    "Subjects",
    "check_tokens",
    "group_token",
    "is_token",
    "sent_by",
]

FROM_GATEWAY: Final = "gw"
"""The kind token of a subject whose sender is a gateway."""
FROM_SERVICE: Final = "svc"
"""The kind token of a subject whose sender is a service."""


def is_token(text: str) -> bool:
    """Return True when ``text`` is a valid single NATS subject token for wsbus.

    Letters, digits, ``-`` and ``_`` only, at most 64: no ``.`` (a separator), ``*`` or
    ``>`` (wildcards), whitespace, or anything a server might read differently.
    """
    return 0 < len(text) <= 64 and all(c.isascii() and (c.isalnum() or c in "-_") for c in text)


def check_tokens(kind: str, names: Sequence[str]) -> None:
    """Refuse a name that cannot be one subject token.

    Raises:
        ConfigError: naming the first of ``names`` that is not valid, and ``kind`` (what it
            names: a service, a gateway node).
    """
    for name in names:
        if not is_token(name):
            raise ConfigError(
                f"{kind} {name!r} cannot be used on NATS: it must be one subject token "
                "(at most 64 letters, digits, '-' or '_'; no '.', '*', '>' or spaces)"
            )


class Subjects:
    """The subjects and bucket names of one deployment (one prefix)."""

    def __init__(self, prefix: str = "wsbus") -> None:
        check_tokens("prefix", [prefix])
        self.prefix = prefix
        self.gateways_bucket = f"{prefix}_gateways"
        """The key-value bucket of live gateways (key: node id)."""
        self.services_bucket = f"{prefix}_services"
        """The key-value bucket of live service instances (key: ``<service>.<instance>``)."""
        self.aliases_bucket = f"{prefix}_aliases"
        """The key-value bucket of aliases (key: the alias, encoded; value: a conn id)."""
        self.sessions_bucket = f"{prefix}_sessions"
        """The key-value bucket of closed sessions (key: the session id): gateways only."""
        self.history_stream = f"{prefix}_history"
        """The JetStream stream of group history (subjects ``P.hist.*.*``)."""
        self.history_subjects = f"{prefix}.hist.*.*"
        """The history stream's one subject filter."""
        self.presence_all = f"{prefix}.ev.>"
        """What gateways and presence-declaring services subscribe to for presence events."""

    def inbox(self, kind: str, name: str) -> str:
        """The inbox prefix of one process: gateway ``name`` (``kind`` ``gw``) or service.

        Every answer to what a process asks (JetStream's too: key-value and history reads,
        acknowledgements, consumers' deliveries) comes on a subject under it, and the NATS
        permissions let only that process's user subscribe there: no other process can
        read a gateway's session records or history reads.
        """
        return f"_INBOX.{self.prefix}.{kind}.{name}"

    def presence(self, node: str) -> str:
        """The subject of gateway ``node``'s presence events."""
        return f"{self.prefix}.ev.{FROM_GATEWAY}.{node}"

    def presence_sender(self, subject: str) -> str | None:
        """Return the gateway node a presence subject names, or None if it is not one."""
        parts = subject.split(".")
        if len(parts) != 4 or parts[0] != self.prefix or parts[1] != "ev" or parts[2] != "gw":
            return None
        return parts[3]

    def history(self, group: str, service: str) -> str:
        """The subject of ``group``'s history entries appended by ``service``."""
        return f"{self.prefix}.hist.{group_token(group)}.{service}"

    def history_group(self, group: str) -> str:
        """The subject filter of every history entry of ``group`` (all its services)."""
        return f"{self.prefix}.hist.{group_token(group)}.*"

    def to_service(self, service: str, kind: str, sender: str) -> str:
        """The subject of a message to ``service`` from a gateway or service ``sender``."""
        return f"{self.prefix}.svc.{service}.{kind}.{sender}"

    def service_inbox(self, service: str) -> str:
        """What a service instance subscribes to (in queue group ``service``)."""
        return f"{self.prefix}.svc.{service}.>"

    def to_gateway(self, node: str, sender: str) -> str:
        """The subject of a message to gateway ``node`` from service ``sender``."""
        return f"{self.prefix}.gw.{node}.svc.{sender}"

    def gateway_inbox(self, node: str) -> str:
        """What gateway ``node`` subscribes to."""
        return f"{self.prefix}.gw.{node}.>"

    def reply(self, service: str, instance: str) -> str:
        """Where gateways answer the control requests of one instance of ``service``."""
        return f"{self.prefix}.reply.{service}.{instance}"

    def origin(self, subject: str) -> tuple[str, str] | None:
        """Return (kind, sender) of a subject from :meth:`to_service` or :meth:`to_gateway`.

        None when the subject does not have that shape.
        """
        parts = subject.split(".")
        if len(parts) != 5 or parts[0] != self.prefix:
            return None
        return parts[3], parts[4]


def group_token(group: str) -> str:
    """Return a group's name as one subject token: its UTF-8 in lowercase hex.

    Any group name fits (dots, wildcards and spaces included), and two names never share
    a token.
    """
    return group.encode().hex()


def sent_by(envelope: Envelope, kind: str, sender: str) -> bool:
    """Return True when ``envelope``'s sender may have sent it on a subject naming ``sender``.

    From a gateway (``kind`` ``gw``) the sender is that gateway, or a client connected to
    it; from a service, that service.
    """
    address = envelope.sender
    if kind == FROM_SERVICE:
        return type(address) is ServiceAddress and address.name == sender
    if kind == FROM_GATEWAY:
        if type(address) is GatewayAddress:
            return address.node == sender
        return type(address) is ClientAddress and node_of(address.conn_id) == sender
    return False
