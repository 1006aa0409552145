"""The in-memory bus passes the bus conformance suite, and its own specifics."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import msgspec
import pytest
import pytest_asyncio

from wsbus import (
    BusUnavailable,
    ClientAddress,
    ConfigError,
    ConnId,
    Context,
    Envelope,
    MemoryBus,
    NoRoute,
    Service,
    handles,
)
from wsbus.bus import (
    Bus,
    KeepsHistory,
    KeepsSessions,
    ListsServices,
    Probes,
    PublishesFresh,
    PublishesNowait,
    ReportsAvailability,
)
from wsbus_testing.conformance import (
    BusConformance,
    MakeBus,
    MakeUnavailable,
    RecordingSink,
    client_message,
)
from wsbus_testing.services import Probe


class TestMemoryBus(BusConformance):
    capabilities = frozenset(
        {
            KeepsHistory,
            KeepsSessions,
            ListsServices,
            Probes,
            PublishesFresh,
            PublishesNowait,
            ReportsAvailability,
        }
    )

    @pytest.fixture
    def wsbus_make_unavailable(self) -> MakeUnavailable:
        async def make_unavailable(bus: Bus) -> None:
            assert isinstance(bus, MemoryBus)
            bus.down = True

        return make_unavailable

    @pytest_asyncio.fixture
    async def wsbus_make_bus(self) -> AsyncIterator[MakeBus]:
        buses: list[MemoryBus] = []

        async def make(services: list[type[Service]]) -> Bus:
            bus = MemoryBus([cls() for cls in services])
            buses.append(bus)
            return bus

        yield make
        for bus in buses:
            await bus.close()


class Gate(Service):
    """Holds each ``gate.hold`` message until the test opens the gate; records what it took."""

    name = "gate"

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.taken: list[object] = []

    @handles("gate.hold", "shared")
    async def hold(self, message: Envelope, ctx: Context) -> None:
        self.taken.append(message.content)
        await self.open.wait()


class OtherGate(Gate):
    """A second service handling ``shared``, for all-or-nothing routing."""

    name = "other"


async def _gated(
    inbox_size: int = 2, bus_timeout: float = 5.0, services: list[Service] | None = None
) -> tuple[MemoryBus, list[Service]]:
    services = services if services is not None else [Gate()]
    bus = MemoryBus(services, inbox_size=inbox_size, timeout=bus_timeout)
    await bus.start(RecordingSink(bus))
    return bus, services


async def _settled() -> None:
    """Let every task that can run, run (the service takes what it can)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_full_inbox_makes_publish_nowait_decline_and_publish_wait() -> None:
    bus, [gate] = await _gated(inbox_size=2)
    assert isinstance(gate, Gate)
    try:
        assert bus.publish_nowait(client_message("gate.hold", 1))
        await _settled()  # the service holds 1: its inbox is empty
        assert bus.publish_nowait(client_message("gate.hold", 2))
        assert bus.publish_nowait(client_message("gate.hold", 3))
        # Full: nothing is done, nothing refused.
        assert not bus.publish_nowait(client_message("gate.hold", 4))
        waiting = asyncio.create_task(bus.publish(client_message("gate.hold", 4)))
        await _settled()
        assert not waiting.done()
        gate.open.set()
        async with asyncio.timeout(5):
            await waiting
            while len(gate.taken) < 4:
                await asyncio.sleep(0.01)
        assert gate.taken == [1, 2, 3, 4]
    finally:
        await bus.close()


async def test_senders_waiting_for_room_go_first_come_first_served() -> None:
    bus, [gate] = await _gated(inbox_size=1)
    assert isinstance(gate, Gate)
    try:
        bus.publish_nowait(client_message("gate.hold", "held"))
        await _settled()
        bus.publish_nowait(client_message("gate.hold", "queued"))
        first = asyncio.create_task(bus.publish(client_message("gate.hold", "first")))
        await _settled()
        second = asyncio.create_task(bus.publish(client_message("gate.hold", "second")))
        await _settled()
        # A newcomer does not jump the queue, even when a place is free for a moment.
        gate.taken.clear()
        gate.open.set()
        async with asyncio.timeout(5):
            while not first.done():
                assert not bus.publish_nowait(client_message("gate.hold", "newcomer"))
                await asyncio.sleep(0)
            await second
            while len(gate.taken) < 3:
                await asyncio.sleep(0.01)
        assert gate.taken[:3] == ["queued", "first", "second"]
    finally:
        await bus.close()


