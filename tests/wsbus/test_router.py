"""Tests of wsbus.router: Router.resolve turns recipients into connections."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsbus.envelope import ConnId, Recipients
from wsbus.errors import RegistryError
from wsbus.registry import AliasPolicy, ClientRegistry
from wsbus.router import Resolution, Router
from wsbus_testing import strategies as wst

A = ConnId("node.1")
B = ConnId("node.2")
C = ConnId("node.3")
D = ConnId("node.4")
GONE = ConnId("node.ff")


def resolve(registry: ClientRegistry, **recipients: Any) -> Resolution:
    return Router(registry).resolve(Recipients(**recipients))


@pytest.fixture
def registry() -> ClientRegistry:
    """Four connections: A and C are alice, B is bob, D is anonymous.

    Aliases: A "ally", B "bobby". Groups: "red" = [B, A], "blue" = [A, C].
    """
    registry = ClientRegistry()
    registry.connect(A, user="alice")
    registry.connect(B, user="bob")
    registry.connect(C, user="alice")
    registry.connect(D)
    registry.set_alias(A, "ally")
    registry.set_alias(B, "bobby")
    registry.join(B, "red")
    registry.join(A, "red")
    registry.join(A, "blue")
    registry.join(C, "blue")
    return registry


# -- each kind -------------------------------------------------------------------------------


def test_nobody_resolves_to_nothing_and_reports_nothing(registry: ClientRegistry) -> None:
    assert resolve(registry) == Resolution([], None)
    assert resolve(ClientRegistry()) == Resolution([], None)


def test_conn_ids(registry: ClientRegistry) -> None:
    assert resolve(registry, conn_ids=(C, A)) == Resolution([C, A], None)


def test_aliases(registry: ClientRegistry) -> None:
    assert resolve(registry, aliases=("bobby", "ally")) == Resolution([B, A], None)


def test_users_reach_all_their_connections(registry: ClientRegistry) -> None:
    assert resolve(registry, users=("alice",)) == Resolution([A, C], None)
    assert resolve(registry, users=("bob",)) == Resolution([B], None)


def test_groups_reach_their_members_in_join_order(registry: ClientRegistry) -> None:
    assert resolve(registry, groups=("red",)) == Resolution([B, A], None)
    assert resolve(registry, groups=("blue",)) == Resolution([A, C], None)


def test_everyone_reaches_every_connection_in_connect_order(registry: ClientRegistry) -> None:
    assert resolve(registry, everyone=True) == Resolution([A, B, C, D], None)


def test_resolution_follows_the_registry_as_it_changes(registry: ClientRegistry) -> None:
    router = Router(registry)
    recipients = Recipients(aliases=("ally",), groups=("red",))
    assert router.resolve(recipients) == Resolution([A, B], None)
    registry.disconnect(A)
    assert router.resolve(recipients) == Resolution([B], Recipients(aliases=("ally",)))
    registry.leave(B, "red")
    assert router.resolve(recipients) == Resolution(
        [], Recipients(aliases=("ally",), groups=("red",))
    )


# -- each connection once --------------------------------------------------------------------


def test_a_client_in_two_groups_appears_once(registry: ClientRegistry) -> None:
    resolution = resolve(registry, groups=("red", "blue"))
    assert resolution == Resolution([B, A, C], None)


def test_a_client_named_every_way_appears_once(registry: ClientRegistry) -> None:
    resolution = resolve(
        registry,
        conn_ids=(A, A),
        aliases=("ally", "ally"),
        users=("alice", "alice"),
        groups=("red", "blue", "red"),
    )
    assert resolution == Resolution([A, C, B], None)


# -- exclude ---------------------------------------------------------------------------------


def test_exclude_removes_whatever_matched(registry: ClientRegistry) -> None:
    assert resolve(registry, everyone=True, exclude=(B, D)) == Resolution([A, C], None)
    assert resolve(registry, conn_ids=(A, B), exclude=(A,)) == Resolution([B], None)
    assert resolve(registry, aliases=("ally",), exclude=(A,)) == Resolution([], None)
    assert resolve(registry, users=("alice",), exclude=(C,)) == Resolution([A], None)
    assert resolve(registry, groups=("red", "blue"), exclude=(A,)) == Resolution([B, C], None)


def test_excluded_connections_are_never_reported(registry: ClientRegistry) -> None:
    # Each recipient matched an open connection; excluding it is not failing.
    resolution = resolve(
        registry,
        conn_ids=(B,),
        aliases=("ally",),
        users=("alice",),
        groups=("blue",),
        everyone=True,
        exclude=(A, B, C, D),
    )
    assert resolution == Resolution([], None)


def test_excluding_an_unknown_id_changes_nothing(registry: ClientRegistry) -> None:
    assert resolve(registry, users=("bob",), exclude=(GONE,)) == Resolution([B], None)
    assert resolve(registry, exclude=(GONE, A)) == Resolution([], None)


def test_everyone_excluded_is_not_everyone_unmatched(registry: ClientRegistry) -> None:
    resolution = resolve(registry, everyone=True, exclude=(A, B, C, D))
    assert resolution == Resolution([], None)


# -- order -----------------------------------------------------------------------------------


def test_order_is_conn_ids_then_aliases_users_groups_as_given() -> None:
    registry = ClientRegistry()
    for n in range(1, 9):
        registry.connect(ConnId(f"node.{n}"), user="u" if n in (5, 2) else None)
    c = [ConnId(f"node.{n}") for n in range(9)]  # c[n] is node.n
    registry.set_alias(c[7], "seven")
    registry.set_alias(c[3], "three")
    registry.join(c[8], "g")
    registry.join(c[1], "g")
    registry.join(c[6], "h")
    resolution = resolve(
        registry,
        groups=("h", "g"),
        users=("u",),
        aliases=("seven", "three"),
        conn_ids=(c[4], c[8]),
    )
    # node.8 is named first as a conn id, so its group membership adds nothing later.
    assert resolution.targets == [c[4], c[8], c[7], c[3], c[2], c[5], c[6], c[1]]
    assert resolution.unmatched is None


def test_everyone_keeps_connect_order_even_with_named_recipients(
    registry: ClientRegistry,
) -> None:
    resolution = resolve(registry, conn_ids=(D, C), groups=("red",), everyone=True)
    assert resolution == Resolution([A, B, C, D], None)


# -- unmatched -------------------------------------------------------------------------------


def test_unmatched_names_exactly_what_matched_nothing(registry: ClientRegistry) -> None:
    resolution = resolve(
        registry,
        conn_ids=(GONE, A),
        aliases=("ally", "nobody"),
        users=("carol", "bob"),
        groups=("red", "green"),
    )
    assert resolution.targets == [A, B]
    assert resolution.unmatched == Recipients(
        conn_ids=(GONE,), aliases=("nobody",), users=("carol",), groups=("green",)
    )


def test_every_kind_unmatched(registry: ClientRegistry) -> None:
    recipients = Recipients(
        conn_ids=(GONE,), aliases=("x",), users=("y",), groups=("z",), exclude=(A,)
    )
    resolution = Router(registry).resolve(recipients)
    assert resolution.targets == []
    # ``exclude`` is not a recipient, so it is never echoed back.
    assert resolution.unmatched == Recipients(
        conn_ids=(GONE,), aliases=("x",), users=("y",), groups=("z",)
    )


def test_everyone_with_no_connections_reports_everyone() -> None:
    assert resolve(ClientRegistry(), everyone=True) == Resolution([], Recipients(everyone=True))


def test_everyone_after_the_last_connection_left_reports_everyone() -> None:
    registry = ClientRegistry()
    registry.connect(A)
    router = Router(registry)
    assert router.resolve(Recipients(everyone=True)) == Resolution([A], None)
    registry.disconnect(A)
    assert router.resolve(Recipients(everyone=True)) == Resolution([], Recipients(everyone=True))


def test_a_departed_connection_is_unmatched_by_every_name() -> None:
    registry = ClientRegistry()
    registry.connect(A, user="alice")
    registry.set_alias(A, "ally")
    registry.join(A, "g")
    registry.disconnect(A)
    recipients = Recipients(conn_ids=(A,), aliases=("ally",), users=("alice",), groups=("g",))
    assert Router(registry).resolve(recipients) == Resolution([], recipients)


def test_an_emptied_group_or_user_is_unmatched(registry: ClientRegistry) -> None:
    registry.leave(A, "blue")
    registry.leave(C, "blue")
    registry.disconnect(B)
    resolution = resolve(registry, users=("bob",), groups=("blue", "red"))
    assert resolution == Resolution([A], Recipients(users=("bob",), groups=("blue",)))


def test_unmatched_with_suffixed_aliases() -> None:
    registry = ClientRegistry(alias_policy=AliasPolicy.SUFFIX)
    registry.connect(A)
    registry.connect(B)
    registry.set_alias(A, "bob")
    assert registry.set_alias(B, "bob") == "bob2"
    resolution = resolve(registry, aliases=("bob2", "bob3", "bob"))
    assert resolution == Resolution([B, A], Recipients(aliases=("bob3",)))


# -- property --------------------------------------------------------------------------------


def build_registry(operations: list[tuple[Any, ...]], policy: AliasPolicy) -> ClientRegistry:
    registry = ClientRegistry(alias_policy=policy)
    for name, conn_id, *args in operations:
        try:
            if name == "connect":
                registry.connect(conn_id, user=args[0])
            elif name == "disconnect":
                registry.disconnect(conn_id)
            else:
                getattr(registry, name)(conn_id, *args)
        except (RegistryError, ValueError):
            pass
    return registry


@given(
    operations=st.lists(wst.registry_operations(), max_size=30),
    policy=st.sampled_from(AliasPolicy),
    recipients=wst.recipients(),
)
def test_targets_are_the_union_minus_exclude(
    operations: list[tuple[Any, ...]], policy: AliasPolicy, recipients: Recipients
) -> None:
    registry = build_registry(operations, policy)
    # Computed from the clients() snapshots, not from the indices the router reads.
    clients = registry.clients()
    open_ids = {info.conn_id for info in clients}
    alias_owner = {info.alias: info.conn_id for info in clients if info.alias is not None}
    user_conns: dict[str, set[ConnId]] = {}
    group_conns: dict[str, set[ConnId]] = {}
    for info in clients:
        if info.user is not None:
            user_conns.setdefault(info.user, set()).add(info.conn_id)
        for group in info.groups:
            group_conns.setdefault(group, set()).add(info.conn_id)

    expected: set[ConnId] = {c for c in recipients.conn_ids if c in open_ids}
    expected |= {alias_owner[a] for a in recipients.aliases if a in alias_owner}
    for user in recipients.users:
        expected |= user_conns.get(user, set())
    for group in recipients.groups:
        expected |= group_conns.get(group, set())
    if recipients.everyone:
        expected |= open_ids
    expected -= set(recipients.exclude)

    missing = Recipients(
        conn_ids=tuple(c for c in recipients.conn_ids if c not in open_ids),
        aliases=tuple(a for a in recipients.aliases if a not in alias_owner),
        users=tuple(u for u in recipients.users if u not in user_conns),
        groups=tuple(g for g in recipients.groups if g not in group_conns),
        everyone=recipients.everyone and not open_ids,
    )

    targets, unmatched = Router(registry).resolve(recipients)

    assert len(targets) == len(set(targets))
    assert set(targets) == expected
    assert unmatched == (None if missing == Recipients() else missing)
    if recipients.everyone:
        assert targets == [c for c in registry if c in expected]
    else:
        # Named connections come first, in the order given.
        named = list(dict.fromkeys(c for c in recipients.conn_ids if c in expected))
        assert targets[: len(named)] == named
