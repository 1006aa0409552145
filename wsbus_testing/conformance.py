"""A conformance suite any :class:`wsbus.Bus` implementation must pass.

Subclass :class:`BusConformance` in a test module and provide the ``wsbus_make_bus`` fixture:
an async factory that takes service classes, returns a bus on which instances of them run,
and cleans everything up after the test::

    class TestMyBus(BusConformance):
        @pytest_asyncio.fixture
        async def wsbus_make_bus(self):
            buses = []

            async def make(services):
                bus = MyBus(services)
                buses.append(bus)
                return bus

            yield make
            for bus in buses:
                await bus.close()

The suite starts the bus against a :class:`RecordingSink` (a stand-in gateway) and checks the
routing rules of :mod:`wsbus.bus`, per-sender order, and the errors publish raises. The
services it uses live in :mod:`wsbus_testing.services`, importable by path, so that a bus
running services in other processes can start them too.

Optional capabilities (:class:`~wsbus.bus.ClaimsAliases`, :class:`~wsbus.bus.KeepsHistory`,
:class:`~wsbus.bus.KeepsSessions`, :class:`~wsbus.bus.PublishesNowait`,
:class:`~wsbus.bus.PublishesFresh`, :class:`~wsbus.bus.ReportsAvailability`) are tested on a
bus that has them. Routing rule 5 (presence events) is tested on every bus. The stand-in
gateway is a :class:`~wsbus.bus.HearsLoss` and a :class:`~wsbus.bus.HearsGateways`: it
records the losses a bus reports in :attr:`RecordingSink.losses` and the gateways it hears
are gone in :attr:`RecordingSink.lost`. More things a subclass may give, so that a renamed
method fails loudly and "unavailable" and several gateways are tested too:

- ``capabilities``: a class attribute, the set of capability protocols the bus is meant to
  offer; the suite checks that it offers exactly those.
- a ``wsbus_make_unavailable`` fixture: an async function that makes a started bus
  unavailable (the in-memory bus: ``bus.down = True``; a bus between processes: stop the
  broker). Without it the suite skips what needs it.
- ``spans_gateways``: a class attribute, True when the buses one ``wsbus_make_bus`` makes
  are gateways of one cluster (the second is made with no services: ``make([])``). The
  suite then checks what crosses gateways: presence events reach the other gateway, a
  gateway that leaves is reported to the others and to the services, a session saved on
  one gateway is taken on another.
- ``session_ttl`` and ``history_age``: the seconds the expiry checks use (a bus whose store
  keeps time coarsely sets them longer).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Final

import msgspec
import pytest

from wsbus import control
from wsbus.bus import (
    Bus,
    ClaimsAliases,
    KeepsHistory,
    KeepsSessions,
    ListsServices,
    Probes,
    PublishesFresh,
    PublishesNowait,
    ReportsAvailability,
)
from wsbus.envelope import (
    ClientAddress,
    ConnId,
    Envelope,
    EnvelopeId,
    GatewayAddress,
    NodeId,
    Recipients,
    ServiceAddress,
)
from wsbus.errors import BusUnavailable, NoRoute
from wsbus.history import HistoryConfig, Position, position_of
from wsbus.resume import SessionRecord
from wsbus.service import Service

from .services import Probe, Sequencer, Watcher

__all__ = [
    "BUS_CAPABILITIES",
    "BusConformance",
    "MakeBus",
    "MakeUnavailable",
    "RecordingSink",
    "client_message",
    "presence_event",
]

MakeBus = Callable[[list[type[Service]]], Awaitable[Bus]]
MakeUnavailable = Callable[[Bus], Awaitable[None]]
"""The ``wsbus_make_unavailable`` fixture: makes a started bus unavailable."""

BUS_CAPABILITIES: Final[tuple[type, ...]] = (
    ClaimsAliases,
    KeepsHistory,
    KeepsSessions,
    ListsServices,
    Probes,
    PublishesFresh,
    PublishesNowait,
    ReportsAvailability,
)
"""Every optional capability a bus may offer."""

TIMEOUT: Final = 30.0
"""Seconds a capability test may wait for a bus to notice it is down (a bus between
processes may learn it only by trying)."""


class RecordingSink:
    """A stand-in gateway: records what the bus delivers and answers control requests.

    Control requests are answered ``ok`` with a plausible value (True for join and leave,
    the alias asked for, an empty client list).
    """

    def __init__(self, bus: Bus, node: str = "sink") -> None:
        self._node = NodeId(node)
        self.bus = bus
        self.delivered: list[Envelope] = []
        self.losses: list[tuple[str, str]] = []
        """``(reason, detail)`` of each ``deliveries_lost`` call, in order."""
        self.lost: list[tuple[NodeId, bool]] = []
        """``(node, report)`` of each ``gateway_lost`` call, in order."""
        self._arrived = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def node(self) -> NodeId:
        """The stand-in gateway's node id."""
        return self._node

    def deliver(self, envelope: Envelope) -> None:
        """Record an envelope; answer it if it is a control request."""
        self.delivered.append(envelope)
        self._arrived.set()
        if envelope.type in control.REQUEST_TYPES and isinstance(envelope.sender, ServiceAddress):
            value: Any = {
                control.JOIN: True,
                control.LEAVE: True,
                control.CLIENTS: [],
            }.get(envelope.type)
            if envelope.type == control.ALIAS_SET:
                value = envelope.content["alias"]
            answer = Envelope(
                id=EnvelopeId(f"answer-{envelope.id}"),
                type=control.RESULT,
                sender=GatewayAddress(self._node),
                content=msgspec.to_builtins(control.Result(True, value)),
                reply_to=envelope.id,
                to=envelope.sender,
            )
            task = asyncio.ensure_future(self.bus.publish(answer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def deliveries_lost(self, reason: str, detail: str) -> None:
        """Record that the bus says deliveries meant for this gateway may have been lost."""
        self.losses.append((reason, detail))

    def gateway_lost(self, node: NodeId, report: bool) -> None:
        """Record that the bus says gateway ``node`` is gone.

        With ``report``, publish the ``gateway_lost`` presence event for services, as a
        gateway does.
        """
        self.lost.append((node, report))
        self._arrived.set()
        if report:
            event = presence_event(self._node, "gateway_lost", node=node, n=len(self.lost))
            task = asyncio.ensure_future(self.bus.publish(event))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def wait_for(
        self,
        predicate: Callable[[list[Envelope]], bool],
        timeout: float = 10.0,  # noqa: ASYNC109 - a test helper: every wait is bounded
    ) -> list[Envelope]:
        """Wait until ``predicate(delivered)`` holds; return what was delivered."""
        async with asyncio.timeout(timeout):
            while not predicate(self.delivered):
                self._arrived.clear()
                await self._arrived.wait()
        return self.delivered

    async def wait_lost(
        self,
        node: str,
        timeout: float = 10.0,  # noqa: ASYNC109 - a test helper: every wait is bounded
    ) -> None:
        """Wait until the bus said gateway ``node`` is gone."""
        async with asyncio.timeout(timeout):
            while not any(lost == node for lost, _ in self.lost):
                self._arrived.clear()
                await self._arrived.wait()


def client_message(type: str, content: Any, n: int = 1) -> Envelope:
    """Return an envelope as the gateway would publish it for client ``sink.1``."""
    return Envelope(
        id=EnvelopeId(f"m{n}"),
        type=type,
        sender=ClientAddress(ConnId("sink.1")),
        content=content,
        created=time.time(),
    )


def presence_event(
    sender: str,
    event: str,
    *,
    node: str | None = None,
    group: str | None = None,
    conn_id: str | None = None,
    n: int = 1,
) -> Envelope:
    """Return a ``wsbus.presence`` event as gateway ``sender`` would publish it (rule 5).

    ``node`` is where it happened (``sender`` when omitted; the dead gateway for
    ``gateway_lost``).
    """
    content = control.PresenceEvent(
        event=event,
        node=NodeId(node if node is not None else sender),
        group=group,
        conn_id=ConnId(conn_id) if conn_id is not None else None,
    )
    return Envelope(
        id=EnvelopeId(f"presence-{sender}-{n}"),
        type=control.PRESENCE,
        sender=GatewayAddress(NodeId(sender)),
        content=msgspec.to_builtins(content),
        created=time.time(),
    )


def _send_items(sends: list[tuple[Recipients, Any]], n: int = 1) -> Envelope:
    """A client's ``probe.send``: the probe sends ``probe.item`` for each, in order."""
    return client_message(
        "probe.send", {"sends": [[msgspec.to_builtins(r), body] for r, body in sends]}, n
    )


def _items(delivered: list[Envelope]) -> list[Envelope]:
    return [e for e in delivered if e.type == "probe.item"]


def _position(envelope: Envelope, group: str) -> Position:
    stamped = position_of(envelope)
    assert stamped is not None, f"{envelope.content!r} carries no position"
    assert stamped[0] == group
    return stamped[1]


class BusConformance:
    """The tests every bus must pass.

    A subclass provides the ``wsbus_make_bus`` fixture: an async factory
    ``make(service_classes) -> Bus`` that cleans up after the test. It may set
    ``capabilities`` and override ``wsbus_make_unavailable`` (see the module's docstring).
    """

    capabilities: ClassVar[frozenset[type] | None] = None
    """The capability protocols the bus is meant to offer; None: not checked."""

    spans_gateways: ClassVar[bool] = False
    """True when the buses one ``wsbus_make_bus`` makes are gateways of one cluster."""

    session_ttl: ClassVar[float] = 0.5
    """The ttl (seconds) the session expiry check saves a record with."""

    history_age: ClassVar[float] = 0.5
    """The age (seconds) the history expiry check keeps entries for."""

    @pytest.fixture
    def wsbus_make_unavailable(self) -> MakeUnavailable | None:
        """Return a function that makes a started bus unavailable; None: cannot."""
        return None

    async def _started(
        self,
        make: MakeBus,
        services: list[type[Service]],
        *,
        node: str = "sink",
        history: HistoryConfig | None = None,
    ) -> RecordingSink:
        bus = await make(services)
        sink = RecordingSink(bus, node)
        if history is not None:
            if not isinstance(bus, KeepsHistory):
                pytest.skip("the bus does not keep history")
            bus.keep_history(history)
        await bus.start(sink)
        return sink

    async def test_message_reaches_the_service_and_its_reply_the_gateway(
        self, wsbus_make_bus: MakeBus
    ) -> None:
        """A client message goes to the service that declared its type; the reply comes back."""
        sink = await self._started(wsbus_make_bus, [Probe])
        await sink.bus.publish(client_message("probe.echo", {"x": [1, 2]}))
        [reply] = await sink.wait_for(lambda d: len(d) >= 1)
        assert reply.type == "probe.echo.reply"
        assert reply.sender == ServiceAddress("probe")
        assert reply.reply_to == "m1"
        assert reply.recipients is not None and reply.recipients.conn_ids == ("sink.1",)
        assert reply.content == {
            "x": {"x": [1, 2]},
            "sender": {"type": "client", "conn_id": "sink.1", "alias": None, "user": None},
        }

    async def test_unknown_type_raises_no_route(self, wsbus_make_bus: MakeBus) -> None:
        """Publishing a type nothing declared raises NoRoute at once."""
        sink = await self._started(wsbus_make_bus, [Probe])
        with pytest.raises(NoRoute):
            await sink.bus.publish(client_message("nobody.handles.this", None))

    async def test_direct_address_reaches_the_named_service(self, wsbus_make_bus: MakeBus) -> None:
        """An envelope with ``to`` reaches that service whatever its type."""
        sink = await self._started(wsbus_make_bus, [Probe])
        message = msgspec.structs.replace(
            client_message("probe.echo", "direct"), to=ServiceAddress("probe")
        )
        await sink.bus.publish(message)
        [reply] = await sink.wait_for(lambda d: len(d) >= 1)
        assert reply.content["x"] == "direct"

    async def test_control_request_round_trip(self, wsbus_make_bus: MakeBus) -> None:
        """A service's control request reaches the gateway; the answer reaches the service."""
        sink = await self._started(wsbus_make_bus, [Probe])
        await sink.bus.publish(client_message("probe.join", {"group": "g"}))
        delivered = await sink.wait_for(lambda d: any(e.type == "probe.join.reply" for e in d))
        request = next(e for e in delivered if e.type == control.JOIN)
        assert request.content == {"conn_id": "sink.1", "group": "g"}
        reply = next(e for e in delivered if e.type == "probe.join.reply")
        assert reply.content == {"joined": True}

    async def test_clients_round_trip(self, wsbus_make_bus: MakeBus) -> None:
        """A service's ``clients()`` reaches the gateway and returns what it answered.

        On a bus that spans gateways the request goes to each one by node: this one.
        """
        sink = await self._started(wsbus_make_bus, [Probe])
        await sink.bus.publish(client_message("probe.clients", None))
        delivered = await sink.wait_for(lambda d: any(e.type == "probe.clients.reply" for e in d))
        request = next(e for e in delivered if e.type == control.CLIENTS)
        assert request.to in (None, GatewayAddress(sink.node))
        reply = next(e for e in delivered if e.type == "probe.clients.reply")
        assert reply.content == {"clients": []}

    async def test_per_sender_order_is_kept(self, wsbus_make_bus: MakeBus) -> None:
        """Everything one service sends reaches the gateway in the order it was sent."""
        sink = await self._started(wsbus_make_bus, [Sequencer])
        await sink.bus.publish(client_message("sequence", {"n": 500}))
        delivered = await sink.wait_for(lambda d: len(d) >= 500)
        assert [e.content for e in delivered] == list(range(500))

    async def test_inbound_order_is_kept(self, wsbus_make_bus: MakeBus) -> None:
        """Messages published one after another reach the service in that order."""
        sink = await self._started(wsbus_make_bus, [Probe])
        for i in range(200):
            await sink.bus.publish(client_message("probe.echo", i, i))
        delivered = await sink.wait_for(lambda d: len(d) >= 200)
        assert [e.content["x"] for e in delivered] == list(range(200))

    async def test_close_is_idempotent(self, wsbus_make_bus: MakeBus) -> None:
        """Closing twice is harmless."""
        sink = await self._started(wsbus_make_bus, [Probe])
        await sink.bus.close()
        await sink.bus.close()

    # -- optional capabilities -----------------------------------------------------------

    async def test_offers_the_capabilities_it_declares(self, wsbus_make_bus: MakeBus) -> None:
        """The bus is an instance of exactly the capability protocols it is meant to offer.

        A method renamed in the adapter (or in the protocol) then fails here, not as a
        fast path silently lost.
        """
        if self.capabilities is None:
            pytest.skip("the test class does not say which capabilities the bus offers")
        bus = await wsbus_make_bus([Probe])
        offered = {cap for cap in BUS_CAPABILITIES if isinstance(bus, cap)}
        assert offered == set(self.capabilities)

    async def test_publish_nowait_raises_what_publish_raises(
        self, wsbus_make_bus: MakeBus, wsbus_make_unavailable: MakeUnavailable | None
    ) -> None:
        """publish_nowait refuses as publish does; when it says True, the service has it.

        NoRoute for a type nothing handles; BusUnavailable once the bus is down (when the
        test class can make it so). A False return did nothing: the message then sent with
        publish is the one the service sees, once.
        """
        sink = await self._started(wsbus_make_bus, [Probe])
        bus = sink.bus
        if not isinstance(bus, PublishesNowait):
            pytest.skip("the bus does not offer publish_nowait")
        with pytest.raises(NoRoute):
            bus.publish_nowait(client_message("nobody.handles.this", None))
        with pytest.raises(NoRoute):
            await bus.publish(client_message("nobody.handles.this", None))
        for i in range(20):
            message = client_message("probe.echo", i, i)
            if not bus.publish_nowait(message):
                await bus.publish(message)
        delivered = await sink.wait_for(lambda d: len(d) >= 20)
        assert [e.content["x"] for e in delivered] == list(range(20))
        if wsbus_make_unavailable is None:
            return
        await wsbus_make_unavailable(bus)
        with pytest.raises(BusUnavailable):
            await bus.publish(client_message("probe.echo", "down"))
        with pytest.raises(BusUnavailable):
            bus.publish_nowait(client_message("probe.echo", "down"))

    async def test_publish_fresh_takes_what_publish_takes_and_refuses_the_same(
        self, wsbus_make_bus: MakeBus, wsbus_make_unavailable: MakeUnavailable | None
    ) -> None:
        """publish_fresh_nowait and publish_fresh refuse as publish does and keep order.

        NoRoute for a type nothing handles; BusUnavailable once the bus is down (when the
        test class can make it so). A False return did nothing: the message then sent with
        publish_fresh is the one the service sees, once. With ``handle_now`` or without,
        the service sees each message once, in the order they were taken.
        """
        sink = await self._started(wsbus_make_bus, [Probe])
        bus = sink.bus
        if not isinstance(bus, PublishesFresh):
            pytest.skip("the bus does not offer publish_fresh")
        with pytest.raises(NoRoute):
            bus.publish_fresh_nowait(client_message("nobody.handles.this", None))
        with pytest.raises(NoRoute):
            await bus.publish_fresh(client_message("nobody.handles.this", None))
        for i in range(40):
            message = client_message("probe.echo", i, i)
            if not bus.publish_fresh_nowait(message, handle_now=i % 2 == 0):
                await bus.publish_fresh(message)
        delivered = await sink.wait_for(lambda d: len(d) >= 40)
        assert [e.content["x"] for e in delivered] == list(range(40))
        if wsbus_make_unavailable is None:
            return
        await wsbus_make_unavailable(bus)
        with pytest.raises(BusUnavailable):
            await bus.publish_fresh(client_message("probe.echo", "down"))
        with pytest.raises(BusUnavailable):
            bus.publish_fresh_nowait(client_message("probe.echo", "down"))

    async def test_availability_is_reported(
        self, wsbus_make_bus: MakeBus, wsbus_make_unavailable: MakeUnavailable | None
    ) -> None:
        """``available`` is True once started and the bus is up; False once it is down.

        A bus may learn that it is down only by trying: the test publishes until it is
        refused, then waits (bounded) for ``available`` to say so.
        """
        sink = await self._started(wsbus_make_bus, [Probe])
        bus = sink.bus
        if not isinstance(bus, ReportsAvailability):
            pytest.skip("the bus does not report its availability")
        assert bus.available
        if wsbus_make_unavailable is None:
            return
        await wsbus_make_unavailable(bus)
        async with asyncio.timeout(TIMEOUT):
            while True:
                try:
                    await bus.publish(client_message("probe.echo", "down?"))
                except BusUnavailable:
                    break
                await asyncio.sleep(0.05)
            # A property, with nothing to wait on: polled, bounded by the timeout above.
            while bus.available:  # noqa: ASYNC110
                await asyncio.sleep(0.05)

    async def test_a_probe_comes_back_to_the_gateway_that_sent_it(
        self, wsbus_make_bus: MakeBus, wsbus_make_unavailable: MakeUnavailable | None
    ) -> None:
        """``probe`` hands a gateway's ``wsbus.probe`` back to its ``deliver``.

        Once the bus is down, ``probe`` raises BusUnavailable.
        """
        sink = await self._started(wsbus_make_bus, [Probe])
        bus = sink.bus
        if not isinstance(bus, Probes):
            pytest.skip("the bus cannot be probed")
        address = GatewayAddress(sink.node)
        for n in range(3):
            envelope = Envelope(
                id=EnvelopeId(f"probe-{n}"),
                type=control.PROBE,
                sender=address,
                to=address,
            )
            await bus.probe(envelope)
            wanted = envelope.id

            def came_back(delivered: list[Envelope], wanted: str = wanted) -> bool:
                return any(e.id == wanted for e in delivered)

            back = await sink.wait_for(came_back)
            (came,) = [x for x in back if x.id == wanted]
            assert came.type == control.PROBE and came.sender == address
        if wsbus_make_unavailable is None:
            return
        await wsbus_make_unavailable(bus)
        delivered = len(sink.delivered)
        async with asyncio.timeout(TIMEOUT):
            while True:
                late = Envelope(
                    id=EnvelopeId("probe-down"), type=control.PROBE, sender=address, to=address
                )
                try:
                    await bus.probe(late)
                except BusUnavailable:
                    break
                await asyncio.sleep(0.05)
        assert not any(e.id == "probe-down" for e in sink.delivered[delivered:])

    async def test_live_services_lists_the_services_on_the_bus(
        self, wsbus_make_bus: MakeBus
    ) -> None:
        """``live_services`` names each service on the bus with its live instances."""
        sink = await self._started(wsbus_make_bus, [Probe])
        bus = sink.bus
        if not isinstance(bus, ListsServices):
            pytest.skip("the bus cannot list its services")
        async with asyncio.timeout(TIMEOUT):
            # Polled: nothing to wait on. Bounded by the timeout.
            while (await bus.live_services()).get(Probe.name, 0) < 1:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        services = await bus.live_services()
        assert all(isinstance(n, int) and n >= 1 for n in services.values()), services

    async def test_an_alias_is_claimed_by_one_connection(self, wsbus_make_bus: MakeBus) -> None:
        """One connection holds an alias; ``release_alias`` frees only its holder's claim.

        ``claim_alias`` is True for the holder (again, too) and False for anyone else;
        among claims made at once, one wins.
        """
        sink = await self._started(wsbus_make_bus, [Probe])
        bus = sink.bus
        if not isinstance(bus, ClaimsAliases):
            pytest.skip("the bus does not claim aliases")
        first, second = ConnId(f"{sink.node}.1"), ConnId(f"{sink.node}.2")
        assert await bus.claim_alias("sam", first) is True
        assert await bus.claim_alias("sam", first) is True
        assert await bus.claim_alias("sam", second) is False
        await bus.release_alias("sam", second)  # not its own: nothing happens
        assert await bus.claim_alias("sam", second) is False
        await bus.release_alias("sam", first)
        assert await bus.claim_alias("sam", second) is True
        await bus.release_alias("never-claimed", first)
        claims = [bus.claim_alias("ann", ConnId(f"{sink.node}.{n}")) for n in range(3, 13)]
        assert sorted(await asyncio.gather(*claims)) == [False] * 9 + [True]

    async def test_alias_claims_refuse_when_unavailable(
        self, wsbus_make_bus: MakeBus, wsbus_make_unavailable: MakeUnavailable | None
    ) -> None:
        """A claim the bus cannot make raises BusUnavailable, never a False it cannot know."""
        sink = await self._started(wsbus_make_bus, [Probe])
        bus = sink.bus
        if not isinstance(bus, ClaimsAliases):
            pytest.skip("the bus does not claim aliases")
        if wsbus_make_unavailable is None:
            pytest.skip("the test class cannot make the bus unavailable")
        await wsbus_make_unavailable(bus)
        async with asyncio.timeout(TIMEOUT):
            with pytest.raises(BusUnavailable):
                await bus.claim_alias("sam", ConnId(f"{sink.node}.1"))

    # -- history (KeepsHistory) ----------------------------------------------------------

    async def test_history_positions_are_dense_per_group(self, wsbus_make_bus: MakeBus) -> None:
        """A history group's messages carry dense positions, in the order they arrive.

        Only a service's message to exactly one group that keeps history (an ``exclude``
        allowed) gets one. ``history()`` gives what follows a position, oldest first, at
        most ``limit``; ``[]`` after the last; None for another epoch, a position beyond
        the last, or entries after it trimmed by count.
        """
        config = HistoryConfig(groups=("h.*",), size=5, age=300.0)
        sink = await self._started(wsbus_make_bus, [Probe], history=config)
        bus = sink.bus
        assert isinstance(bus, KeepsHistory)
        a, b = Recipients(groups=("h.a",)), Recipients(groups=("h.b",))
        sends: list[tuple[Recipients, Any]] = [
            (a, 1),
            (b, 2),
            (a, 3),
            (Recipients(groups=("h.b",), exclude=(ConnId("sink.9"),)), 4),
            (Recipients(groups=("plain",)), 5),
            (Recipients(conn_ids=(ConnId("sink.1"),)), 6),
            (Recipients(groups=("h.a", "h.b")), 7),
            (a, 8),
        ]
        await bus.publish(_send_items(sends))
        items = _items(await sink.wait_for(lambda d: len(_items(d)) >= 8))
        assert [e.content for e in items] == [1, 2, 3, 4, 5, 6, 7, 8]
        on_a = [_position(items[i], "h.a") for i in (0, 2, 7)]
        on_b = [_position(items[i], "h.b") for i in (1, 3)]
        for positions in (on_a, on_b):
            assert len({p.epoch for p in positions}) == 1
            first = positions[0].offset
            assert first >= 1
            assert [p.offset for p in positions] == list(range(first, first + len(positions)))
        assert [position_of(items[i]) for i in (4, 5, 6)] == [None, None, None]

        after_first = await bus.history("h.a", on_a[0], 10)
        assert after_first is not None
        assert [(e.id, e.content, position_of(e)) for e in after_first] == [
            (items[i].id, items[i].content, ("h.a", on_a[j])) for i, j in ((2, 1), (7, 2))
        ]
        assert [e.content for e in await bus.history("h.a", on_a[0], 1) or ()] == [3]
        assert await bus.history("h.a", on_a[2], 10) == []
        after_b = await bus.history("h.b", on_b[0], 10)
        assert [(e.id, position_of(e)) for e in after_b or ()] == [(items[3].id, ("h.b", on_b[1]))]
        epoch, last = on_a[2].epoch, on_a[2].offset
        assert await bus.history("h.a", Position(f"x{epoch}"[:30], last), 10) is None
        assert await bus.history("h.a", Position(epoch, last + 5), 10) is None

        # Four more: h.a has had seven, and keeps the last five.
        await bus.publish(_send_items([(a, n) for n in range(9, 13)], 2))
        items = _items(await sink.wait_for(lambda d: len(_items(d)) >= 12))
        on_a += [_position(e, "h.a") for e in items[8:]]
        assert [p.offset for p in on_a] == list(range(on_a[0].offset, on_a[0].offset + 7))
        assert await bus.history("h.a", on_a[0], 10) is None  # on_a[1] was trimmed
        kept = await bus.history("h.a", on_a[1], 10)
        assert kept is not None
        assert [e.content for e in kept] == [8, 9, 10, 11, 12]

    async def test_history_entries_age_out(self, wsbus_make_bus: MakeBus) -> None:
        """Entries older than ``age`` are gone: what follows an aged-out one cannot be given.

        After the last position there is still nothing missed, and the offsets go on.
        """
        age = self.history_age
        config = HistoryConfig(groups=("h.*",), size=100, age=age)
        sink = await self._started(wsbus_make_bus, [Probe], history=config)
        bus = sink.bus
        assert isinstance(bus, KeepsHistory)
        a = Recipients(groups=("h.a",))
        await bus.publish(_send_items([(a, 1), (a, 2)]))
        items = _items(await sink.wait_for(lambda d: len(_items(d)) >= 2))
        first, last = (_position(e, "h.a") for e in items)
        await asyncio.sleep(3 * age)
        assert await bus.history("h.a", first, 10) is None
        assert await bus.history("h.a", last, 10) == []
        await bus.publish(_send_items([(a, 3)], 2))
        items = _items(await sink.wait_for(lambda d: len(_items(d)) >= 3))
        assert _position(items[2], "h.a") == Position(last.epoch, last.offset + 1)

    # -- sessions (KeepsSessions) --------------------------------------------------------

    @staticmethod
    def _record(sid: str = "conformance-session-id-0001") -> SessionRecord:
        unacked = Envelope(
            id=EnvelopeId("probe-7"),
            type="probe.item",
            sender=ServiceAddress("probe"),
            content={"text": "héllo", "n": [1, 2.5, None, True]},
            recipients=Recipients(groups=("h.a",), exclude=(ConnId("sink.3"),)),
            headers={"wsbus-ack": "1", "wsbus-pos": "e1:7", "wsbus-group": "h.a"},
            created=1700000000.25,
        )
        return SessionRecord(
            sid=sid,
            user="ann",
            alias="sam",
            groups=("h.a", "room"),
            conn_ids=(ConnId("sink.1"), ConnId("sink.4")),
            closed=1700000001.5,
            code=4507,
            unacked=(unacked,),
        )

    async def test_a_session_record_is_taken_once(self, wsbus_make_bus: MakeBus) -> None:
        """A saved record comes back whole (unacknowledged envelopes too), once.

        A second take, or a take of a sid never saved, gets None; of takes made at once,
        one gets it.
        """
        sink = await self._started(wsbus_make_bus, [Probe])
        bus = sink.bus
        if not isinstance(bus, KeepsSessions):
            pytest.skip("the bus does not keep sessions")
        record = self._record()
        await bus.save_session(record, 60.0)
        assert await bus.take_session(record.sid) == record
        assert await bus.take_session(record.sid) is None
        assert await bus.take_session("never-saved-session-id-01") is None
        await bus.save_session(record, 60.0)
        newer = msgspec.structs.replace(record, alias="max", unacked=())
        await bus.save_session(newer, 60.0)
        takes = await asyncio.gather(*(bus.take_session(record.sid) for _ in range(5)))
        assert [t for t in takes if t is not None] == [newer]

    async def test_a_session_record_expires(self, wsbus_make_bus: MakeBus) -> None:
        """A record is gone once its ttl has passed."""
        sink = await self._started(wsbus_make_bus, [Probe])
        bus = sink.bus
        if not isinstance(bus, KeepsSessions):
            pytest.skip("the bus does not keep sessions")
        record = self._record()
        await bus.save_session(record, self.session_ttl)
        await asyncio.sleep(3 * self.session_ttl)
        assert await bus.take_session(record.sid) is None

    async def test_a_session_saved_on_one_gateway_is_taken_on_another(
        self, wsbus_make_bus: MakeBus
    ) -> None:
        """On a cluster, a client may resume on any gateway: its record is the cluster's."""
        if not self.spans_gateways:
            pytest.skip("the test class does not say the bus spans gateways")
        sink = await self._started(wsbus_make_bus, [Probe])
        other = await self._started(wsbus_make_bus, [], node="other")
        if not isinstance(sink.bus, KeepsSessions) or not isinstance(other.bus, KeepsSessions):
            pytest.skip("the bus does not keep sessions")
        record = self._record()
        await sink.bus.save_session(record, 60.0)
        assert await other.bus.take_session(record.sid) == record
        assert await sink.bus.take_session(record.sid) is None

    # -- presence (routing rule 5) -------------------------------------------------------

    @staticmethod
    async def _seen(sink: RecordingSink, predicate: Callable[[list[Any]], bool]) -> list[Any]:
        """Ask the watcher what it has seen until ``predicate`` holds (bounded)."""
        async with asyncio.timeout(TIMEOUT):
            for n in itertools.count(1000):
                await sink.bus.publish(client_message("watcher.seen", None, n))
                reply = await sink.wait_for(
                    lambda d, n=n: any(e.reply_to == f"m{n}" for e in d)  # type: ignore[misc]
                )
                events: list[Any] = next(e for e in reply if e.reply_to == f"m{n}").content[
                    "events"
                ]
                if predicate(events):
                    return events
                await asyncio.sleep(0.05)
        raise AssertionError("unreachable")

    async def test_presence_events_reach_the_services_that_declared_them(
        self, wsbus_make_bus: MakeBus
    ) -> None:
        """A gateway's ``wsbus.presence`` event reaches each service that declared it.

        It never comes back to the gateway that sent it.
        """
        sink = await self._started(wsbus_make_bus, [Watcher, Probe])
        event = presence_event(sink.node, "join", group="room", conn_id=f"{sink.node}.1")
        await sink.bus.publish(event)
        events = await self._seen(sink, bool)
        assert events == [
            {"sender": msgspec.to_builtins(event.sender), "content": event.content},
        ]
        await sink.bus.publish(client_message("probe.echo", "marker", 2))
        await sink.wait_for(lambda d: any(e.type == "probe.echo.reply" for e in d))
        assert not any(e.type == control.PRESENCE for e in sink.delivered)

    async def test_presence_events_need_no_listener(self, wsbus_make_bus: MakeBus) -> None:
        """With no service that declared ``wsbus.presence``, publishing one is no error."""
        sink = await self._started(wsbus_make_bus, [Probe])
        await sink.bus.publish(presence_event(sink.node, "leave", group="room"))
        await sink.bus.publish(client_message("probe.echo", "after"))
        await sink.wait_for(lambda d: any(e.type == "probe.echo.reply" for e in d))

    async def test_presence_events_reach_the_other_gateways(self, wsbus_make_bus: MakeBus) -> None:
        """On a cluster, a gateway's presence event reaches every other gateway, as sent."""
        if not self.spans_gateways:
            pytest.skip("the test class does not say the bus spans gateways")
        sink = await self._started(wsbus_make_bus, [Probe])
        other = await self._started(wsbus_make_bus, [], node="other")
        event = presence_event(sink.node, "join", group="room", conn_id=f"{sink.node}.1")
        await sink.bus.publish(event)
        delivered = await other.wait_for(lambda d: any(e.type == control.PRESENCE for e in d))
        [got] = [e for e in delivered if e.type == control.PRESENCE]
        assert (got.id, got.sender, got.content) == (event.id, event.sender, event.content)
        await sink.bus.publish(client_message("probe.echo", "marker", 2))
        await sink.wait_for(lambda d: any(e.type == "probe.echo.reply" for e in d))
        assert not any(e.type == control.PRESENCE for e in sink.delivered)

    async def test_a_gateway_that_leaves_is_reported(self, wsbus_make_bus: MakeBus) -> None:
        """On a cluster, when a gateway leaves, the others hear ``gateway_lost`` for it.

        The services that declared ``wsbus.presence`` get one ``gateway_lost`` event for
        it: from the bus itself, or from the one gateway the bus told to report it.
        """
        if not self.spans_gateways:
            pytest.skip("the test class does not say the bus spans gateways")
        sink = await self._started(wsbus_make_bus, [Watcher])
        other = await self._started(wsbus_make_bus, [], node="other")
        await other.bus.close()
        await sink.wait_lost("other", TIMEOUT)

        def lost(events: list[Any]) -> list[Any]:
            return [e for e in events if e["content"].get("event") == "gateway_lost"]

        events = lost(await self._seen(sink, lambda events: bool(lost(events))))
        assert [e["content"] for e in events] == [{"event": "gateway_lost", "node": "other"}]
        assert lost(await self._seen(sink, bool)) == events
