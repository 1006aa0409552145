"""Aliases unique across gateways: real Gateways on a bus that claims aliases (ClaimsAliases).

The bus is tests/wsbus/cluster.py's: several gateways in one process, one shared alias table.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import assert_balanced
from tests.loops import run_in_own_loop
from tests.wsbus.cluster import ClaimingBus, Cluster, Running, running
from wsbus import (
    AliasPolicy,
    ClientAddress,
    Context,
    ControlError,
    Envelope,
    Gateway,
    Recipients,
    Service,
    handles,
    hookimpl,
)
from wsbus.bus import Bus, BusSink, ClaimsAliases
from wsbus.edge import MemoryClient
from wsbus.hooks import HandshakeRequest, Identity
from wsbus_testing.conformance import BusConformance, MakeBus, MakeUnavailable


class Names(Service):
    """Sets and clears the sender's alias; sends a note to an alias.

    A set runs in a task of its own, so that two clients' sets are in flight at once (a
    service handles one message at a time).
    """

    name = "names"

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[None]] = set()

    @handles("name.set")
    async def set_alias(self, message: Envelope, ctx: Context) -> None:
        task = asyncio.create_task(self._set(message, ctx))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _set(self, message: Envelope, ctx: Context) -> None:
        assert isinstance(message.sender, ClientAddress)
        try:
            given = await ctx.set_alias(message.sender.conn_id, message.content)
        except ControlError as exc:
            ctx.reply({"error": exc.code})
            return
        ctx.reply({"alias": given})

    @handles("name.clear")
    async def clear_alias(self, message: Envelope, ctx: Context) -> None:
        assert isinstance(message.sender, ClientAddress)
        try:
            await ctx.clear_alias(message.sender.conn_id)
        except ControlError as exc:
            ctx.reply({"error": exc.code})
            return
        ctx.reply({"cleared": True})

    @handles("name.note")
    async def note(self, message: Envelope, ctx: Context) -> None:
        ctx.send(Recipients(aliases=(message.content,)), "name.noted", message.content)


async def _set(client: MemoryClient, alias: str) -> dict[str, Any]:
    client.send("name.set", alias)
    frame = await client.receive()
    assert frame["type"] == "name.set.reply", frame
    content: dict[str, Any] = frame["content"]
    return content


def _balanced(run: Running) -> None:
    for gateway in run.gateways:
        assert_balanced(gateway.stats())


async def _close(run: Running, client: MemoryClient, *, settle: bool = True) -> None:
    """Close a client and wait (bounded) until its gateway has let it go.

    With ``settle``, until the alias work that started (its release) has ended too.
    """
    client.close()
    await client.wait_closed()
    async with asyncio.timeout(5):
        while any(client.conn_id in g.registry for g in run.gateways):
            await asyncio.sleep(0.01)
    if settle:
        await _settled(run.cluster, run.gateways)


async def _settled(cluster: Cluster, gateways: list[Gateway]) -> None:
    """Wait (bounded) until no gateway has alias work under way."""
    async with asyncio.timeout(5):
        while any(g._aliases is not None and g._aliases.pending for g in gateways):
            await asyncio.sleep(0.01)


async def test_the_gateway_claims_on_a_bus_that_offers_it() -> None:
    cluster = Cluster([Names()], claims=True)
    assert isinstance(cluster.bus(), ClaimsAliases)
    assert not isinstance(Cluster().bus(), ClaimsAliases)


async def test_two_gateways_one_alias_one_wins() -> None:
    cluster = Cluster([Names()], claims=True)
    cluster.claim_gate = asyncio.Event()  # both claims wait: they are in flight at once
    async with running(cluster) as run:
        on_a, on_b = [await run.connect(g) for g in run.gateways]
        on_a.send("name.set", "sam")
        on_b.send("name.set", "sam")
        async with asyncio.timeout(5):
            while len(cluster.claim_log) < 2:
                await asyncio.sleep(0.01)
        cluster.claim_gate.set()
        answers = [(await on_a.receive())["content"], (await on_b.receive())["content"]]
        assert sorted(map(str, answers)) == sorted(
            map(str, [{"alias": "sam"}, {"error": "alias_taken"}])
        )
        winner = on_a if answers[0] == {"alias": "sam"} else on_b
        assert cluster.aliases == {"sam": winner.conn_id}
        # A message to the alias reaches the winner alone, through either gateway.
        loser = on_b if winner is on_a else on_a
        loser.send("name.note", "sam")
        assert (await winner.receive())["content"] == "sam"
        assert loser.pending() == 0
        _balanced(run)


async def test_under_the_suffix_policy_the_second_gets_a_suffix_across_gateways() -> None:
    cluster = Cluster([Names()], claims=True)
    async with running(cluster, alias_policy=AliasPolicy.SUFFIX) as run:
        on_a, on_b = [await run.connect(g) for g in run.gateways]
        assert await _set(on_a, "sam") == {"alias": "sam"}
        # Gateway b's own registry has no sam: only the bus knows it is taken.
        assert await _set(on_b, "sam") == {"alias": "sam2"}
        assert cluster.aliases == {"sam": on_a.conn_id, "sam2": on_b.conn_id}
        assert run.gateways[1].registry.by_alias("sam2") == on_b.conn_id
        _balanced(run)


async def test_disconnect_clear_and_replace_release_the_claim() -> None:
    cluster = Cluster([Names()], claims=True)
    async with running(cluster) as run:
        a, b = run.gateways
        first, second = await run.connect(a), await run.connect(b)
        assert await _set(first, "sam") == {"alias": "sam"}
        assert await _set(first, "samuel") == {"alias": "samuel"}  # replaced: sam released
        assert await _set(second, "sam") == {"alias": "sam"}
        second.send("name.clear")
        assert (await second.receive())["content"] == {"cleared": True}
        assert cluster.aliases == {"samuel": first.conn_id}
        await _close(run, first)
        assert cluster.aliases == {}
        assert ("release", "samuel", first.conn_id) in cluster.claim_log
        _balanced(run)


async def test_a_claim_the_bus_cannot_make_is_unavailable_and_sets_nothing() -> None:
    cluster = Cluster([Names()], claims=True)
    async with running(cluster) as run:
        client = await run.connect(run.gateways[0])
        cluster.table_down = True
        assert await _set(client, "sam") == {"error": "unavailable"}
        assert run.gateways[0].registry.info(client.conn_id).alias is None  # type: ignore[arg-type]
        cluster.table_down = False
        assert await _set(client, "sam") == {"alias": "sam"}
        _balanced(run)


async def test_a_connection_that_closes_while_its_claim_is_made_releases_it() -> None:
    cluster = Cluster([Names()], claims=True)
    cluster.claim_gate = asyncio.Event()
    async with running(cluster) as run:
        client, other = [await run.connect(run.gateways[0]) for _ in range(2)]
        client.send("name.set", "sam")
        async with asyncio.timeout(5):
            while not cluster.claim_log:
                await asyncio.sleep(0.01)
        await _close(run, client, settle=False)  # its claim waits for the gate
        cluster.claim_gate.set()
        await _settled(cluster, run.gateways)
        assert cluster.aliases == {}
        assert cluster.claim_log[-1] == ("release", "sam", client.conn_id)
        assert await _set(other, "sam") == {"alias": "sam"}
        _balanced(run)


async def test_one_connections_alias_requests_keep_their_order_and_others_go_on() -> None:
    class Both(Service):
        """Sets then clears the alias without waiting between; notes meanwhile."""

        name = "both"

        @handles("both")
        async def both(self, message: Envelope, ctx: Context) -> None:
            assert isinstance(message.sender, ClientAddress)
            conn_id = message.sender.conn_id
            setting = asyncio.create_task(ctx.set_alias(conn_id, "sam"))
            await asyncio.sleep(0)  # the set is on the bus before the clear
            clearing = asyncio.create_task(ctx.clear_alias(conn_id))
            await asyncio.sleep(0)
            ctx.reply("meanwhile")  # not held up by the claim under way
            await asyncio.gather(setting, clearing)
            ctx.reply("done", type="both.done")

    cluster = Cluster([Both()], claims=True)
    cluster.claim_gate = asyncio.Event()
    async with running(cluster) as run:
        client = await run.connect(run.gateways[0])
        client.send("both")
        assert (await client.receive())["content"] == "meanwhile"
        cluster.claim_gate.set()
        assert (await client.receive())["type"] == "both.done"
        # The clear came after the set: it did not overtake it, and released the claim.
        assert run.gateways[0].registry.info(client.conn_id).alias is None  # type: ignore[arg-type]
        assert cluster.aliases == {}
        _balanced(run)


async def test_a_release_the_bus_cannot_make_is_logged_counted_and_tried_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cluster = Cluster([Names()], claims=True)
    async with running(cluster) as run:
        a, b = run.gateways
        first, second = await run.connect(a), await run.connect(b)
        assert await _set(first, "sam") == {"alias": "sam"}
        cluster.table_down = True
        with caplog.at_level(logging.WARNING, logger="wsbus.gateway"):
            await _close(run, first)
        assert "could not release alias 'sam'" in caplog.text
        assert a.stats().alias_releases_failed == 1
        assert cluster.aliases == {"sam": first.conn_id}  # held until someone retries
        cluster.table_down = False
        third = await run.connect(a)
        # Gateway a tries its failed release again before its next claim.
        assert await _set(third, "sam") == {"alias": "sam"}
        assert await _set(second, "sam") == {"error": "alias_taken"}
        _balanced(run)


async def test_once_closing_alias_requests_are_unavailable() -> None:
    cluster = Cluster([Names()], claims=True)
    async with running(cluster) as run:
        client = await run.connect(run.gateways[0])
        claims = run.gateways[0]._aliases
        assert claims is not None
        await claims.close(1.0)  # what Gateway.close does once its connections are gone
        assert await _set(client, "sam") == {"error": "unavailable"}
        assert cluster.claim_log == [] and cluster.aliases == {}


class AliasFromToken:
    """Authenticates a token as the alias it names."""

    @hookimpl
    def wsbus_authenticate(self, request: HandshakeRequest) -> Identity | None:
        return Identity(alias=request.token) if request.token else None


async def test_an_alias_from_authentication_is_claimed_too() -> None:
    cluster = Cluster([Names()], claims=True)
    async with running(cluster, plugins=[AliasFromToken()]) as run:
        a, b = run.gateways
        ann = await run.connect(a, HandshakeRequest(token="ann"))
        assert cluster.aliases == {"ann": ann.conn_id}
        refused = await run.connect(b, HandshakeRequest(token="ann"), welcome=False)
        assert await refused.wait_closed() == 4401
        cluster.table_down = True
        later = await run.connect(b, HandshakeRequest(token="bob"), welcome=False)
        assert await later.wait_closed() == 1013  # not the client's fault: retry
        assert cluster.aliases == {"ann": ann.conn_id}
        _balanced(run)


# -- many operations on two gateways: the table and the registries agree ---------------------

operations = st.lists(
    st.tuples(
        st.sampled_from(["set", "clear", "close", "open"]),
        st.integers(0, 3),  # which client
        st.sampled_from(["sam", "ann"]),
    ),
    max_size=12,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=operations, policy=st.sampled_from(AliasPolicy))
def test_the_table_and_the_registries_always_agree(
    ops: list[tuple[str, int, str]], policy: AliasPolicy
) -> None:
    run_in_own_loop(_agree(ops, policy))


async def _agree(ops: list[tuple[str, int, str]], policy: AliasPolicy) -> None:
    cluster = Cluster([Names()], claims=True)
    async with asyncio.timeout(30), running(cluster, alias_policy=policy) as run:
        # Clients 0 and 2 on gateway a, 1 and 3 on b.
        clients: list[MemoryClient | None] = [
            await run.connect(run.gateways[i % 2]) for i in range(4)
        ]
        for op, index, alias in ops:
            client = clients[index]
            if op == "open":
                if client is None:
                    clients[index] = await run.connect(run.gateways[index % 2])
            elif client is None:
                continue
            elif op == "close":
                await _close(run, client)
                clients[index] = None
            elif op == "set":
                answer = await _set(client, alias)
                assert answer.get("error") in (None, "alias_taken"), answer
            else:
                client.send("name.clear")
                assert (await client.receive())["content"] == {"cleared": True}
        await _settled(cluster, run.gateways)
        held = {
            info.alias: info.conn_id
            for gateway in run.gateways
            for info in gateway.clients()
            if info.alias is not None
        }
        # Every alias held is claimed by its holder, and nothing else stays claimed.
        assert cluster.aliases == held
        _balanced(run)


# -- the conformance suite on this test bus: its alias tests pass on a bus that claims --------


class _SelfStarting(ClaimingBus):
    """The cluster's bus for one gateway, starting and stopping the services itself."""

    async def start(self, sink: BusSink) -> None:
        await super().start(sink)
        await self.cluster.start_services()

    async def close(self) -> None:
        await self.cluster.stop_services()
        await super().close()


class TestClusterBus(BusConformance):
    capabilities = frozenset({ClaimsAliases})

    @pytest_asyncio.fixture
    async def wsbus_make_bus(self) -> AsyncIterator[MakeBus]:
        buses: list[Bus] = []

        async def make(services: list[type[Service]]) -> Bus:
            bus = _SelfStarting(Cluster([cls() for cls in services], claims=True))
            buses.append(bus)
            return bus

        yield make
        for bus in buses:
            await bus.close()

    @pytest.fixture
    def wsbus_make_unavailable(self) -> MakeUnavailable:
        async def down(bus: Bus) -> None:
            assert isinstance(bus, _SelfStarting)
            bus.cluster.table_down = True

        return down
