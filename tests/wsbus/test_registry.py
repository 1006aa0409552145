"""Tests of wsbus.registry: ClientRegistry's connections, aliases, users and groups."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsbus.envelope import ClientAddress, ConnId
from wsbus.errors import (
    AliasTaken,
    ConfigError,
    ConnIdTaken,
    InvalidName,
    RegistryError,
    UnknownConnection,
)
from wsbus.registry import DEFAULT_NAME_PATTERN, AliasPolicy, ClientInfo, ClientRegistry
from wsbus_testing import strategies as wst

A = ConnId("node.1")
B = ConnId("node.2")
C = ConnId("node.3")
GONE = ConnId("node.ff")

BAD_NAMES = [
    pytest.param("", id="empty"),
    pytest.param("a" * 65, id="65-chars"),
    pytest.param("a b", id="space"),
    pytest.param("b\u043eb", id="cyrillic-o"),
    pytest.param("\u0410lice", id="cyrillic-A"),
    pytest.param("\u0455am", id="cyrillic-dze"),
    pytest.param("\uff42ob", id="fullwidth-b"),
    pytest.param("bob\u200b", id="zero-width-space"),
    pytest.param("bob\n", id="trailing-newline"),
    pytest.param("bob!", id="punctuation"),
    pytest.param("b/ob", id="slash"),
    pytest.param("\u0661", id="arabic-digit"),
]

GOOD_NAMES = [
    pytest.param("a", id="one-char"),
    pytest.param("a" * 64, id="64-chars"),
    pytest.param("_.@-", id="punctuation"),
    pytest.param("Bob.Smith@example-1_2", id="mixed"),
    pytest.param("0123456789", id="digits"),
]

_NAME_RE = re.compile(DEFAULT_NAME_PATTERN)
MAX_NAME = 64


def registry_with(*conn_ids: ConnId, policy: AliasPolicy = AliasPolicy.REFUSE) -> ClientRegistry:
    registry = ClientRegistry(alias_policy=policy)
    for conn_id in conn_ids:
        registry.connect(conn_id)
    return registry


def assert_forgotten(registry: ClientRegistry, conn_id: ConnId, info: ClientInfo) -> None:
    """Assert that no index of ``registry`` still names ``conn_id`` (which was ``info``)."""
    assert conn_id not in registry
    assert conn_id not in list(registry)
    assert all(c.conn_id != conn_id for c in registry.clients())
    if info.alias is not None:
        assert registry.by_alias(info.alias) is None
    if info.user is not None:
        assert conn_id not in registry.connections_of(info.user)
    for group in info.groups:
        assert conn_id not in registry.members(group)
        if not registry.members(group):
            assert group not in registry.groups()
    with pytest.raises(UnknownConnection):
        registry.info(conn_id)


# -- connections -----------------------------------------------------------------------------


def test_connect_registers_and_returns_the_address() -> None:
    registry = ClientRegistry()
    assert registry.connect(A) == ClientAddress(A)
    assert registry.connect(B, user="bob") == ClientAddress(B, None, "bob")
    assert A in registry and B in registry
    assert len(registry) == 2
    assert registry.address(B) == ClientAddress(B, None, "bob")
    assert registry.info(A) == ClientInfo(A)


def test_iteration_and_clients_follow_connect_order() -> None:
    registry = registry_with(C, A, B)
    assert list(registry) == [C, A, B]
    assert [info.conn_id for info in registry.clients()] == [C, A, B]


def test_connecting_a_registered_id_again_is_refused_and_keeps_the_first() -> None:
    registry = ClientRegistry()
    registry.connect(A, user="alice")
    with pytest.raises(ConnIdTaken, match="already registered"):
        registry.connect(A, user="mallory")
    assert len(registry) == 1
    assert registry.info(A) == ClientInfo(A, user="alice")
    assert registry.connections_of("mallory") == set()


def test_contains_is_false_for_non_ids() -> None:
    registry = registry_with(A)
    assert 1 not in registry
    assert None not in registry
    assert "node.2" not in registry


def test_disconnect_returns_what_the_connection_was() -> None:
    registry = ClientRegistry()
    registry.connect(A, user="alice")
    registry.set_alias(A, "ally")
    registry.join(A, "g2")
    registry.join(A, "g1")
    info = registry.disconnect(A)
    assert info == ClientInfo(A, alias="ally", user="alice", groups=("g2", "g1"))
    assert len(registry) == 0


def test_disconnect_cleans_every_index() -> None:
    registry = ClientRegistry()
    registry.connect(A, user="alice")
    registry.connect(B, user="alice")
    registry.set_alias(A, "ally")
    registry.join(A, "solo")
    registry.join(A, "shared")
    registry.join(B, "shared")

    info = registry.disconnect(A)

    assert_forgotten(registry, A, info)
    assert registry.by_alias("ally") is None
    assert list(registry.connections_of("alice")) == [B]
    assert list(registry.members("shared")) == [B]
    assert list(registry.members("solo")) == []
    assert set(registry.groups()) == {"shared"}

    info = registry.disconnect(B)

    assert_forgotten(registry, B, info)
    assert list(registry.connections_of("alice")) == []
    assert list(registry.groups()) == []
    assert registry.clients() == []


def test_disconnect_unknown_connection_raises() -> None:
    registry = registry_with(A)
    with pytest.raises(UnknownConnection) as excinfo:
        registry.disconnect(GONE)
    assert excinfo.value.conn_id == GONE
    assert isinstance(excinfo.value, LookupError)
    assert list(registry) == [A]


def test_disconnect_twice_raises_the_second_time() -> None:
    registry = registry_with(A, B)
    registry.disconnect(A)
    with pytest.raises(UnknownConnection):
        registry.disconnect(A)
    assert list(registry) == [B]


def test_a_freed_alias_can_be_taken_by_another_connection() -> None:
    registry = registry_with(A, B)
    registry.set_alias(A, "bob")
    registry.disconnect(A)
    assert registry.set_alias(B, "bob") == "bob"
    assert registry.by_alias("bob") == B


_OPERATIONS: dict[str, Callable[[ClientRegistry, ConnId], object]] = {
    "disconnect": lambda r, c: r.disconnect(c),
    "address": lambda r, c: r.address(c),
    "info": lambda r, c: r.info(c),
    "set_alias": lambda r, c: r.set_alias(c, "bob"),
    "set_alias_invalid": lambda r, c: r.set_alias(c, "not valid"),
    "clear_alias": lambda r, c: r.clear_alias(c),
    "join": lambda r, c: r.join(c, "g"),
    "leave": lambda r, c: r.leave(c, "g"),
}


@pytest.mark.parametrize("operation", sorted(_OPERATIONS))
@pytest.mark.parametrize("departed", [False, True], ids=["never-connected", "departed"])
def test_operations_on_unknown_connections_raise(operation: str, departed: bool) -> None:
    registry = registry_with(A, B)
    registry.join(A, "g")
    if departed:
        registry.join(B, "g")
        registry.set_alias(B, "other")
        registry.disconnect(B)
    unknown = B if departed else GONE
    before = registry.clients()
    with pytest.raises(UnknownConnection) as excinfo:
        _OPERATIONS[operation](registry, unknown)
    assert excinfo.value.conn_id == unknown
    assert registry.clients() == before
    assert list(registry.members("g")) == [A]
    assert registry.by_alias("bob") is None


# -- names -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BAD_NAMES)
def test_connect_refuses_a_bad_user_name_and_registers_nothing(name: str) -> None:
    registry = ClientRegistry()
    with pytest.raises(InvalidName) as excinfo:
        registry.connect(A, user=name)
    assert (excinfo.value.kind, excinfo.value.name) == ("user", name)
    assert A not in registry
    assert len(registry) == 0
    assert list(registry.connections_of(name)) == []
    # The id was never registered, so it can still connect.
    registry.connect(A)
    assert A in registry


@pytest.mark.parametrize("name", BAD_NAMES)
def test_set_alias_refuses_a_bad_name_and_keeps_the_old_alias(name: str) -> None:
    for policy in AliasPolicy:
        registry = registry_with(A, policy=policy)
        registry.set_alias(A, "old")
        with pytest.raises(InvalidName) as excinfo:
            registry.set_alias(A, name)
        assert (excinfo.value.kind, excinfo.value.name) == ("alias", name)
        assert registry.by_alias("old") == A
        assert registry.by_alias(name) is None
        assert registry.address(A).alias == "old"


@pytest.mark.parametrize("name", BAD_NAMES)
def test_join_refuses_a_bad_group_name(name: str) -> None:
    registry = registry_with(A)
    with pytest.raises(InvalidName) as excinfo:
        registry.join(A, name)
    assert (excinfo.value.kind, excinfo.value.name) == ("group", name)
    assert list(registry.groups()) == []
    assert registry.info(A).groups == ()


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_good_names_are_accepted_everywhere(name: str) -> None:
    registry = ClientRegistry()
    registry.connect(A, user=name)
    assert registry.set_alias(A, name) == name
    assert registry.join(A, name) is True
    assert registry.info(A) == ClientInfo(A, alias=name, user=name, groups=(name,))


def test_invalid_name_is_a_value_error_and_a_registry_error() -> None:
    registry = registry_with(A)
    with pytest.raises(ValueError, match="not acceptable"):
        registry.set_alias(A, "a b")
    with pytest.raises(RegistryError):
        registry.join(A, "")


def test_non_string_names_are_refused() -> None:
    registry = registry_with(A)
    bad: Any = 42
    with pytest.raises(InvalidName):
        registry.set_alias(A, bad)
    with pytest.raises(InvalidName):
        registry.join(A, bad)
    with pytest.raises(InvalidName):
        registry.connect(B, user=bad)


def test_name_pattern_can_be_widened() -> None:
    registry = ClientRegistry(name_pattern=r"\w{1,10}")
    registry.connect(A, user="\u0431\u043e\u0431")
    assert registry.set_alias(A, "\u0431\u043e\u0431") == "\u0431\u043e\u0431"
    with pytest.raises(InvalidName):
        registry.join(A, "a" * 11)


def test_a_bad_name_pattern_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="name_pattern"):
        ClientRegistry(name_pattern="[unclosed")


@given(wst.names())
def test_names_strategy_only_makes_accepted_names(name: str) -> None:
    registry = registry_with(A)
    assert registry.set_alias(A, name) == name
    assert registry.join(A, name) is True


# -- aliases ---------------------------------------------------------------------------------


def test_set_alias_names_the_connection() -> None:
    registry = ClientRegistry()
    registry.connect(A, user="alice")
    assert registry.by_alias("ally") is None
    assert registry.set_alias(A, "ally") == "ally"
    assert registry.by_alias("ally") == A
    assert registry.address(A) == ClientAddress(A, "ally", "alice")
    assert registry.info(A).alias == "ally"


def test_set_alias_replaces_and_frees_the_old_alias() -> None:
    registry = registry_with(A, B)
    registry.set_alias(A, "first")
    assert registry.set_alias(A, "second") == "second"
    assert registry.by_alias("first") is None
    assert registry.by_alias("second") == A
    assert registry.set_alias(B, "first") == "first"


@pytest.mark.parametrize("policy", list(AliasPolicy))
def test_setting_ones_own_alias_again_keeps_it(policy: AliasPolicy) -> None:
    registry = registry_with(A, policy=policy)
    registry.set_alias(A, "bob")
    assert registry.set_alias(A, "bob") == "bob"
    assert registry.by_alias("bob") == A
    assert registry.by_alias("bob2") is None


def test_clear_alias_frees_it() -> None:
    registry = ClientRegistry()
    registry.connect(A, user="alice")
    registry.set_alias(A, "ally")
    registry.clear_alias(A)
    assert registry.by_alias("ally") is None
    assert registry.address(A) == ClientAddress(A, None, "alice")
    assert registry.info(A).alias is None
    # Clearing when there is none is not an error.
    registry.clear_alias(A)
    assert registry.info(A).alias is None


def test_refuse_policy_raises_alias_taken_and_changes_nothing() -> None:
    registry = registry_with(A, B)
    assert registry.alias_policy is AliasPolicy.REFUSE
    registry.set_alias(A, "bob")
    registry.set_alias(B, "robert")
    with pytest.raises(AliasTaken) as excinfo:
        registry.set_alias(B, "bob")
    assert excinfo.value.alias == "bob"
    assert isinstance(excinfo.value, LookupError)
    assert registry.by_alias("bob") == A
    assert registry.by_alias("robert") == B
    assert registry.address(B).alias == "robert"


def test_alias_policy_accepts_its_string_value() -> None:
    registry = ClientRegistry(alias_policy="suffix")  # type: ignore[arg-type]
    assert registry.alias_policy is AliasPolicy.SUFFIX


def test_suffix_policy_gives_the_first_free_suffix() -> None:
    conns = [ConnId(f"node.{i}") for i in range(1, 6)]
    registry = registry_with(*conns, policy=AliasPolicy.SUFFIX)
    got = [registry.set_alias(c, "bob") for c in conns]
    assert got == ["bob", "bob2", "bob3", "bob4", "bob5"]
    assert [registry.by_alias(a) for a in got] == conns

    # A suffix freed by a departure is the first free one again.
    registry.disconnect(conns[2])
    registry.connect(ConnId("node.9"))
    assert registry.set_alias(ConnId("node.9"), "bob") == "bob3"


def test_suffix_policy_keeps_a_suffixed_alias_the_connection_already_has() -> None:
    registry = registry_with(A, B, policy=AliasPolicy.SUFFIX)
    registry.set_alias(A, "bob")
    assert registry.set_alias(B, "bob") == "bob2"
    # Asking again for "bob": the first candidate not held by another is its own "bob2".
    assert registry.set_alias(B, "bob") == "bob2"
    assert registry.by_alias("bob2") == B
    assert registry.by_alias("bob3") is None


def test_suffix_policy_skips_suffixes_taken_as_plain_aliases() -> None:
    registry = registry_with(A, B, C, policy=AliasPolicy.SUFFIX)
    registry.set_alias(A, "bob")
    registry.set_alias(B, "bob2")
    assert registry.set_alias(C, "bob") == "bob3"


def test_suffix_policy_does_not_suffix_a_free_alias() -> None:
    registry = registry_with(A, policy=AliasPolicy.SUFFIX)
    assert registry.set_alias(A, "bob2") == "bob2"


def test_suffix_policy_still_refuses_bad_names() -> None:
    registry = registry_with(A, policy=AliasPolicy.SUFFIX)
    with pytest.raises(InvalidName):
        registry.set_alias(A, "b\u043eb")


def test_suffix_policy_shortens_a_64_char_alias_to_fit() -> None:
    base = "x" * 60 + "abcd"
    conns = [ConnId(f"node.{i}") for i in range(1, 13)]
    registry = registry_with(*conns, policy=AliasPolicy.SUFFIX)
    got = [registry.set_alias(c, base) for c in conns]
    assert got[0] == base
    assert got[1] == base[:63] + "2"
    assert got[8] == base[:63] + "9"
    assert got[9] == base[:62] + "10"
    assert got[11] == base[:62] + "12"
    assert all(len(a) <= 64 and _NAME_RE.fullmatch(a) for a in got)
    assert len(set(got)) == len(got)


def test_suffix_policy_does_not_shorten_when_the_suffix_fits() -> None:
    registry = registry_with(A, B, C, policy=AliasPolicy.SUFFIX)
    base = "y" * 63
    registry.set_alias(A, base)
    assert registry.set_alias(B, base) == base + "2"
    registry.set_alias(C, "z" * 62)
    registry.connect(GONE)
    assert registry.set_alias(GONE, "z" * 62) == "z" * 62 + "2"


def test_suffix_policy_skips_a_shortened_candidate_that_is_taken() -> None:
    base = "x" * 63 + "2"
    registry = registry_with(A, B, policy=AliasPolicy.SUFFIX)
    registry.set_alias(A, base)
    # base + "2" is too long; shortened it is base itself, which A holds.
    assert registry.set_alias(B, base) == "x" * 63 + "3"


def test_suffix_policy_shortens_the_base_only_as_much_as_needed() -> None:
    base = "y" * 63
    conns = [ConnId(f"node.{i}") for i in range(1, 13)]
    registry = registry_with(*conns, policy=AliasPolicy.SUFFIX)
    got = [registry.set_alias(c, base) for c in conns]
    assert got[8] == base + "9"
    # base + "10" is 65 chars: one char of the base goes, not two.
    assert got[9] == base[:62] + "10"
    assert got[11] == base[:62] + "12"


@given(base=wst.names(), count=st.integers(1, 12))
def test_suffix_policy_gives_distinct_valid_aliases(base: str, count: int) -> None:
    conns = [ConnId(f"node.{i}") for i in range(1, count + 1)]
    registry = registry_with(*conns, policy=AliasPolicy.SUFFIX)
    got = [registry.set_alias(c, base) for c in conns]
    assert got[0] == base
    assert len(set(got)) == count
    for conn_id, alias in zip(conns, got, strict=True):
        assert _NAME_RE.fullmatch(alias)
        assert registry.by_alias(alias) == conn_id
    for alias in got[1:]:
        # A prefix of the base and a numeric suffix, no longer than the pattern allows,
        # and with the base cut only when base + suffix would not fit.
        assert any(
            alias == base[: MAX_NAME - len(str(k))] + str(k) for k in range(2, 2 * count + 2)
        )


@given(base=wst.names(), count=st.integers(2, 6))
def test_refuse_policy_gives_an_alias_to_one_connection_only(base: str, count: int) -> None:
    conns = [ConnId(f"node.{i}") for i in range(1, count + 1)]
    registry = registry_with(*conns)
    assert registry.set_alias(conns[0], base) == base
    for conn_id in conns[1:]:
        with pytest.raises(AliasTaken):
            registry.set_alias(conn_id, base)
        assert registry.info(conn_id).alias is None
    assert registry.by_alias(base) == conns[0]


# -- users -----------------------------------------------------------------------------------


def test_connections_of_lists_all_of_a_users_connections() -> None:
    registry = ClientRegistry()
    registry.connect(A, user="alice")
    registry.connect(B, user="bob")
    registry.connect(C, user="alice")
    assert set(registry.connections_of("alice")) == {A, C}
    assert list(registry.connections_of("bob")) == [B]
    assert list(registry.connections_of("carol")) == []
    assert len(registry.connections_of("alice")) == 2

    registry.disconnect(A)
    assert list(registry.connections_of("alice")) == [C]
    registry.disconnect(C)
    assert list(registry.connections_of("alice")) == []
    assert list(registry.connections_of("bob")) == [B]


def test_anonymous_connections_belong_to_no_user() -> None:
    registry = registry_with(A)
    assert registry.info(A).user is None
    assert registry.address(A).user is None


def test_user_and_alias_are_independent() -> None:
    registry = ClientRegistry()
    registry.connect(A, user="alice")
    registry.set_alias(A, "bob")
    assert registry.by_alias("alice") is None
    assert list(registry.connections_of("bob")) == []
    assert list(registry.connections_of("alice")) == [A]


# -- groups ----------------------------------------------------------------------------------


def test_join_and_leave_report_whether_anything_changed() -> None:
    registry = registry_with(A)
    assert registry.join(A, "g") is True
    assert registry.join(A, "g") is False
    assert list(registry.members("g")) == [A]
    assert registry.info(A).groups == ("g",)
    assert registry.leave(A, "g") is True
    assert registry.leave(A, "g") is False
    assert registry.leave(A, "never") is False
    assert list(registry.members("g")) == []
    assert registry.info(A).groups == ()


def test_members_follow_join_order() -> None:
    registry = registry_with(A, B, C)
    registry.join(C, "g")
    registry.join(A, "g")
    registry.join(B, "g")
    assert list(registry.members("g")) == [C, A, B]
    registry.leave(A, "g")
    registry.join(A, "g")
    assert list(registry.members("g")) == [C, B, A]


def test_info_lists_groups_in_join_order() -> None:
    registry = registry_with(A)
    for group in ["z", "a", "m"]:
        registry.join(A, group)
    assert registry.info(A).groups == ("z", "a", "m")


def test_groups_lists_only_groups_with_members() -> None:
    registry = registry_with(A, B)
    assert list(registry.groups()) == []
    registry.join(A, "g1")
    registry.join(B, "g1")
    registry.join(B, "g2")
    assert set(registry.groups()) == {"g1", "g2"}
    registry.leave(B, "g2")
    assert set(registry.groups()) == {"g1"}
    registry.leave(A, "g1")
    assert set(registry.groups()) == {"g1"}
    registry.disconnect(B)
    assert list(registry.groups()) == []
    assert list(registry.members("g1")) == []


def test_one_connections_groups_do_not_touch_anothers() -> None:
    registry = registry_with(A, B)
    registry.join(A, "g")
    assert registry.leave(B, "g") is False
    assert list(registry.members("g")) == [A]
    assert registry.info(B).groups == ()


# -- snapshots -------------------------------------------------------------------------------


def test_info_is_a_snapshot() -> None:
    registry = ClientRegistry()
    registry.connect(A, user="alice")
    registry.set_alias(A, "ally")
    registry.join(A, "g")
    info = registry.info(A)
    registry.set_alias(A, "other")
    registry.join(A, "h")
    registry.disconnect(A)
    assert info == ClientInfo(A, alias="ally", user="alice", groups=("g",))


def test_clients_is_a_snapshot() -> None:
    registry = registry_with(A, B)
    registry.join(A, "g")
    clients = registry.clients()
    assert clients == [ClientInfo(A, groups=("g",)), ClientInfo(B)]
    clients.clear()
    registry.connect(C)
    registry.leave(A, "g")
    assert registry.clients() == [ClientInfo(A), ClientInfo(B), ClientInfo(C)]


def test_address_follows_alias_changes() -> None:
    registry = ClientRegistry()
    first = registry.connect(A, user="alice")
    registry.set_alias(A, "ally")
    assert first == ClientAddress(A, None, "alice")
    assert registry.address(A) == ClientAddress(A, "ally", "alice")
    registry.clear_alias(A)
    assert registry.address(A) == ClientAddress(A, None, "alice")


# -- properties ------------------------------------------------------------------------------


def apply(registry: ClientRegistry, operation: tuple[Any, ...]) -> None:
    """Apply one operation from ``wst.registry_operations``, ignoring refusals."""
    name, conn_id, *args = operation
    try:
        if name == "connect":
            registry.connect(conn_id, user=args[0])
        elif name == "disconnect":
            registry.disconnect(conn_id)
        elif name == "set_alias":
            registry.set_alias(conn_id, args[0])
        elif name == "clear_alias":
            registry.clear_alias(conn_id)
        elif name == "join":
            registry.join(conn_id, args[0])
        elif name == "leave":
            registry.leave(conn_id, args[0])
        else:  # pragma: no cover - the strategy makes no other operations
            raise AssertionError(name)
    except (RegistryError, ValueError):
        pass


def assert_indices_agree_with_clients(registry: ClientRegistry) -> None:
    """Check every index against the snapshot that clients() gives."""
    clients = registry.clients()
    assert len(registry) == len(clients)
    assert list(registry) == [info.conn_id for info in clients]
    aliases = {info.alias: info.conn_id for info in clients if info.alias is not None}
    assert len(aliases) == sum(info.alias is not None for info in clients), "alias held twice"
    for alias, conn_id in aliases.items():
        assert registry.by_alias(alias) == conn_id
    users: dict[str, set[ConnId]] = {}
    groups: dict[str, set[ConnId]] = {}
    for info in clients:
        assert registry.info(info.conn_id) == info
        assert registry.address(info.conn_id) == ClientAddress(info.conn_id, info.alias, info.user)
        assert len(set(info.groups)) == len(info.groups)
        if info.user is not None:
            users.setdefault(info.user, set()).add(info.conn_id)
        for group in info.groups:
            groups.setdefault(group, set()).add(info.conn_id)
    for user, conns in users.items():
        listed = list(registry.connections_of(user))
        assert len(listed) == len(conns) and set(listed) == conns
    for group, conns in groups.items():
        listed = list(registry.members(group))
        assert len(listed) == len(conns) and set(listed) == conns
    assert set(registry.groups()) == set(groups)
    assert len(registry.groups()) == len(groups)


@given(st.lists(wst.registry_operations(), max_size=40), st.sampled_from(AliasPolicy))
def test_indices_stay_consistent(operations: list[tuple[Any, ...]], policy: AliasPolicy) -> None:
    registry = ClientRegistry(alias_policy=policy)
    for operation in operations:
        apply(registry, operation)
        assert_indices_agree_with_clients(registry)


@given(st.lists(wst.registry_operations(), max_size=40), st.sampled_from(AliasPolicy))
def test_disconnecting_everyone_leaves_every_index_empty(
    operations: list[tuple[Any, ...]], policy: AliasPolicy
) -> None:
    registry = ClientRegistry(alias_policy=policy)
    for operation in operations:
        apply(registry, operation)
    snapshot = registry.clients()
    for info in snapshot:
        assert registry.disconnect(info.conn_id) == info
        assert_forgotten(registry, info.conn_id, info)
        assert_indices_agree_with_clients(registry)
    assert len(registry) == 0
    assert list(registry.groups()) == []
    for info in snapshot:
        if info.alias is not None:
            assert registry.by_alias(info.alias) is None
        if info.user is not None:
            assert list(registry.connections_of(info.user)) == []


@given(
    st.lists(wst.registry_operations(), max_size=40),
    st.sampled_from(AliasPolicy),
    wst.names(),
)
def test_the_first_alias_candidate_is_what_set_alias_gives(
    operations: list[tuple[Any, ...]], policy: AliasPolicy, alias: str
) -> None:
    """A gateway claiming on its bus tries the candidates in turn: with a bus that holds
    nothing more than this registry, the first is exactly what the registry alone gives."""
    registry = ClientRegistry(alias_policy=policy)
    for operation in operations:
        apply(registry, operation)
    conn_id = ConnId("n.new")
    registry.connect(conn_id)
    candidates = registry.alias_candidates(conn_id, alias)
    first = next(candidates, None)
    try:
        given = registry.set_alias(conn_id, alias)
    except AliasTaken:
        assert first is None and policy is AliasPolicy.REFUSE
        return
    assert first == given
    if policy is AliasPolicy.SUFFIX:
        later = [next(candidates) for _ in range(3)]
        assert len(set(later)) == 3 and given not in later
        assert all(registry.by_alias(name) in (None, conn_id) for name in later)


def test_alias_candidates_check_the_name_at_once() -> None:
    registry = ClientRegistry()
    registry.connect(ConnId("n.1"))
    with pytest.raises(InvalidName):
        registry.alias_candidates(ConnId("n.1"), "not valid")


def test_an_exact_alias_is_refused_whatever_the_policy() -> None:
    registry = ClientRegistry(alias_policy=AliasPolicy.SUFFIX)
    registry.connect(ConnId("n.1"))
    registry.connect(ConnId("n.2"))
    registry.set_alias(ConnId("n.1"), "sam")
    with pytest.raises(AliasTaken):
        registry.set_alias(ConnId("n.2"), "sam", exact=True)
    assert registry.set_alias(ConnId("n.1"), "sam", exact=True) == "sam"
