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
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import pytest

from wsbus import control
from wsbus.bus import Bus
from wsbus.envelope import (
    ClientAddress,
    ConnId,
    Envelope,
    EnvelopeId,
    GatewayAddress,
    NodeId,
    ServiceAddress,
)
from wsbus.errors import NoRoute
from wsbus.service import Service

from .services import Probe, Sequencer

__all__ = ["BusConformance", "MakeBus", "RecordingSink", "client_message"]

MakeBus = Callable[[list[type[Service]]], Awaitable[Bus]]


class RecordingSink:
    """A stand-in gateway: records what the bus delivers and answers control requests.

    Control requests are answered ``ok`` with a plausible value (True for join and leave,
    the alias asked for, an empty client list).
    """

    def __init__(self, bus: Bus, node: str = "sink") -> None:
        self._node = NodeId(node)
        self.bus = bus
        self.delivered: list[Envelope] = []
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
    ``make(service_classes) -> Bus`` that cleans up after the test.
    """

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
