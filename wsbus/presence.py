"""Presence, sans-I/O: the events a gateway publishes and the frames its members get.

A gateway tells the bus when one of its connections joins or leaves a group (a
``wsbus.presence`` envelope, content :class:`~wsbus.control.PresenceEvent`, sent as the
gateway with no recipients): the bus hands it to every service that declared
``wsbus.presence`` and to every other gateway. Members of a group that matches
``GatewayConfig.presence_frames`` get ``wsbus.presence`` frames for the other members
joining and leaving, wherever those are connected; to send the leave frames of a gateway
that died (as its own bus tells it: never on another gateway's word), each gateway
remembers the remote members it heard of, per (node, group), for those groups only and up
to :data:`MAX_REMOTE_MEMBERS`.

:class:`Presence` makes those decisions. It never awaits and never reads a clock: the
gateway feeds it what happened and sends what it returns.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from fnmatch import fnmatchcase
from typing import Any, Final

import msgspec

from . import control
from .envelope import ClientAddress, ConnId, Envelope, EnvelopeId, GatewayAddress, NodeId

__all__ = ["MAX_REMOTE_MEMBERS", "Presence", "PresenceFrame"]

log = logging.getLogger("wsbus.gateway")

MAX_REMOTE_MEMBERS: Final = 100_000
"""Members of other gateways a gateway remembers (for the leave frames it sends when one of
those gateways dies); past this, joins heard are still framed but not remembered."""

_MATCH_CACHE: Final = 4096
"""Group names whose match against the patterns is remembered (then the cache restarts)."""

PresenceFrame = tuple[str, dict[str, Any]]
"""A frame to send to a group's local members: the group and the frame's content."""


class Presence:
    """One gateway's presence decisions.

    Args:
        node: the gateway's node id.
        patterns: ``fnmatch.fnmatchcase`` patterns of the groups whose members get frames.
    """

    def __init__(self, node: NodeId, patterns: Iterable[str] = ()) -> None:
        self.node = node
        self.address = GatewayAddress(node)
        self.patterns = tuple(patterns)
        self._matches: dict[str, bool] = {}
        # (node, group) -> {conn_id: (alias, user)}: other gateways' members of groups with
        # frames, in the order they joined.
        self._remote: dict[tuple[NodeId, str], dict[ConnId, tuple[str | None, str | None]]] = {}
        self._remembered = 0
        self._full_logged = False

    @property
    def remembered(self) -> int:
        """How many remote members are remembered now."""
        return self._remembered

    def frames(self, group: str) -> bool:
        """Return True when members of ``group`` get presence frames."""
        if not self.patterns:
            return False
        matches = self._matches
        found = matches.get(group)
        if found is None:
            if len(matches) >= _MATCH_CACHE:
                matches.clear()
            found = matches[group] = any(fnmatchcase(group, p) for p in self.patterns)
        return found

    def event(
        self, kind: str, group: str, client: ClientAddress, reason: str | None = None
    ) -> control.PresenceEvent:
        """Return the event for a connection of this gateway joining or leaving ``group``."""
        return control.PresenceEvent(
            kind, self.node, group, client.conn_id, client.alias, client.user, reason
        )

    def envelope(self, event: control.PresenceEvent, id: EnvelopeId, wall: float) -> Envelope:
        """Return the ``wsbus.presence`` envelope that publishes ``event``."""
        return Envelope(
            id=id,
            type=control.PRESENCE,
            sender=self.address,
            content=msgspec.to_builtins(event),
            created=wall,
        )

    def heard(self, envelope: Envelope) -> list[PresenceFrame]:
        """Take another gateway's presence event; return the frames for local members.

        A malformed event, or one about another node than its sender's, is ignored
        (logged). A ``gateway_lost`` event is ignored too: it is for services, and this
        gateway hears of a death from its own bus (:meth:`lost`, through
        :meth:`~wsbus.bus.HearsGateways.gateway_lost`), never on another gateway's word.
        """
        sender = envelope.sender
        if not isinstance(sender, GatewayAddress) or sender.node == self.node:
            return []
        try:
            event = msgspec.convert(envelope.content, control.PresenceEvent)
        except msgspec.ValidationError as exc:
            log.warning("a malformed presence event from gateway %s: %s", sender.node, exc)
            return []
        if event.event == "gateway_lost":
            # Taken at its word, one gateway could erase another's members here (and frame
            # their leaves) while that one is alive and well.
            return []
        if event.node != sender.node or event.group is None or event.conn_id is None:
            log.warning("gateway %s sent a presence event it cannot send: %r", sender.node, event)
            return []
        if not self.frames(event.group):
            return []
        key = (event.node, event.group)
        if event.event == "join":
            members = self._remote.get(key)
            if event.conn_id not in (members or ()):
                if self._remembered < MAX_REMOTE_MEMBERS:
                    if members is None:
                        members = self._remote[key] = {}
                    members[event.conn_id] = (event.alias, event.user)
                    self._remembered += 1
                elif not self._full_logged:
                    self._full_logged = True
                    log.warning(
                        "gateway %s remembers %d members of other gateways, its most: if "
                        "one of those gateways dies, members of its groups may miss leave "
                        "frames",
                        self.node,
                        MAX_REMOTE_MEMBERS,
                    )
            return [
                (event.group, _frame("join", event.group, event.conn_id, event.alias, event.user))
            ]
        if event.event == "leave":
            members = self._remote.get(key)
            if members is not None and members.pop(event.conn_id, None) is not None:
                self._remembered -= 1
                if not members:
                    del self._remote[key]
            return [
                (event.group, _frame("leave", event.group, event.conn_id, event.alias, event.user))
            ]
        return []

    def local(self, event: control.PresenceEvent) -> PresenceFrame | None:
        """Return the frame for local members about this gateway's own event, if any."""
        group = event.group
        if group is None or event.conn_id is None or not self.frames(group):
            return None
        return group, _event_frame(event)

    def lost(self, node: NodeId) -> list[PresenceFrame]:
        """Forget gateway ``node``'s members; return their leave frames for local members."""
        frames: list[PresenceFrame] = []
        for key in [key for key in self._remote if key[0] == node]:
            members = self._remote.pop(key)
            self._remembered -= len(members)
            group = key[1]
            for conn_id, (alias, user) in members.items():
                frames.append((group, _frame("leave", group, conn_id, alias, user)))
        return frames


def _event_frame(event: control.PresenceEvent) -> dict[str, Any]:
    """The frame content for a join or leave event (group and conn_id set)."""
    assert event.group is not None and event.conn_id is not None
    return _frame(event.event, event.group, event.conn_id, event.alias, event.user)


def _frame(
    event: str, group: str, conn_id: ConnId, alias: str | None, user: str | None
) -> dict[str, Any]:
    """The content of a ``wsbus.presence`` frame (docs/protocol.md)."""
    return {"group": group, "event": event, "conn_id": conn_id, "alias": alias, "user": user}
