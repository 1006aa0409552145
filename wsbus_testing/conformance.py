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

Optional capabilities (:class:`~wsbus.bus.ClaimsAliases`, :class:`~wsbus.bus.PublishesNowait`,
:class:`~wsbus.bus.ReportsAvailability`) are tested on a bus that has them. The stand-in
gateway is a :class:`~wsbus.bus.HearsLoss`: it records the losses a bus reports in
:attr:`RecordingSink.losses`, for an adapter's own tests of them. Two more things a
subclass may give, so that a renamed method fails loudly and "unavailable" is tested too:

- ``capabilities``: a class attribute, the set of capability protocols the bus is meant to
  offer; the suite checks that it offers exactly those.
- a ``wsbus_make_unavailable`` fixture: an async function that makes a started bus
  unavailable (the in-memory bus: ``bus.down = True``; a bus between processes: stop the
  broker). Without it the suite skips what needs it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Final

import msgspec
import pytest

from wsbus import control
from wsbus.bus import Bus, ClaimsAliases, PublishesNowait, ReportsAvailability
from wsbus.envelope import (
    ClientAddress,
    ConnId,
    Envelope,
    EnvelopeId,
    GatewayAddress,
    NodeId,
    ServiceAddress,
)
from wsbus.errors import BusUnavailable, NoRoute
from wsbus.service import Service

from .services import Probe, Sequencer

__all__ = [
    "BUS_CAPABILITIES",
    "BusConformance",
    "MakeBus",
    "MakeUnavailable",
    "RecordingSink",
    "client_message",
]

MakeBus = Callable[[list[type[Service]]], Awaitable[Bus]]
MakeUnavailable = Callable[[Bus], Awaitable[None]]
"""The ``wsbus_make_unavailable`` fixture: makes a started bus unavailable."""

BUS_CAPABILITIES: Final[tuple[type, ...]] = (ClaimsAliases, PublishesNowait, ReportsAvailability)
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


def client_message(type: str, content: Any, n: int = 1) -> Envelope:
    """Return an envelope as the gateway would publish it for client ``sink.1``."""
    return Envelope(
        id=EnvelopeId(f"m{n}"),
        type=type,
        sender=ClientAddress(ConnId("sink.1")),
        content=content,
        created=time.time(),
    )


class BusConformance:
    """The tests every bus must pass.

    A subclass provides the ``wsbus_make_bus`` fixture: an async factory
    ``make(service_classes) -> Bus`` that cleans up after the test. It may set
    ``capabilities`` and override ``wsbus_make_unavailable`` (see the module's docstring).
    """

    capabilities: ClassVar[frozenset[type] | None] = None
    """The capability protocols the bus is meant to offer; None: not checked."""

    @pytest.fixture
    def wsbus_make_unavailable(self) -> MakeUnavailable | None:
        """Return a function that makes a started bus unavailable; None: cannot."""
        return None

    async def _started(self, make: MakeBus, services: list[type[Service]]) -> RecordingSink:
        bus = await make(services)
        sink = RecordingSink(bus)
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
