"""Router: turns recipients into connections.

Pure bookkeeping on top of a :class:`~wsbus.registry.ClientRegistry`: no I/O, nothing to
await. Per-client order is kept by the caller handing resolutions to per-connection FIFO
queues in the order envelopes arrive; the router itself keeps no state between calls.
"""

from __future__ import annotations

from typing import NamedTuple

from .envelope import ConnId, Recipients
from .registry import ClientRegistry

__all__ = ["Resolution", "Router"]


class Resolution(NamedTuple):
    """The outcome of resolving recipients.

    Attributes:
        targets: the connections to deliver to, each once, in a stable order: named
            connections, then aliases, users and groups in the order given; with
            ``everyone``, every connection in connect order.
        unmatched: the recipients that matched no open connection, or None when all did.
            Excluded connections are never reported: excluding is not failing.
    """

    targets: list[ConnId]
    unmatched: Recipients | None


class Router:
    """Turns recipients into connections. Pure bookkeeping: no I/O, nothing to await."""

    def __init__(self, registry: ClientRegistry) -> None:
        self.registry = registry

    def resolve(self, recipients: Recipients) -> Resolution:
        """Return the connections to deliver to, once each, and the recipients that matched none."""
        registry = self.registry
        # A dict keeps first-seen order and drops duplicates in one step.
        targets: dict[ConnId, None] = {}
        missing_conns: list[ConnId] = []
        missing_aliases: list[str] = []
        missing_users: list[str] = []
        missing_groups: list[str] = []

        for conn_id in recipients.conn_ids:
            if conn_id in registry:
                targets[conn_id] = None
            else:
                missing_conns.append(conn_id)
        for alias in recipients.aliases:
            owner = registry.by_alias(alias)
            if owner is None:
                missing_aliases.append(alias)
            else:
                targets[owner] = None
        for user in recipients.users:
            conns = registry.connections_of(user)
            if conns:
                targets.update(dict.fromkeys(conns))
            else:
                missing_users.append(user)
        for group in recipients.groups:
            members = registry.members(group)
            if members:
                targets.update(dict.fromkeys(members))
            else:
                missing_groups.append(group)
        nobody = False
        if recipients.everyone:
            # Everyone includes every named connection, so connect order is the order.
            targets = dict.fromkeys(registry)
            nobody = not targets

        for conn_id in recipients.exclude:
            targets.pop(conn_id, None)

        unmatched = None
        if missing_conns or missing_aliases or missing_users or missing_groups or nobody:
            unmatched = Recipients(
                conn_ids=tuple(missing_conns),
                aliases=tuple(missing_aliases),
                users=tuple(missing_users),
                groups=tuple(missing_groups),
                everyone=nobody,
            )
        return Resolution(list(targets), unmatched)