async def test_a_sender_that_gives_up_waiting_passes_its_turn_on() -> None:
    bus, [gate] = await _gated(inbox_size=1)
    assert isinstance(gate, Gate)
    try:
        bus.publish_nowait(client_message("gate.hold", "held"))
        await _settled()
        bus.publish_nowait(client_message("gate.hold", "queued"))
        quitter = asyncio.create_task(bus.publish(client_message("gate.hold", "quitter")))
        await _settled()
        patient = asyncio.create_task(bus.publish(client_message("gate.hold", "patient")))
        await _settled()
        quitter.cancel()
        gate.open.set()
        async with asyncio.timeout(5):
            await patient
            while len(gate.taken) < 3:
                await asyncio.sleep(0.01)
            await _settled()
        assert quitter.cancelled()
        assert gate.taken == ["held", "queued", "patient"]
        # No place was lost on the way: the inbox takes messages at once again.
        assert bus.publish_nowait(client_message("gate.hold", "after"))
    finally:
        await bus.close()


async def test_a_stuck_service_is_refused_unavailable_after_the_timeout() -> None:
    bus, _ = await _gated(inbox_size=1, bus_timeout=0.05)
    try:
        bus.publish_nowait(client_message("gate.hold", 1))
        await _settled()
        bus.publish_nowait(client_message("gate.hold", 2))
        with pytest.raises(BusUnavailable) as info:
            await bus.publish(client_message("gate.hold", 3))
        # The service is at fault, not the bus: the gateway keeps admitting clients.
        assert info.value.whole_bus is False
        assert bus.available
    finally:
        await bus.close()


async def test_a_service_leaving_releases_those_waiting_for_it() -> None:
    bus, _ = await _gated(inbox_size=1)
    try:
        bus.publish_nowait(client_message("gate.hold", 1))
        await _settled()
        bus.publish_nowait(client_message("gate.hold", 2))
        waiting = asyncio.create_task(bus.publish(client_message("gate.hold", 3)))
        await _settled()
        async with asyncio.timeout(5):
            await bus.remove_service("gate")
            with pytest.raises(BusUnavailable):
                await waiting
        with pytest.raises(NoRoute):
            await bus.publish(client_message("gate.hold", 4))
    finally:
        await bus.close()


async def test_a_type_several_services_handle_waits_until_each_has_room() -> None:
    bus, [gate, other] = await _gated(inbox_size=1, services=[Gate(), OtherGate()])
    assert isinstance(gate, Gate) and isinstance(other, Gate)
    try:
        gate.open.set()  # gate takes everything; other holds
        assert bus.publish_nowait(client_message("shared", 1))
        await _settled()
        assert bus.publish_nowait(client_message("shared", 2))  # other's inbox: 2
        await _settled()
        # All or nothing: gate has room, other has none, so neither gets it yet.
        assert not bus.publish_nowait(client_message("shared", 3))
        assert gate.taken == [1, 2]
        waiting = asyncio.create_task(bus.publish(client_message("shared", 3)))
        await _settled()
        assert not waiting.done() and gate.taken == [1, 2]
        other.open.set()
        async with asyncio.timeout(5):
            await waiting
            while len(other.taken) < 3 or len(gate.taken) < 3:
                await asyncio.sleep(0.01)
        assert gate.taken == other.taken == [1, 2, 3]
    finally:
        await bus.close()


async def test_a_service_sending_to_a_full_inbox_is_refused() -> None:
    """A service's send cannot wait (it is synchronous): a full inbox refuses it."""
    bus, [gate] = await _gated(inbox_size=1)
    try:
        bus.publish_nowait(client_message("gate.hold", 1))
        await _settled()
        bus.publish_nowait(client_message("gate.hold", 2))
        with pytest.raises(BusUnavailable):
            gate.link.publish("gate.hold", 3)
    finally:
        await bus.close()


