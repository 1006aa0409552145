"""ClientRegistry: who is connected, under which alias and user, in which groups.

Pure bookkeeping: no I/O, no clock, nothing to await. Every lookup is O(1) and every index is
cleaned when a connection leaves, so the registry never names a departed connection.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Collection, Iterator, Mapping
from types import MappingProxyType
from typing import Final

import msgspec

from .envelope import ClientAddress, ConnId
from .errors import AliasTaken, ConfigError, ConnIdTaken, InvalidName, UnknownConnection

__all__ = ["DEFAULT_NAME_PATTERN", "AliasPolicy", "ClientInfo", "ClientRegistry"]

DEFAULT_NAME_PATTERN: Final = r"[A-Za-z0-9_.@-]{1,64}"
"""Aliases, users and group names: 1-64 ASCII letters, digits and ``_ . @ -``.

ASCII by default so that look-alike letters from other scripts cannot pass one user off as
another; pass ``name_pattern`` to widen it.
"""


class AliasPolicy(enum.StrEnum):
    """What :meth:`ClientRegistry.set_alias` does when another connection has the alias."""

    REFUSE = "refuse"
    """Raise :class:`~wsbus.errors.AliasTaken`."""

    SUFFIX = "suffix"
    """Give the first free ``alias2``, ``alias3``, ... as the original login did."""


class ClientInfo(msgspec.Struct, frozen=True, omit_defaults=True):
    """A snapshot of one connection, as services see it when they list clients.

    Attributes:
        conn_id: the connection id.
        alias: the connection's alias, if one is set.
        user: the authenticated user, if any.
        groups: the groups the connection is in, in the order it joined them.
    """

    conn_id: ConnId
    alias: str | None = None
    user: str | None = None
    groups: tuple[str, ...] = ()


class _Entry:
    __slots__ = ("alias", "conn_id", "groups", "user")

    def __init__(self, conn_id: ConnId, user: str | None) -> None:
        self.conn_id = conn_id
        self.user = user
        self.alias: str | None = None
        # A dict used as an ordered set: join order is kept for listings. Made with the
        # first join: most connections are in no group (memory per idle connection).
        self.groups: dict[str, None] | None = None


class ClientRegistry:
    """The connections of one gateway node, with aliases, users and groups.

    Args:
        alias_policy: what to do when an alias is taken.
        name_pattern: a regular expression every alias, user and group name must match in
            full.
    """

    def __init__(
        self,
        *,
        alias_policy: AliasPolicy = AliasPolicy.REFUSE,
        name_pattern: str = DEFAULT_NAME_PATTERN,
    ) -> None:
        self.alias_policy = AliasPolicy(alias_policy)
        try:
            self._name_re = re.compile(name_pattern)
        except re.error as exc:
            raise ConfigError(f"name_pattern is not a valid regular expression: {exc}") from exc
        self._entries: dict[ConnId, _Entry] = {}
        # The one place a connection's stamped address is kept; the gateway's sessions read
        # it, through the read-only view, for every client frame.
        self._addresses: dict[ConnId, ClientAddress] = {}
        self._address_view: Mapping[ConnId, ClientAddress] = MappingProxyType(self._addresses)
        self._aliases: dict[str, ConnId] = {}
        self._users: dict[str, dict[ConnId, None]] = {}
        self._groups: dict[str, dict[ConnId, None]] = {}

    # -- connections ---------------------------------------------------------------------

    def connect(self, conn_id: ConnId, *, user: str | None = None) -> ClientAddress:
        """Add a connection and return its address.

        Raises:
            ConnIdTaken: the id is already registered (ids are never reused).
            InvalidName: ``user`` does not match the name pattern.
        """
        if conn_id in self._entries:
            raise ConnIdTaken(conn_id)
        if user is not None:
            self.check_name("user", user)
        entry = _Entry(conn_id, user)
        self._entries[conn_id] = entry
        if user is not None:
            self._users.setdefault(user, {})[conn_id] = None
        address = self._addresses[conn_id] = ClientAddress(conn_id, None, user)
        return address

    def disconnect(self, conn_id: ConnId) -> ClientInfo:
        """Remove a connection from every index and return what it was.

        Raises:
            UnknownConnection: no such connection.
        """
        entry = self._entries.pop(conn_id, None)
        if entry is None:
            raise UnknownConnection(conn_id)
        info = self._info(entry)
        del self._addresses[conn_id]
        if entry.alias is not None:
            del self._aliases[entry.alias]
        if entry.user is not None:
            _discard(self._users, entry.user, conn_id)
        for group in entry.groups or ():
            _discard(self._groups, group, conn_id)
        return info

    def __contains__(self, conn_id: object) -> bool:
        return conn_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[ConnId]:
        """Iterate over connection ids in the order they connected."""
        return iter(self._entries)

    def address(self, conn_id: ConnId) -> ClientAddress:
        """Return the address the gateway stamps on this connection's messages.

        Raises:
            UnknownConnection: no such connection.
        """
        try:
            return self._addresses[conn_id]
        except KeyError:
            raise UnknownConnection(conn_id) from None

    @property
    def addresses(self) -> Mapping[ConnId, ClientAddress]:
        """Every connection's stamped address, by id: a live, read-only view.

        What :meth:`address` returns, without a call: the gateway's sessions read it for
        every client frame, and see an alias change at once.
        """
        return self._address_view

    # -- aliases -------------------------------------------------------------------------

    def set_alias(self, conn_id: ConnId, alias: str, *, exact: bool = False) -> str:
        """Give a connection an alias, replacing any it had; return the alias it got.

        With :attr:`AliasPolicy.SUFFIX` a taken alias gets the first free numeric suffix,
        so the alias returned may differ from the one asked for.

        Args:
            conn_id: the connection.
            alias: the alias asked for.
            exact: give exactly ``alias`` or raise AliasTaken, whatever the policy (a
                gateway that claimed ``alias`` on its bus sets what it claimed).

        Raises:
            UnknownConnection: no such connection.
            InvalidName: the alias does not match the name pattern.
            AliasTaken: another connection has it and the policy is to refuse.
        """
        entry = self._entry(conn_id)
        self.check_name("alias", alias)
        owner = self._aliases.get(alias)
        if owner is not None and owner != conn_id:
            if exact or self.alias_policy is AliasPolicy.REFUSE:
                raise AliasTaken(alias)
            alias = self._free_alias(alias, conn_id)
        self._clear_alias(entry)
        entry.alias = alias
        self._addresses[conn_id] = ClientAddress(conn_id, alias, entry.user)
        self._aliases[alias] = conn_id
        return alias

    def clear_alias(self, conn_id: ConnId) -> None:
        """Remove a connection's alias, if it has one.

        Raises:
            UnknownConnection: no such connection.
        """
        entry = self._entry(conn_id)
        self._clear_alias(entry)
        self._addresses[conn_id] = ClientAddress(conn_id, None, entry.user)

    def by_alias(self, alias: str) -> ConnId | None:
        """Return the connection that has this alias, or None."""
        return self._aliases.get(alias)

    def _clear_alias(self, entry: _Entry) -> None:
        if entry.alias is not None:
            del self._aliases[entry.alias]
            entry.alias = None

    def _free_alias(self, alias: str, conn_id: ConnId) -> str:
        for candidate in self._suffixed(alias, conn_id):
            return candidate
        raise AssertionError("unreachable: the suffixes never end")  # pragma: no cover

    def alias_candidates(self, conn_id: ConnId, alias: str) -> Iterator[str]:
        """Return the aliases to try, in turn, when ``conn_id`` asks for ``alias``.

        For a gateway whose bus keeps aliases unique across gateways: it claims each on
        the bus until one is won. ``alias`` first; then, with :attr:`AliasPolicy.SUFFIX`,
        ``alias2``, ``alias3``, ... (shortened to fit the name pattern), without end. Those
        another connection here holds are skipped (the bus would refuse them).

        Raises:
            InvalidName: ``alias`` does not match the name pattern (at once, not when the
                iterator is first read).
        """
        self.check_name("alias", alias)
        return self._candidates(conn_id, alias)

    def _candidates(self, conn_id: ConnId, alias: str) -> Iterator[str]:
        if self._aliases.get(alias, conn_id) == conn_id:
            yield alias
        if self.alias_policy is AliasPolicy.SUFFIX:
            yield from self._suffixed(alias, conn_id)

    def _suffixed(self, alias: str, conn_id: ConnId) -> Iterator[str]:
        """``alias2``, ``alias3``, ... that no other connection here holds."""
        n = 2
        while True:
            suffix = str(n)
            base = alias
            candidate = base + suffix
            while self._name_re.fullmatch(candidate) is None and len(base) > 1:
                # Too long for the pattern: shorten the base just enough for the suffix.
                base = base[:-1]
                candidate = base + suffix
            if self._aliases.get(candidate, conn_id) == conn_id:
                self.check_name("alias", candidate)
                yield candidate
            n += 1

    # -- users ---------------------------------------------------------------------------

    def connections_of(self, user: str) -> Collection[ConnId]:
        """Return the open connections of an authenticated user (empty when none).

        A live view, not a copy: copy it before changing the registry while iterating.
        """
        return self._users.get(user, {}).keys()

    # -- groups --------------------------------------------------------------------------

    def join(self, conn_id: ConnId, group: str) -> bool:
        """Add a connection to a group; return False when it was in it already.

        Raises:
            UnknownConnection: no such connection.
            InvalidName: the group name does not match the name pattern.
        """
        entry = self._entry(conn_id)
        self.check_name("group", group)
        groups = entry.groups
        if groups is None:
            groups = entry.groups = {}
        elif group in groups:
            return False
        groups[group] = None
        self._groups.setdefault(group, {})[conn_id] = None
        return True

    def leave(self, conn_id: ConnId, group: str) -> bool:
        """Take a connection out of a group; return False when it was not in it.

        Raises:
            UnknownConnection: no such connection.
        """
        entry = self._entry(conn_id)
        groups = entry.groups
        if not groups or group not in groups:
            return False
        del groups[group]
        _discard(self._groups, group, conn_id)
        return True

    def members(self, group: str) -> Collection[ConnId]:
        """Return the connections in a group, in the order they joined (empty when none).

        A live view, not a copy: copy it before changing the registry while iterating.
        """
        return self._groups.get(group, {}).keys()

    def groups(self) -> Collection[str]:
        """Return the names of the groups that have at least one member (a live view)."""
        return self._groups.keys()

    # -- listing -------------------------------------------------------------------------

    def info(self, conn_id: ConnId) -> ClientInfo:
        """Return a snapshot of one connection.

        Raises:
            UnknownConnection: no such connection.
        """
        return self._info(self._entry(conn_id))

    def clients(self) -> list[ClientInfo]:
        """Return a snapshot of every connection, in the order they connected."""
        return [self._info(entry) for entry in self._entries.values()]

    # -- helpers -------------------------------------------------------------------------

    def _entry(self, conn_id: ConnId) -> _Entry:
        try:
            return self._entries[conn_id]
        except KeyError:
            raise UnknownConnection(conn_id) from None

    def check_name(self, kind: str, name: str) -> None:
        """Check an alias, user or group name against the name pattern.

        Raises:
            InvalidName: it does not match (``kind`` says what it was meant to be).
        """
        if type(name) is not str or self._name_re.fullmatch(name) is None:
            raise InvalidName(kind, str(name))

    @staticmethod
    def _info(entry: _Entry) -> ClientInfo:
        groups = tuple(entry.groups) if entry.groups else ()
        return ClientInfo(entry.conn_id, entry.alias, entry.user, groups)


def _discard(index: dict[str, dict[ConnId, None]], key: str, conn_id: ConnId) -> None:
    """Remove one connection from an index entry, and the entry when it empties."""
    members = index[key]
    del members[conn_id]
    if not members:
        del index[key]
