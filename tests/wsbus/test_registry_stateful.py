"""A state machine that drives ClientRegistry and Router against a plain reference model.

The model is a few dicts and sets written here, sharing no code with wsbus. Each ``send``
resolves recipients with the router, checks the resolution against the model, and delivers
a per-sender sequence number to each target's inbox, so that the invariants can check that
every message reached exactly the right connections, once, in per-sender order, and never
a connection that had left.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    MultipleResults,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

from wsbus.envelope import ClientAddress, ConnId, Recipients
from wsbus.errors import AliasTaken, ConnIdTaken, InvalidName, UnknownConnection
from wsbus.registry import AliasPolicy, ClientInfo, ClientRegistry
from wsbus.router import Router
from wsbus_testing import strategies as wst

MAX_NAME = 64
LONG = "L" * 60 + "abcd"
# Small pools so that aliases collide and recipients match. The suffixed names are in the
# pool so that recipients can name what the suffix policy hands out.
ALIASES = ["n0", "n1", "n02", "n03", "n12", LONG, LONG[:63] + "2", LONG[:63] + "3"]
USERS = ["n0", "n1", "n2"]
GROUPS = ["n0", "n1", "n2", "n3"]
BAD_NAMES = ["", "a" * 65, "a b", "b\u043eb", "\u0410lice", "bob\n"]
ID_POOL = 6
NEVER_CONNECTED = ConnId("node.0")

aliases = st.sampled_from(ALIASES)
# Mostly the unsuffixed names, so that connections fight over the same alias.
wanted_aliases = st.sampled_from(["n0", LONG]) | aliases
users = wst.names(pool=len(USERS))
groups = wst.names(pool=len(GROUPS))
wanted_groups = st.sampled_from(GROUPS[:2]) | groups
bad_names = st.sampled_from(BAD_NAMES)
recipients = wst.recipients(
    # Ids are handed out in order from node.1, so the low ones are the likely open ones.
    conn_ids=st.one_of(wst.conn_ids(pool=ID_POOL), st.just(NEVER_CONNECTED)),
    # Mostly names that set_alias hands out.
    aliases=st.sampled_from(["n0", "n02", LONG, LONG[:63] + "2"]) | aliases,
    users=users,
    groups=groups,
)


@dataclass
class ModelConn:
    """What the model knows of one connection."""

    user: str | None
    alias: str | None = None
    # group -> the join stamp, a global counter: members are listed in join order.
    groups: dict[str, int] = field(default_factory=dict)

    def info(self, conn_id: ConnId) -> ClientInfo:
        ordered = tuple(sorted(self.groups, key=self.groups.__getitem__))
        return ClientInfo(conn_id, self.alias, self.user, ordered)


class RegistryMachine(RuleBasedStateMachine):
    """ClientRegistry and Router, checked against the model after every step."""

    policy: ClassVar[AliasPolicy]

    connections = Bundle[ConnId]("connections")
    departed = Bundle[ConnId]("departed")

    def __init__(self) -> None:
        super().__init__()
        self.registry = ClientRegistry(alias_policy=self.policy)
        self.router = Router(self.registry)
        # The model: open connections in connect order, and the ones that left.
        self.open: dict[ConnId, ModelConn] = {}
        self.gone: set[ConnId] = set()
        self.serial = 0
        self.stamp = 0
        # Every alias the registry ever gave, so that the invariants can look each one up.
        self.aliases_given: set[str] = set()
        # Delivery: every inbox ever opened, what a departed inbox held when it left, the
        # last sequence number of each sender, and who each message was meant for.
        self.inboxes: dict[ConnId, list[tuple[int, int]]] = {}
        self.sealed: dict[ConnId, int] = {}
        self.last_seq: dict[int, int] = {}
        self.meant_for: dict[tuple[int, int], set[ConnId]] = {}

    # -- model queries -------------------------------------------------------------------

    def owner(self, alias: str) -> ConnId | None:
        owners = [c for c, m in self.open.items() if m.alias == alias]
        assert len(owners) <= 1, f"model gave {alias!r} to {owners}"
        return owners[0] if owners else None

    def conns_of(self, user: str) -> set[ConnId]:
        return {c for c, m in self.open.items() if m.user == user}

    def members(self, group: str) -> list[ConnId]:
        stamped = [(m.groups[group], c) for c, m in self.open.items() if group in m.groups]
        return [c for _, c in sorted(stamped)]

    def expected_alias(self, conn_id: ConnId, alias: str) -> str | None:
        """The alias the connection should get, or None when it should be refused."""
        owner = self.owner(alias)
        if owner is None or owner == conn_id:
            return alias
        if self.policy is AliasPolicy.REFUSE:
            return None
        n = 2
        while True:
            suffix = str(n)
            candidate = alias[: MAX_NAME - len(suffix)] + suffix
            if self.owner(candidate) in (None, conn_id):
                return candidate
            n += 1

    # -- rules: connections --------------------------------------------------------------

    @initialize(
        target=connections,
        starters=st.lists(
            st.tuples(st.none() | users, st.none() | wanted_aliases, st.none() | wanted_groups),
            max_size=4,
        ),
    )
    def connect_some(
        self, starters: list[tuple[str | None, str | None, str | None]]
    ) -> MultipleResults[ConnId]:
        # Start with a few connections in a few groups, some with aliases, so that early
        # sends reach someone.
        conn_ids = []
        for user, alias, group in starters:
            conn_id = self.open_connection(user)
            if alias is not None:
                self.set_alias(conn_id, alias)
            if group is not None:
                self.join(conn_id, group)
            conn_ids.append(conn_id)
        return multiple(*conn_ids)

    @rule(target=connections, user=st.none() | users)
    def connect(self, user: str | None) -> ConnId:
        return self.open_connection(user)

    def open_connection(self, user: str | None) -> ConnId:
        self.serial += 1
        conn_id = ConnId(f"node.{self.serial:x}")
        assert conn_id not in self.gone, "the test reused an id"
        assert self.registry.connect(conn_id, user=user) == ClientAddress(conn_id, None, user)
        self.open[conn_id] = ModelConn(user)
        self.inboxes[conn_id] = []
        return conn_id

    @rule(conn_id=connections, name=bad_names)
    def refuse_bad_requests(self, conn_id: ConnId, name: str) -> None:
        # Each is refused and changes nothing: the invariants check that.
        fresh = ConnId(f"node.{self.serial + 1:x}")
        with pytest.raises(InvalidName):
            self.registry.connect(fresh, user=name)
        assert fresh not in self.registry
        with pytest.raises(ConnIdTaken, match="already registered"):
            self.registry.connect(conn_id, user="n0")
        with pytest.raises(InvalidName):
            self.registry.set_alias(conn_id, name)
        with pytest.raises(InvalidName):
            self.registry.join(conn_id, name)

    @rule(target=departed, conn_id=consumes(connections))
    def disconnect(self, conn_id: ConnId) -> ConnId:
        model = self.open.pop(conn_id)
        assert self.registry.disconnect(conn_id) == model.info(conn_id)
        self.gone.add(conn_id)
        self.sealed[conn_id] = len(self.inboxes[conn_id])
        return conn_id

    @rule(conn_id=departed | st.just(NEVER_CONNECTED), alias=aliases, group=groups)
    def use_unknown_connection(self, conn_id: ConnId, alias: str, group: str) -> None:
        for call in (
            lambda: self.registry.disconnect(conn_id),
            lambda: self.registry.set_alias(conn_id, alias),
            lambda: self.registry.clear_alias(conn_id),
            lambda: self.registry.join(conn_id, group),
            lambda: self.registry.leave(conn_id, group),
            lambda: self.registry.info(conn_id),
            lambda: self.registry.address(conn_id),
        ):
            with pytest.raises(UnknownConnection):
                call()

    # -- rules: aliases ------------------------------------------------------------------

    @rule(conn_id=connections, alias=wanted_aliases)
    def set_alias(self, conn_id: ConnId, alias: str) -> None:
        expected = self.expected_alias(conn_id, alias)
        if expected is None:
            with pytest.raises(AliasTaken):
                self.registry.set_alias(conn_id, alias)
            return
        assert self.registry.set_alias(conn_id, alias) == expected
        self.open[conn_id].alias = expected
        self.aliases_given.add(expected)

    @rule(conn_id=connections)
    def clear_alias(self, conn_id: ConnId) -> None:
        self.registry.clear_alias(conn_id)
        self.open[conn_id].alias = None

    # -- rules: groups -------------------------------------------------------------------

    @rule(conn_id=connections, group=wanted_groups)
    def join(self, conn_id: ConnId, group: str) -> None:
        model = self.open[conn_id]
        expected = group not in model.groups
        assert self.registry.join(conn_id, group) is expected
        if expected:
            self.stamp += 1
            model.groups[group] = self.stamp

    @rule(conn_id=connections, group=groups)
    def leave(self, conn_id: ConnId, group: str) -> None:
        model = self.open[conn_id]
        expected = group in model.groups
        assert self.registry.leave(conn_id, group) is expected
        model.groups.pop(group, None)

    # -- rules: delivery -----------------------------------------------------------------

    @rule(sender=st.integers(0, 2), to=recipients)
    def send(self, sender: int, to: Recipients) -> None:
        alias_owners = {a: self.owner(a) for a in to.aliases}
        expected: set[ConnId] = {c for c in to.conn_ids if c in self.open}
        expected |= {o for o in alias_owners.values() if o is not None}
        for user in to.users:
            expected |= self.conns_of(user)
        for group in to.groups:
            expected |= set(self.members(group))
        if to.everyone:
            expected |= set(self.open)
        expected -= set(to.exclude)
        unmatched = Recipients(
            conn_ids=tuple(c for c in to.conn_ids if c not in self.open),
            aliases=tuple(a for a in to.aliases if alias_owners[a] is None),
            users=tuple(u for u in to.users if not self.conns_of(u)),
            groups=tuple(g for g in to.groups if not self.members(g)),
            everyone=to.everyone and not self.open,
        )

        resolution = self.router.resolve(to)

        assert len(resolution.targets) == len(set(resolution.targets)), "a target twice"
        assert set(resolution.targets) == expected
        assert resolution.unmatched == (None if unmatched == Recipients() else unmatched)

        seq = self.last_seq.get(sender, 0) + 1
        self.last_seq[sender] = seq
        self.meant_for[sender, seq] = expected
        for conn_id in resolution.targets:
            assert conn_id in self.open, f"{conn_id} is not connected"
            self.inboxes[conn_id].append((sender, seq))

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def indices_agree_with_the_model(self) -> None:
        registry = self.registry
        assert len(registry) == len(self.open)
        assert list(registry) == list(self.open)
        assert registry.clients() == [m.info(c) for c, m in self.open.items()]
        for conn_id, model in self.open.items():
            assert conn_id in registry
            assert registry.info(conn_id) == model.info(conn_id)
            assert registry.address(conn_id) == ClientAddress(conn_id, model.alias, model.user)
        for conn_id in self.gone:
            assert conn_id not in registry
        for alias in self.aliases_given | set(ALIASES):
            assert registry.by_alias(alias) == self.owner(alias)
        for user in USERS:
            listed = list(registry.connections_of(user))
            assert len(listed) == len(set(listed))
            assert set(listed) == self.conns_of(user)
        for group in GROUPS:
            assert list(registry.members(group)) == self.members(group)
        live_groups = {g for m in self.open.values() for g in m.groups}
        assert len(registry.groups()) == len(live_groups)
        assert set(registry.groups()) == live_groups

    @invariant()
    def departed_inboxes_never_receive(self) -> None:
        for conn_id, length in self.sealed.items():
            assert len(self.inboxes[conn_id]) == length, f"{conn_id} received after leaving"

    @invariant()
    def every_message_reached_exactly_its_targets_once(self) -> None:
        counts: Counter[tuple[tuple[int, int], ConnId]] = Counter()
        for conn_id, inbox in self.inboxes.items():
            for message in inbox:
                counts[message, conn_id] += 1
        assert all(n == 1 for n in counts.values()), "a message reached a connection twice"
        reached: dict[tuple[int, int], set[ConnId]] = {m: set() for m in self.meant_for}
        for message, conn_id in counts:
            reached[message].add(conn_id)
        assert reached == self.meant_for

    @invariant()
    def sequence_numbers_increase_per_sender(self) -> None:
        for inbox in self.inboxes.values():
            last: dict[int, int] = {}
            for sender, seq in inbox:
                assert seq > last.get(sender, 0)
                last[sender] = seq


class RefuseMachine(RegistryMachine):
    """The state machine with AliasPolicy.REFUSE."""

    policy = AliasPolicy.REFUSE


class SuffixMachine(RegistryMachine):
    """The state machine with AliasPolicy.SUFFIX."""

    policy = AliasPolicy.SUFFIX


SETTINGS = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.parametrize("machine", [RefuseMachine, SuffixMachine], ids=["refuse", "suffix"])
def test_registry_and_router_match_the_model(machine: type[RegistryMachine]) -> None:
    run_state_machine_as_test(machine, settings=SETTINGS)