async def test_removed_service_means_no_route() -> None:
    bus = MemoryBus([Probe()])
    await bus.start(RecordingSink(bus))
    await bus.remove_service("probe")
    with pytest.raises(NoRoute):
        await bus.publish(client_message("probe.echo", 1))
    await bus.close()


async def test_two_services_with_one_name_are_refused() -> None:
    bus = MemoryBus([Probe()])
    await bus.start(RecordingSink(bus))
    with pytest.raises(ConfigError):
        await bus.add_service(Probe())
    await bus.close()


async def test_a_sender_refused_after_its_wait_passes_the_place_on() -> None:
    """The bus marked down while two wait: the first is refused, the next is woken too."""
    bus, [gate] = await _gated(inbox_size=1, bus_timeout=60.0)
    assert isinstance(gate, Gate)
    try:
        bus.publish_nowait(client_message("gate.hold", "held"))
        await _settled()
        bus.publish_nowait(client_message("gate.hold", "queued"))
        first = asyncio.create_task(bus.publish(client_message("gate.hold", "first")))
        await _settled()
        second = asyncio.create_task(bus.publish(client_message("gate.hold", "second")))
        await _settled()
        bus.down = True
        gate.open.set()
        async with asyncio.timeout(10):
            # The first is given the place, finds the bus down, and gives the place on;
            # the second is answered now, not after the bus's timeout.
            results = await asyncio.gather(first, second, return_exceptions=True)
        assert all(isinstance(result, BusUnavailable) for result in results), results
    finally:
        bus.down = False
        await bus.close()


class Taker(Service):
    """Takes ``taker.take`` and ``pair`` messages at once."""

    name = "a-taker"  # before "holder": a fan-out takes its place here first

    @handles("taker.take", "pair")
    async def take(self, message: Envelope, ctx: Context) -> None:
        pass


class Holder(Service):
    """Holds each ``pair`` message until the test opens the gate."""

    name = "holder"

    def __init__(self) -> None:
        self.open = asyncio.Event()

    @handles("pair")
    async def hold(self, message: Envelope, ctx: Context) -> None:
        await self.open.wait()


async def _one_free_one_full(bus_timeout: float) -> tuple[MemoryBus, Holder]:
    """``a-taker`` (inbox 1) takes everything; ``holder`` holds one and has a full inbox."""
    holder = Holder()
    bus, _ = await _gated(inbox_size=1, bus_timeout=bus_timeout, services=[Taker(), holder])
    assert bus.publish_nowait(client_message("pair", 1))
    await _settled()
    assert bus.publish_nowait(client_message("pair", 2))  # holder's inbox is full
    await _settled()
    return bus, holder


async def test_a_fan_out_refused_after_its_timeout_gives_back_the_places_it_held() -> None:
    bus, holder = await _one_free_one_full(bus_timeout=0.05)
    try:
        with pytest.raises(BusUnavailable) as info:
            await bus.publish(client_message("pair", 3))
        assert info.value.whole_bus is False
        # The place held at a-taker meanwhile is free again.
        assert bus.publish_nowait(client_message("taker.take", "after"))
    finally:
        holder.open.set()
        await bus.close()


async def test_a_cancelled_fan_out_gives_back_the_places_it_held() -> None:
    bus, holder = await _one_free_one_full(bus_timeout=60.0)
    try:
        waiting = asyncio.create_task(bus.publish(client_message("pair", 3)))
        await _settled()
        # Its place at a-taker is held while it waits for holder: nobody else takes it.
        assert not bus.publish_nowait(client_message("taker.take", "during"))
        waiting.cancel()
        async with asyncio.timeout(10):
            await asyncio.gather(waiting, return_exceptions=True)
        assert bus.publish_nowait(client_message("taker.take", "after"))
    finally:
        holder.open.set()
        await bus.close()


# -- room given per batch: the low-water mark and each waiting client's share -------------


