"""Delivery receipts and client acknowledgements (wsbus/receipts.py, the session's and the
outbound's tracking, ServiceLink.send_with_receipt): on a real Gateway with the memory bus,
and on the real WebSocket edge where what reached a socket matters."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection as WsClient
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed as WsClosed

from tests.conftest import Control, assert_balanced
from wsbus import (
    Codec,
    ConnId,
    Context,
    Envelope,
    Gateway,
    GatewayConfig,
    MemoryBus,
    Recipients,
    RequestTimeout,
    Service,
    handles,
    hookimpl,
)
from wsbus.bus import SHARED_HEADER
from wsbus.control import (
    ACK_HEADER,
    PROCESSED,
    RECEIPT,
    RECEIPT_HEADER,
    Delivery,
    Processed,
    Receipt,
)
from wsbus.edge import MemoryClient, memory_pair
from wsbus.envelope import EnvelopeId, GatewayAddress, IdFactory, NodeId, ServiceAddress
from wsbus.gateway import ResumeSettings
from wsbus.hooks import Hooks
from wsbus.receipts import ReceiptTracker, merge
from wsbus.registry import ClientRegistry
from wsbus.service import ServiceLink
from wsbus.session import Session
from wsbus.stats import Counters
from wsbus_websockets import EdgeServer, serve

Connect = Callable[..., Awaitable[MemoryClient]]


class Notes(Service):
    """Sends what the tests ask it to; records the receipts and acknowledgements it gets."""

    name = "notes"

    def __init__(self) -> None:
        self.receipts: list[Envelope] = []
        self.processed: list[Processed] = []
        self.heard = asyncio.Event()

    @handles(RECEIPT)
    async def receipt(self, message: Envelope, ctx: Context) -> None:
        self.receipts.append(message)
        self.heard.set()

    @handles(PROCESSED)
    async def acked(self, message: Envelope, ctx: Context) -> None:
        self.processed.append(msgspec.convert(message.content, Processed))
        self.heard.set()

    async def until(self, condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(10):
            while not condition():
                self.heard.clear()
                await self.heard.wait()


@pytest.fixture
def notes() -> Notes:
    return Notes()


@pytest.fixture
def wsbus_services(notes: Notes) -> list[Service]:
    return [notes, Control()]


async def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:  # noqa: ASYNC109
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


async def _settled(gateway: Gateway) -> None:
    """Wait until every receipt is sent and the report queue is empty."""
    await _until(
        lambda: (s := gateway.stats()).receipts_pending == 0 and s.presence_events_queued == 0
    )
    await asyncio.sleep(0.05)  # the report task hands the last ones to the bus


# -- the merge, pure ---------------------------------------------------------------------


def test_a_name_is_unmatched_only_when_every_gateway_says_so() -> None:
    a = Receipt(
        NodeId("a"),
        (Delivery(ConnId("a.1"), "written"),),
        Recipients(conn_ids=(ConnId("b.7"),), aliases=("ann", "bob"), groups=("g",)),
    )
    b = Receipt(
        NodeId("b"),
        (Delivery(ConnId("b.2"), "dropped", code=4507),),
        Recipients(aliases=("bob",), groups=("g",)),
    )
    merged = merge("m1", [a, b])
    assert merged.unmatched == Recipients(aliases=("bob",), groups=("g",))  # b.7 is b's to say
    assert [d.conn_id for d in merged.written] == ["a.1"]
    assert [(d.conn_id, d.code) for d in merged.dropped] == [("b.2", 4507)]
    assert merged.nodes == ("a", "b")
    own = merge("m1", [Receipt(NodeId("b"), (), Recipients(conn_ids=(ConnId("b.7"),)))])
    assert own.unmatched.conn_ids == ("b.7",)
    gone = merge("m1", [], absent=[ConnId("c.1")])
    assert gone.unmatched.conn_ids == ("c.1",)


def test_a_gateway_that_delivered_nothing_does_not_vote_on_names() -> None:
    filtered = Receipt(NodeId("a"), failed="filtered")
    missed = Receipt(NodeId("b"), unmatched=Recipients(users=("ann",), everyone=True))
    merged = merge("m", [filtered, missed])
    assert merged.unmatched == Recipients(users=("ann",), everyone=True)
    assert merged.failed == {"a": "filtered"}


# -- the three outcomes on a real socket ---------------------------------------------------

EDGE = GatewayConfig(node="t", outbound_queue=4, outbound_bytes=65536)


@pytest.fixture
async def edge(wsbus_gateway: Gateway) -> AsyncIterator[EdgeServer]:
    server = await serve(wsbus_gateway, "127.0.0.1", 0)
    try:
        yield server
    finally:
        await wsbus_gateway.close()
        await server.close()


async def _join(ws: WsClient, group: str) -> str:
    welcome = msgspec.json.decode(await ws.recv())
    await ws.send(msgspec.json.encode({"type": "ctl.join", "content": {"group": group}}).decode())
    while msgspec.json.decode(await ws.recv())["type"] != "ctl.join.reply":
        pass
    conn_id: str = welcome["content"]["conn_id"]
    return conn_id


@pytest.mark.parametrize("wsbus_config", [EDGE])
async def test_a_receipt_tells_written_dropped_and_unmatched_apart(
    edge: EdgeServer, wsbus_gateway: Gateway, notes: Notes
) -> None:
    async with (
        ws_connect(edge.url) as fast,
        ws_connect(edge.url, max_queue=1) as slow,  # reads nothing after the join
    ):
        fast_id = await _join(fast, "room")
        slow_id = await _join(slow, "room")
        session = wsbus_gateway._sessions[ConnId(slow_id)]
        link = notes.link
        only_slow = Recipients(conn_ids=(ConnId(slow_id),))
        pad = "x" * 8000
        # Fill the slow client's socket until a frame has to wait in its queue.
        async with asyncio.timeout(30):
            while not session.outbox:
                for _ in range(16):
                    link.send(only_slow, "fill", pad)
                await asyncio.sleep(0.001)
        assert session.close_code is None
        receipts = asyncio.create_task(
            link.send_with_receipt(
                Recipients(groups=("room",), aliases=("nobody",)), "note", {"n": 1}
            )
        )
        await asyncio.sleep(0)  # sent: queued for both members
        for _ in range(8):
            link.send(only_slow, "fill", pad)  # the slow queue overflows: 4507
        assert session.close_code == 4507
        got = await receipts
        # The fast one reads it.
        while (frame := msgspec.json.decode(await fast.recv()))["type"] != "note":
            pass
        assert frame["id"] == got.id
        # The slow client reads again: what reached its socket, then the close.
        with pytest.raises(WsClosed) as closed:
            async with asyncio.timeout(10):
                while True:
                    await slow.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4507
    assert [(d.conn_id, d.outcome) for d in got.written] == [(fast_id, "written")]
    assert [(d.conn_id, d.outcome, d.code) for d in got.dropped] == [(slow_id, "dropped", 4507)]
    assert got.refused == []
    assert got.unmatched == Recipients(aliases=("nobody",))
    assert got.nodes == ("t",)
    await _settled(wsbus_gateway)
    stats = wsbus_gateway.stats()
    assert stats.receipts_requested == stats.receipts == 1
    assert_balanced(stats)


# -- on the memory edge -------------------------------------------------------------------


@pytest.mark.parametrize(
    # A short drain: the client never reads what is left for it.
    "wsbus_config",
    [GatewayConfig(node="t", outbound_queue=1, slow_consumer="drop", drain_timeout=0.2)],
)
async def test_a_full_queue_under_drop_is_refused(
    wsbus_connect: Connect, wsbus_gateway: Gateway, notes: Notes
) -> None:
    client = await wsbus_connect(buffer=1)  # the connection takes one frame at a time
    only = Recipients(conn_ids=(ConnId(client.conn_id or ""),))
    for _ in range(3):
        notes.link.send(only, "fill", "x")
    got = await notes.link.send_with_receipt(only, "note", 1, timeout=5)
    assert [(d.conn_id, d.outcome) for d in got.refused] == [(client.conn_id, "refused")]
    assert got.written == [] and got.dropped == []
    await _settled(wsbus_gateway)
    assert_balanced(wsbus_gateway.stats())


async def test_a_receipt_comes_when_nothing_was_delivered_here(
    wsbus_connect: Connect, wsbus_gateway: Gateway, notes: Notes
) -> None:
    client = await wsbus_connect()
    me = ConnId(client.conn_id or "")
    excluded = await notes.link.send_with_receipt(Recipients(conn_ids=(me,), exclude=(me,)), "x")
    assert excluded.written == [] and excluded.unmatched == Recipients()
    assert excluded.nodes == ("test",)
    empty = await notes.link.send_with_receipt(Recipients(groups=("empty",)), "x")
    assert empty.unmatched == Recipients(groups=("empty",))
    # A shared send (several gateways got it) names only this node's connections missed.
    notes.link.send(
        Recipients(conn_ids=(ConnId("elsewhere.1"),), aliases=("zed",)),
        "x",
        headers={SHARED_HEADER: "1"},
        receipt=True,
    )
    await notes.until(lambda: len(notes.receipts) == 1)
    shared = msgspec.convert(notes.receipts[0].content, Receipt)
    assert shared.unmatched == Recipients(aliases=("zed",))
    await _settled(wsbus_gateway)
    stats = wsbus_gateway.stats()
    assert stats.receipts_requested == stats.receipts == 3
    assert_balanced(stats)


async def test_no_receipt_is_asked_without_the_header(
    wsbus_connect: Connect, wsbus_gateway: Gateway, notes: Notes
) -> None:
    client = await wsbus_connect()
    notes.link.send(Recipients(conn_ids=(ConnId(client.conn_id or ""),)), "x", 1)
    frame = await client.receive()
    assert "ack" not in frame
    await _settled(wsbus_gateway)
    stats = wsbus_gateway.stats()
    assert stats.receipts_requested == stats.acks_requested == 0
    assert notes.receipts == []


async def test_a_receipt_that_does_not_come_names_the_gateway(notes: Notes) -> None:
    bus = MemoryBus([notes])
    gateway = Gateway(bus, config=GatewayConfig(node="t"), entry_points=False)
    async with gateway:
        bus.down = True  # the gateway never gets it: the send itself is refused
        with pytest.raises(Exception, match="marked down"):
            await notes.link.send_with_receipt(Recipients(groups=("g",)), "x", timeout=0.5)
        bus.down = False

        async def nodes() -> list[NodeId]:
            return [NodeId("t"), NodeId("gone")]

        notes.link._gateways = nodes
        with pytest.raises(RequestTimeout, match="gone"):
            await notes.link.send_with_receipt(Recipients(groups=("g",)), "x", timeout=0.5)


# -- acknowledgements ---------------------------------------------------------------------


async def test_a_client_acknowledges_and_the_service_hears_it(
    wsbus_connect: Connect, wsbus_gateway: Gateway, notes: Notes
) -> None:
    client = await wsbus_connect()
    me = ConnId(client.conn_id or "")
    sent = notes.link.send(Recipients(conn_ids=(me,)), "task", {"n": 1}, ack=True)
    frame = await client.receive()
    assert frame["ack"] is True and frame["id"] == sent
    assert wsbus_gateway.stats().unacked == 1
    client.send("wsbus.processed", {"ids": [sent, "never-sent"]})
    await notes.until(lambda: bool(notes.processed))
    assert notes.processed == [Processed(me, (sent,))]
    client.send("wsbus.processed", {"ids": [sent]})  # twice: ignored, not an error
    client.send("wsbus.processed", {"ids": "all"})
    error = await client.receive()
    assert error["type"] == "wsbus.error" and error["content"]["code"] == "invalid_message"
    client.send("wsbus.resume", {"token": "v1.x.y"}, id="late")  # only as the first frame
    error = await client.receive()
    assert error["content"]["code"] == "invalid_message" and error["content"]["ref"] == "late"
    client.send("wsbus.other", {})
    error = await client.receive()
    assert error["content"]["code"] == "reserved_type"
    stats = wsbus_gateway.stats()
    assert (stats.acks_requested, stats.acks, stats.unacked) == (1, 1, 0)
    assert stats.frames_control == 2
    assert len(notes.processed) == 1
    await _settled(wsbus_gateway)
    assert_balanced(wsbus_gateway.stats())


@pytest.mark.parametrize(
    "wsbus_config", [GatewayConfig(node="t", resume=ResumeSettings(max_unacked=2))]
)
async def test_unacknowledged_deliveries_are_bounded_and_kept_at_close(
    wsbus_connect: Connect, wsbus_gateway: Gateway, notes: Notes
) -> None:
    client = await wsbus_connect()
    me = ConnId(client.conn_id or "")
    session = wsbus_gateway._sessions[me]
    ids = [notes.link.send(Recipients(conn_ids=(me,)), "task", n, ack=True) for n in range(3)]
    for _ in ids:
        await client.receive()
    assert [e.id for e in session.unacked()] == ids[1:]  # the oldest made room
    client.close()
    await _until(lambda: me not in wsbus_gateway._sessions)
    assert [e.id for e in session.unacked()] == ids[1:]  # what the session record keeps
    stats = wsbus_gateway.stats()
    assert (stats.acks_requested, stats.unacked_dropped, stats.unacked_closed) == (3, 1, 2)
    assert_balanced(stats)


async def test_receipt_and_ack_together_on_a_group(
    wsbus_connect: Connect, wsbus_gateway: Gateway, notes: Notes
) -> None:
    clients = [await wsbus_connect() for _ in range(3)]
    for client in clients:
        client.send("ctl.join", {"group": "g"}, id="j")
        await client.receive_until("ctl.join.reply")
    got = await notes.link.send_with_receipt(Recipients(groups=("g",)), "task", 7, ack=True)
    assert sorted(d.conn_id for d in got.written) == sorted(c.conn_id or "" for c in clients)
    for client in clients:
        frame = await client.receive_until("task")
        assert frame["ack"] is True
        client.send("wsbus.processed", {"ids": [frame["id"]]})
    await notes.until(lambda: len(notes.processed) == 3)
    await _settled(wsbus_gateway)
    stats = wsbus_gateway.stats()
    assert (stats.acks_requested, stats.acks) == (3, 3)
    assert_balanced(stats)


def test_headers_are_what_send_sets() -> None:
    sent: list[Envelope] = []
    loop = asyncio.new_event_loop()
    try:
        link = ServiceLink("s", sent.append, loop)
        link.send(Recipients(groups=("g",)), "x", receipt=True, ack=True, headers={"k": "v"})
        link.send(Recipients(groups=("g",)), "x")
    finally:
        loop.close()
    assert sent[0].headers == {"k": "v", RECEIPT_HEADER: "1", ACK_HEADER: "1"}
    assert sent[1].headers == {}
    assert sent[0].sender == ServiceAddress("s")


async def test_a_receipt_counts_only_from_the_gateway_it_speaks_for() -> None:
    # The security review's proof, inverted: a receipt from a service (it predicted the
    # message's id), or from gateway a speaking for gateway b, ends no wait.
    sent: list[Envelope] = []

    async def gateways() -> list[NodeId]:
        return [NodeId("a"), NodeId("b")]

    link = ServiceLink("s", sent.append, asyncio.get_running_loop(), gateways=gateways)
    waiting = asyncio.create_task(link.send_with_receipt(Recipients(groups=("g",)), "x"))
    async with asyncio.timeout(5):
        while not sent:
            await asyncio.sleep(0)
    [message] = sent

    def receipt(sender: GatewayAddress | ServiceAddress, part: Receipt) -> Envelope:
        return Envelope(
            id=EnvelopeId(f"r-{len(sent)}"),
            type=RECEIPT,
            sender=sender,
            content=msgspec.to_builtins(part),
            reply_to=message.id,
            to=ServiceAddress("s"),
        )

    fake = (Delivery(ConnId("b.999"), "written", user="admin"),)
    for forged in (
        receipt(ServiceAddress("evil"), Receipt(NodeId("a"), fake)),
        receipt(ServiceAddress("evil"), Receipt(NodeId("b"), fake)),
        receipt(GatewayAddress(NodeId("a")), Receipt(NodeId("b"), fake)),
    ):
        assert link.accept_answer(forged)  # taken care of: dropped
    await asyncio.sleep(0)
    assert not waiting.done() and link.forged == 3
    written = (Delivery(ConnId("a.1"), "written"),)
    link.accept_answer(receipt(GatewayAddress(NodeId("a")), Receipt(NodeId("a"), written)))
    link.accept_answer(receipt(GatewayAddress(NodeId("b")), Receipt(NodeId("b"))))
    async with asyncio.timeout(5):
        got = await waiting
    assert [d.conn_id for d in got.written] == ["a.1"]
    assert sorted(got.nodes) == ["a", "b"] and link.forged == 3


# -- the session's part, sans-I/O ------------------------------------------------------------


def test_a_tracked_delivery_is_written_when_the_socket_has_it_and_dropped_otherwise() -> None:
    conn = ConnId("t.1")
    registry = ClientRegistry()
    registry.connect(conn, user="ann")
    counters = Counters.zero()
    in_transport = [0]  # frames the transport took and has not written to its socket
    settles: list[int] = []

    class Driver:
        def write(self) -> None: ...
        def close(self) -> None: ...
        def settle_soon(self) -> None:
            settles.append(1)

    def send_nowait(data: bytes) -> bool:
        in_transport[0] += 1
        return True

    session = Session(
        conn,
        Codec.JSON,
        GatewayConfig(),
        counters,
        Hooks((), entry_points=False),
        registry.addresses,
        IdFactory("t").next,
        send_nowait=send_nowait,
        unsent=lambda: in_transport[0],
        driver=Driver(),
    )
    finished: list[ReceiptTracker] = []
    message = Envelope(id=EnvelopeId("m"), type="x", sender=ServiceAddress("s"))

    def tracker() -> ReceiptTracker:
        return ReceiptTracker(
            message, NodeId("t"), 1, Recipients(), registry.addresses, finished.append, 0.0
        )

    first, second = tracker(), tracker()
    assert session.queue(b"1", first) and session.queue(b"2", second)
    assert finished == [] and settles  # taken, not yet on the socket
    in_transport[0] = 1  # the first reached the socket
    session.settle()
    assert finished == [first]
    assert first.receipt().deliveries == (Delivery(conn, "written", user="ann"),)
    session.ended(1006, "gone")
    session.discard()
    assert finished == [first, second]
    assert second.receipt().deliveries == (Delivery(conn, "dropped", user="ann", code=1006),)
    assert (counters.deliveries_written, counters.deliveries_dropped) == (1, 1)


def test_a_close_tells_receipts_at_once_what_will_never_be_written() -> None:
    conn = ConnId("t.1")
    registry = ClientRegistry()
    registry.connect(conn)
    counters = Counters.zero()

    class Driver:
        def write(self) -> None: ...
        def close(self) -> None: ...
        def settle_soon(self) -> None: ...

    session = Session(
        conn,
        Codec.JSON,
        GatewayConfig(),
        counters,
        Hooks((), entry_points=False),
        registry.addresses,
        IdFactory("t").next,
        driver=Driver(),
    )
    finished: list[ReceiptTracker] = []
    message = Envelope(id=EnvelopeId("m"), type="x", sender=ServiceAddress("s"))
    trackers = [
        ReceiptTracker(
            message, NodeId("t"), 1, Recipients(), registry.addresses, finished.append, 0
        )
        for _ in range(3)
    ]
    for n, tracker in enumerate(trackers):
        assert session.queue(str(n).encode(), tracker)
    session.close(4000, "bye", flush=True)
    assert finished == []  # the flush may yet write them
    session.flush_ended()
    # The head may be in the writer's hands: only the others are known dropped now.
    assert finished == trackers[1:]
    assert [d.code for t in finished for d in t.receipt().deliveries] == [4000, 4000]
    session.written()  # the writer's send of the head returned after all
    assert finished == [*trackers[1:], trackers[0]]
    assert trackers[0].receipt().deliveries[0].outcome == "written"
    session.ended(4000, "bye")
    session.discard()
    assert (counters.deliveries_written, counters.deliveries_dropped) == (1, 2)
    assert len(finished) == 3


async def test_receipts_from_two_gateways_are_merged() -> None:
    from tests.wsbus.cluster import Cluster, running

    notes = Notes()
    cluster = Cluster([notes, Control()])
    async with running(cluster) as run:
        a, b = run.gateways
        ann = await run.connect(a)
        bob = await run.connect(b)
        for client, group in ((ann, "g"), (bob, "g"), (ann, "only-a")):
            client.send("ctl.join", {"group": group}, id="j")
            await client.receive_until("ctl.join.reply")
        got = await notes.link.send_with_receipt(
            Recipients(groups=("g", "only-a", "none"), aliases=("nobody",)), "note", 1
        )
        assert sorted(d.conn_id for d in got.written) == sorted(
            [ann.conn_id or "", bob.conn_id or ""]
        )
        # b matched neither only-a nor none, a matched only-a: only "none" reached nobody.
        assert got.unmatched == Recipients(aliases=("nobody",), groups=("none",))
        assert sorted(got.nodes) == ["a", "b"]
        # Connection ids only: the owner's receipt is waited for (this bus shares the
        # message with a too, whose receipt, if in first, says nothing of b's ids).
        only_bob = await notes.link.send_with_receipt(
            Recipients(conn_ids=(ConnId(bob.conn_id or ""), ConnId("b.999"))), "note", 2
        )
        assert "b" in only_bob.nodes
        assert [d.conn_id for d in only_bob.written] == [bob.conn_id]
        assert only_bob.unmatched == Recipients(conn_ids=(ConnId("b.999"),))
        # A node that is not on the bus: its connection ids are unmatched, nobody is asked.
        gone = await notes.link.send_with_receipt(Recipients(conn_ids=(ConnId("z.1"),)), "n")
        assert gone.unmatched.conn_ids == ("z.1",) and gone.nodes == ()
        for gateway in (a, b):
            await _settled(gateway)
            assert_balanced(gateway.stats())


class StripHeaders:
    """An outbound plugin that rewrites every message without its headers."""

    @hookimpl
    def wsbus_transform_outbound(self, message: Envelope) -> Envelope:
        return msgspec.structs.replace(message, headers={})


@pytest.mark.parametrize("wsbus_plugins", [[StripHeaders()]])
async def test_a_plugin_that_rewrites_the_headers_does_not_lose_the_receipt(
    wsbus_connect: Connect, wsbus_gateway: Gateway, notes: Notes
) -> None:
    client = await wsbus_connect()
    me = ConnId(client.conn_id or "")
    got = await notes.link.send_with_receipt(Recipients(conn_ids=(me,)), "task", 1, ack=True)
    assert [d.conn_id for d in got.written] == [me]
    frame = await client.receive()
    assert frame["ack"] is True  # asked by the service, whatever the plugin made of it
    await _settled(wsbus_gateway)
    assert_balanced(wsbus_gateway.stats())


NAMES = st.lists(st.sampled_from(["ann", "bob", "cy"]), unique=True).map(tuple)


@st.composite
def receipts_of_gateways(draw: st.DrawFn) -> list[Receipt]:
    """One receipt per node of a, b, c (some not answering), as gateways would send them."""
    parts = []
    for node in draw(st.lists(st.sampled_from("abc"), unique=True)):
        own = draw(st.lists(st.sampled_from([f"{node}.1", f"{node}.2"]), unique=True))
        failed = draw(st.sampled_from([None, None, "filtered"]))
        unmatched = (
            Recipients()
            if failed
            else Recipients(
                conn_ids=tuple(ConnId(c) for c in own), aliases=draw(NAMES), groups=draw(NAMES)
            )
        )
        parts.append(Receipt(NodeId(node), unmatched=unmatched, failed=failed))
    return parts


@given(receipts_of_gateways())
def test_merged_names_are_those_every_answering_gateway_missed(parts: list[Receipt]) -> None:
    merged = merge("m", parts)
    voters = [p for p in parts if p.failed is None]
    for field in ("aliases", "groups"):
        expected = (
            set.intersection(*(set(getattr(p.unmatched, field)) for p in voters))
            if voters
            else set()
        )
        assert set(getattr(merged.unmatched, field)) == expected
    assert set(merged.unmatched.conn_ids) == {c for p in parts for c in p.unmatched.conn_ids}
    assert merged.failed == {p.node: p.failed for p in parts if p.failed}


class Busy(Service):
    """Its handler holds the service until released: its inbox fills up."""

    name = "busy"

    def __init__(self) -> None:
        self.release = asyncio.Event()

    @handles("busy.hold")
    async def hold(self, message: Envelope, ctx: Context) -> None:
        await self.release.wait()


async def test_a_receipt_reaches_a_service_whose_inbox_is_full() -> None:
    busy = Busy()
    bus = MemoryBus([busy], inbox_size=1)
    gateway = Gateway(bus, config=GatewayConfig(node="t"), entry_points=False)
    async with gateway:
        conn, client = memory_pair()
        task = asyncio.create_task(gateway.serve(conn))
        await client.receive_until("wsbus.welcome")
        client.send("busy.hold")  # handled: the handler holds
        client.send("busy.hold")  # waits in the inbox: full
        await _until(lambda: not bus._runners["busy"].has_room())
        # A receipt, like an answer, takes no place: it resolves the wait.
        got = await busy.link.send_with_receipt(Recipients(groups=("none",)), "x", timeout=5)
        assert got.unmatched == Recipients(groups=("none",))
        busy.release.set()
        client.close()
        async with asyncio.timeout(5):
            await task


@pytest.mark.parametrize(
    "wsbus_config",
    [GatewayConfig(node="t", outbound_queue=3, drain_timeout=0.2)],
)
@pytest.mark.parametrize("seed", range(3))
async def test_every_receipted_delivery_ends_in_exactly_one_outcome(
    wsbus_connect: Connect, wsbus_gateway: Gateway, notes: Notes, seed: int
) -> None:
    import random

    rng = random.Random(seed)
    clients = [await wsbus_connect(buffer=rng.choice([1, 2, 64])) for _ in range(6)]
    for client in clients:
        client.send("ctl.join", {"group": "g"}, id="j")
        await client.receive_until("ctl.join.reply")
    before = wsbus_gateway.stats()
    sent = 0
    for _ in range(60):
        step = rng.random()
        if step < 0.6:
            notes.link.send(Recipients(groups=("g",)), "x", "y" * 200, receipt=True, ack=True)
            sent += 1
        elif step < 0.75:
            client = rng.choice(clients)
            if client.close_code is None:
                client.close(1000)
        elif step < 0.9:
            for client in clients:
                while client.pending() and client.close_code is None:
                    await client.receive()
        else:
            await asyncio.sleep(0)
    for client in clients:
        if client.close_code is None:
            client.close(1000)
    await _until(lambda: not wsbus_gateway._sessions)
    await notes.until(lambda: len(notes.receipts) == sent)
    outcomes: dict[str, int] = {}
    for envelope in notes.receipts:
        receipt = msgspec.convert(envelope.content, Receipt)
        # One outcome per member the message found, each connection once.
        conn_ids = [d.conn_id for d in receipt.deliveries]
        assert len(conn_ids) == len(set(conn_ids))
        for delivery in receipt.deliveries:
            outcomes[delivery.outcome] = outcomes.get(delivery.outcome, 0) + 1
    await _settled(wsbus_gateway)
    stats = wsbus_gateway.stats()
    # The receipts say what the counters say, delivery for delivery.
    assert outcomes.get("written", 0) == stats.deliveries_written - before.deliveries_written
    assert outcomes.get("dropped", 0) == stats.deliveries_dropped - before.deliveries_dropped
    assert stats.receipts_requested == stats.receipts == sent and stats.receipts_pending == 0
    assert stats.unacked == 0  # every connection closed: what was awaited went to its record
    assert_balanced(stats)