class Turnstile(Service):
    """Takes one ``turn.take`` message per ticket the test gives; records them in order."""

    name = "turnstile"

    def __init__(self) -> None:
        self.tickets = asyncio.Semaphore(0)
        self.taken: list[object] = []

    @handles("turn.take")
    async def take(self, message: Envelope, ctx: Context) -> None:
        await self.tickets.acquire()
        self.taken.append(message.content)


def _from(client: str, n: int) -> Envelope:
    """A ``turn.take`` message from client ``sink.<client>``, its content ``<client><n>``."""
    message = client_message("turn.take", f"{client}{n}", n)
    return msgspec.structs.replace(message, sender=ClientAddress(ConnId(f"sink.{client}")))


async def _full_turnstile(bus_timeout: float = 60.0) -> tuple[MemoryBus, Turnstile]:
    """A turnstile with an inbox of 8 (its mark: 4), holding x0 and with x1..x8 waiting."""
    turnstile = Turnstile()
    bus, _ = await _gated(inbox_size=8, bus_timeout=bus_timeout, services=[turnstile])
    assert bus.publish_nowait(_from("x", 0))
    await _settled()  # x0 is in the handler, waiting for its ticket
    for n in range(1, 9):
        assert bus.publish_nowait(_from("x", n))
    assert not bus.publish_nowait(_from("x", 9))
    return bus, turnstile


async def _take(turnstile: Turnstile, count: int) -> None:
    """Let the service take ``count`` messages out of its inbox, and everything settle."""
    for _ in range(count):
        turnstile.tickets.release()
    await _settled()


async def test_a_waiting_client_is_let_in_once_the_inbox_drained_to_its_mark() -> None:
    bus, turnstile = await _full_turnstile()
    try:
        waiting = asyncio.create_task(bus.publish(_from("a", 0)))
        await _settled()
        await _take(turnstile, 3)  # x1..x3 out: 5 left, above the mark
        assert not waiting.done()
        await _take(turnstile, 1)  # x4 out: 4 left, the mark
        async with asyncio.timeout(5):
            await waiting
        # Let in when 4 places were free: one for a0, three kept for a's next messages,
        # which nobody else gets.
        assert not bus.publish_nowait(_from("b", 0))
        assert all(bus.publish_nowait(_from("a", n)) for n in (1, 2, 3))
        assert not bus.publish_nowait(_from("a", 4))  # full, and a's share is spent
        await _take(turnstile, 12)
        assert turnstile.taken == [f"x{n}" for n in range(9)] + ["a0", "a1", "a2", "a3"]
    finally:
        await bus.close()


async def test_waiting_clients_get_equal_shares_first_come_first_served() -> None:
    bus, turnstile = await _full_turnstile()
    try:
        first = asyncio.create_task(bus.publish(_from("a", 0)))
        await _settled()
        second = asyncio.create_task(bus.publish(_from("b", 0)))
        await _settled()
        await _take(turnstile, 4)  # at the mark: 4 free places, 2 each
        async with asyncio.timeout(5):
            await asyncio.gather(first, second)
        assert not bus.publish_nowait(_from("c", 0))  # a newcomer waits behind them
        assert bus.publish_nowait(_from("b", 1))
        assert bus.publish_nowait(_from("a", 1))
        assert not bus.publish_nowait(_from("a", 2))
        assert not bus.publish_nowait(_from("b", 2))
        await _take(turnstile, 12)
        assert turnstile.taken[9:] == ["a0", "b0", "b1", "a1"]
    finally:
        await bus.close()


async def test_a_share_not_spent_goes_back_when_the_inbox_drains_to_its_mark() -> None:
    bus, turnstile = await _full_turnstile()
    try:
        first = asyncio.create_task(bus.publish(_from("a", 0)))
        await _settled()
        await _take(turnstile, 4)
        async with asyncio.timeout(5):
            await first  # a holds three more places, and sends nothing for now
        second = asyncio.create_task(bus.publish(_from("b", 0)))
        await _settled()
        assert not second.done()  # 5 in the inbox: above the mark
        await _take(turnstile, 1)  # at the mark again: a's three places go back
        async with asyncio.timeout(5):
            await second
        assert not bus.publish_nowait(_from("a", 1))
        assert all(bus.publish_nowait(_from("b", n)) for n in (1, 2, 3))
        await _take(turnstile, 12)
        assert turnstile.taken[9:] == ["a0", "b0", "b1", "b2", "b3"]
    finally:
        await bus.close()


async def test_a_service_that_stops_taking_above_its_mark_is_stuck_after_the_timeout() -> None:
    bus, turnstile = await _full_turnstile(bus_timeout=0.05)
    try:
        await _take(turnstile, 2)  # it took two, then nothing
        assert bus.publish_nowait(_from("y", 1))
        assert bus.publish_nowait(_from("y", 2))
        waiting = asyncio.create_task(bus.publish(_from("a", 0)))
        await _settled()
        await _take(turnstile, 1)  # one more: 7 stay, above the mark
        with pytest.raises(BusUnavailable) as info:
            await waiting
        assert info.value.whole_bus is False
        assert bus.available
    finally:
        turnstile.tickets.release()
        await bus.close()


async def test_a_client_waiting_on_a_service_that_takes_nothing_is_refused() -> None:
    bus, turnstile = await _full_turnstile(bus_timeout=0.05)
    try:
        with pytest.raises(BusUnavailable) as info:
            await bus.publish(_from("a", 0))
        assert info.value.whole_bus is False
        assert bus.available
    finally:
        turnstile.tickets.release()
        await bus.close()


async def test_a_slow_service_that_keeps_taking_messages_is_not_called_stuck() -> None:
    # "Stuck" is taking nothing for the bus's timeout. A client waiting for the inbox to
    # drain to its mark (a batch) waits longer than that behind a slow service: it was
    # refused unavailable while the service kept taking messages.
    timeout = 0.5
    turnstile = Turnstile()
    bus, _ = await _gated(inbox_size=40, bus_timeout=timeout, services=[turnstile])
    loop = asyncio.get_running_loop()
    try:
        assert bus.publish_nowait(_from("x", 0))
        await _settled()  # x0 in the handler, waiting for its ticket
        for n in range(1, 41):
            assert bus.publish_nowait(_from("x", n))
        waiting = asyncio.create_task(bus.publish(_from("a", 0)))
        await _settled()
        # One take every tenth of the timeout: twenty of them (twice the timeout at the
        # least) before the inbox is at its mark. When each was given, seen by the service.
        given = [loop.time()]
        async with asyncio.timeout(60):
            while not waiting.done():
                turnstile.tickets.release()
                given.append(loop.time())
                await asyncio.wait({waiting}, timeout=timeout / 10)
        try:
            waiting.result()
        except BusUnavailable:
            # Only a machine so busy that the service really took nothing for the timeout
            # (its loop stalled) may see it refused.
            given.append(loop.time())
            longest = max(later - before for before, later in itertools.pairwise(given))
            assert longest >= timeout, (
                f"refused as stuck, although it took a message at least every {longest:.3f} s"
            )
        assert len(given) > 20
    finally:
        turnstile.tickets.release()
        await bus.close()


async def test_places_reserved_for_a_client_go_back_once_the_service_is_idle() -> None:
    # A client let in with a share of the room, which then sends nothing more (it left):
    # its places stayed reserved, and senders that cannot wait (a service's sends, the
    # gateway's own envelopes) were refused with the inbox far from full.
    bus, turnstile = await _full_turnstile()
    try:
        waiting = asyncio.create_task(bus.publish(_from("a", 0)))
        await _settled()
        await _take(turnstile, 4)  # at the mark: a is let in, three places kept for it
        async with asyncio.timeout(5):
            await waiting
        await _take(turnstile, 6)  # x4..x8 and a0: the service is idle, nobody waits
        assert turnstile.taken[-1] == "a0"
        assert bus.publish_nowait(_from("b", 0))
        await _settled()  # b0 in the handler, waiting for its ticket
        assert all(bus.publish_nowait(_from("b", n)) for n in range(1, 9))  # the whole inbox
        assert not bus.publish_nowait(_from("b", 9))
    finally:
        turnstile.tickets.release()
        await bus.close()
