"""The one-hop path: a service delivers straight to the gateway that owns the recipients.

A real name server, message bus and service processes, every one with the shared secret;
the gateways run in this process. A service's message for connections of one gateway goes
to that gateway's ``deliver_direct``; everything else (groups, aliases, users, everyone,
connections of several gateways, history, control requests) through the message bus, which
keeps routing by type, the directory of gateways and history positions. One sender's
messages reach a client in the order sent, whichever path each took.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from base64 import b64encode
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import pytest
import pytest_asyncio
from Pyro5 import errors as pyro_errors

from tests.conftest import assert_balanced
from wsbus import Codec, Envelope, Gateway, GatewayConfig, Service, memory_pair
from wsbus.edge import MemoryClient
from wsbus.envelope import (
    ClientAddress,
    ConnId,
    EnvelopeId,
    GatewayAddress,
    NodeId,
    Recipients,
    ServiceAddress,
)
from wsbus.history import GROUP_HEADER, POSITION_HEADER, HistoryConfig, Position
from wsbus.service import Context, handles
from wsbus_pyro import PyroBus, PyroConfig, ServiceHost
from wsbus_pyro import bus as pyro_bus
from wsbus_pyro.bus import GatewayEndpoint
from wsbus_pyro.transport import (
    BUS_ADDRESS,
    GATEWAY_LOST,
    NO_ROUTE,
    OK,
    REFUSED,
    UNAVAILABLE,
    decode_batch,
    direct_node,
    encode_batch,
    from_service,
    gateway_lost_notice,
    lookup,
    make_proxy,
)
from wsbus_testing.children import Child, free_port

Spawn = Callable[[str], Child]

WAIT = 30.0
"""The bound on every wait here: generous, for a busy two-core machine."""

PATHS = ("direct", "group", "spanning")


class Interleaver(Service):
    """Sends one client numbered messages by both paths, mixed, for these tests.

    ``mix.join`` ``{"group"}`` adds the sender to the group. ``mix.start`` ``{"n",
    "group", "other", "seed"}`` sends ``mix.item`` ``{"i", "path"}`` for i in 0..n-1, in
    runs of random length, each run by one path: ``direct`` (to the sender's connection
    id: one gateway, so straight to it), ``group`` (to the group: through the bus, which
    stamps a history position) or ``spanning`` (to the sender's and ``other``'s
    connection ids, on two gateways: through the bus). Then it replies ``"done"``
    (direct, so after every item). ``mix.ping`` replies ``"pong"``.
    """

    name = "interleaver"

    @handles("mix.join")
    async def join(self, message: Envelope, ctx: Context) -> None:
        """Add the sender to the group."""
        assert isinstance(message.sender, ClientAddress)
        await ctx.join(message.sender.conn_id, message.content["group"])
        ctx.reply("joined")

    @handles("mix.ping")
    async def ping(self, message: Envelope, ctx: Context) -> None:
        """Reply at once (to the sender's connection: the direct path)."""
        ctx.reply("pong")

    @handles("mix.start")
    async def start(self, message: Envelope, ctx: Context) -> None:
        """Send the items, switching paths often, yielding now and then."""
        assert isinstance(message.sender, ClientAddress)
        me = message.sender.conn_id
        content = message.content
        to = {
            "direct": Recipients(conn_ids=(me,)),
            "group": Recipients(groups=(content["group"],)),
            "spanning": Recipients(conn_ids=(me, ConnId(content["other"]))),
        }
        rng = random.Random(content["seed"])
        n = int(content["n"])
        i = 0
        while i < n:
            path = rng.choice(PATHS)
            for _ in range(min(rng.choice((1, 1, 2, 3, 7, 20)), n - i)):
                ctx.send(to[path], "mix.item", {"i": i, "path": path})
                i += 1
            if rng.random() < 0.3:
                await asyncio.sleep(0)
        ctx.reply("done")


@pytest.fixture
def wsbus_pyro_config() -> PyroConfig:
    """Every process of these tests holds the shared secret."""
    return PyroConfig(
        ns_port=free_port(),
        secret="direct-secret-" + os.urandom(8).hex(),
        reregister_interval=0.2,
        comm_timeout=3.0,
    )


class Kit:
    """Gateways on the Pyro bus in this process, keeping history for ``feed.*``."""

    def __init__(self, config: PyroConfig) -> None:
        self.config = config
        self.gateways: list[Gateway] = []
        self.buses: dict[str, PyroBus] = {}
        self.tasks: list[asyncio.Task[None]] = []

    async def gateway(self, node: str) -> Gateway:
        bus = PyroBus(self.config)
        history = HistoryConfig(groups=("feed.*",), size=10_000, age=300.0)
        config = GatewayConfig(node=NodeId(node), history=history)
        gateway = Gateway(bus, config=config, entry_points=False)
        await gateway.start()
        self.gateways.append(gateway)
        self.buses[node] = bus
        return gateway

    async def client(self, gateway: Gateway) -> MemoryClient:
        conn, client = memory_pair(Codec.JSON, buffer=8192)
        self.tasks.append(asyncio.create_task(gateway.serve(conn)))
        welcome = await client.receive(WAIT)
        assert welcome["type"] == "wsbus.welcome", welcome
        client.conn_id = welcome["content"]["conn_id"]
        return client

    async def close(self) -> None:
        for gateway in self.gateways:
            await gateway.close()
        await asyncio.gather(*self.tasks)


@pytest_asyncio.fixture
async def kit(wsbus_pyro_config: PyroConfig, wsbus_message_bus: Child) -> AsyncIterator[Kit]:
    kit = Kit(wsbus_pyro_config)
    try:
        yield kit
    finally:
        await kit.close()


async def _request(client: MemoryClient, type: str, content: Any, id: str) -> Any:
    client.send(type, content, id=id)
    async with asyncio.timeout(WAIT):
        while True:
            frame = await client.receive(WAIT)
            if frame.get("reply_to") == id and frame["type"] != "wsbus.ack":
                return frame["content"]


async def _until_direct(client: MemoryClient, bus: PyroBus) -> None:
    """Wait until the service delivers to this gateway directly (it learned the directory)."""
    async with asyncio.timeout(WAIT):
        n = 0
        while bus.direct_batches == 0:
            n += 1
            assert await _request(client, "mix.ping", None, f"ping-{n}") == "pong"
            await asyncio.sleep(0.05)


async def _items(client: MemoryClient, done_id: str) -> list[dict[str, Any]]:
    """Read ``mix.item`` frames until the reply to ``done_id``."""
    items: list[dict[str, Any]] = []
    async with asyncio.timeout(WAIT):
        while True:
            frame = await client.receive(WAIT)
            if frame["type"] == "mix.item":
                items.append(frame)
            elif frame.get("reply_to") == done_id and frame["type"] != "wsbus.ack":
                assert frame["content"] == "done", frame
                return items


def _check_order(items: list[dict[str, Any]], n: int) -> None:
    """Every item once, in the order sent; the group's with consecutive positions."""
    assert [item["content"]["i"] for item in items] == list(range(n))
    paths = {item["content"]["path"] for item in items}
    assert paths == set(PATHS), paths
    offsets = []
    for item in items:
        if item["content"]["path"] == "group":
            position = Position.parse(item["pos"])
            assert position is not None and item["group"] == "feed.mix", item
            offsets.append(position.offset)
        else:
            assert "pos" not in item, item
    assert offsets == list(range(offsets[0], offsets[0] + len(offsets)))


async def test_one_senders_order_holds_across_direct_and_routed_sends(
    kit: Kit, wsbus_spawn_service: Spawn
) -> None:
    await asyncio.to_thread(wsbus_spawn_service, "tests.wsbus_pyro.test_direct:Interleaver")
    g1, g2 = await kit.gateway("g1"), await kit.gateway("g2")
    client, other = await kit.client(g1), await kit.client(g2)
    await _until_direct(client, kit.buses["g1"])
    assert await _request(client, "mix.join", {"group": "feed.mix"}, "join") == "joined"
    before = kit.buses["g1"].direct_batches
    for seed in range(3):
        request = {"n": 400, "group": "feed.mix", "other": other.conn_id, "seed": seed}
        client.send("mix.start", request, id=f"start-{seed}")
        _check_order(await _items(client, f"start-{seed}"), 400)
    # Both paths were taken: the direct one by this gateway's deliver_direct.
    assert kit.buses["g1"].direct_batches > before
    frames = [await other.receive(WAIT) for _ in range(other.pending())]
    paths = {f["content"]["path"] for f in frames if f["type"] == "mix.item"}
    assert paths == {"spanning"}
    assert_balanced(g1.stats())
    assert_balanced(g2.stats())


class Gate(Service):
    """In this process: ``mix.start`` as :class:`Interleaver`'s, without the group or the other."""

    name = "gate"

    @handles("mix.start")
    async def start(self, message: Envelope, ctx: Context) -> None:
        """Send ``n`` items to the sender, by its connection id, then reply."""
        assert isinstance(message.sender, ClientAddress)
        to = Recipients(conn_ids=(message.sender.conn_id,))
        for i in range(int(message.content["n"])):
            ctx.send(to, "mix.item", {"i": i, "path": "direct"})
            if i % 50 == 49:
                await asyncio.sleep(0)
        ctx.reply("done")


async def test_a_stale_directory_sends_through_the_bus_in_order_once(
    kit: Kit, wsbus_pyro_config: PyroConfig
) -> None:
    # The service learns the directory once (no refresh during the test), then is told a
    # gateway's address where nothing listens: each direct call fails, and its envelopes
    # go through the bus instead, in order, each once.
    config = msgspec.structs.replace(wsbus_pyro_config, reregister_interval=30.0)
    host = ServiceHost(Gate(), config)
    g1 = await kit.gateway("g1")
    await host.start()
    try:
        client = await kit.client(g1)
        sender = host._sender
        assert sender is not None
        real = sender.directory.get("g1")
        assert real == kit.buses["g1"].uri
        sender.directory = {"g1": f"PYRO:wsbus.gateway.g1@127.0.0.1:{free_port()}"}
        client.send("mix.start", {"n": 300}, id="stale")
        items = await _items(client, "stale")
        assert [item["content"]["i"] for item in items] == list(range(300))
        assert kit.buses["g1"].direct_batches == 0
        # The real address again: straight to the gateway, in order as well.
        sender.directory = {"g1": real}
        await asyncio.sleep(0.6)  # past retry_after, when the failed gateway is tried again
        client.send("mix.start", {"n": 300}, id="real")
        items = await _items(client, "real")
        assert [item["content"]["i"] for item in items] == list(range(300))
        assert kit.buses["g1"].direct_batches > 0
        assert_balanced(g1.stats())
    finally:
        await host.close()


def _envelope(i: int, **fields: Any) -> Envelope:
    defaults: dict[str, Any] = {
        "id": EnvelopeId(f"intruder-{i}"),
        "type": "chat.say",
        "sender": ServiceAddress("chat"),
        "content": {"n": i},
        "created": time.time(),
    }
    return Envelope(**{**defaults, **fields})


def test_what_a_service_may_deliver_directly() -> None:
    to = Recipients(conn_ids=(ConnId("g1.1"), ConnId("g1.2")), exclude=(ConnId("g1.3"),))
    assert direct_node(_envelope(0, recipients=to)) == "g1"
    assert direct_node(_envelope(0, recipients=Recipients(conn_ids=(ConnId("a.b.7"),)))) == "a.b"
    for recipients in (
        Recipients(conn_ids=(ConnId("g1.1"), ConnId("g2.1"))),  # two gateways
        Recipients(conn_ids=(ConnId("g1.1"),), groups=("room",)),  # a group: any gateway
        Recipients(aliases=("ann",)),
        Recipients(users=("u",)),
        Recipients(everyone=True),
        Recipients(conn_ids=(ConnId("nodot"),)),  # names no gateway
        None,  # to services, by type
    ):
        assert direct_node(_envelope(0, recipients=recipients)) is None, recipients
    one = Recipients(conn_ids=(ConnId("g1.1"),))
    # A control request (to a gateway), another sender than a service, the bus's notice.
    assert direct_node(_envelope(0, recipients=one, to=GatewayAddress(NodeId("g1")))) is None
    assert direct_node(_envelope(0, recipients=one, sender=GatewayAddress(NodeId("g2")))) is None
    assert direct_node(_envelope(0, recipients=one, type=GATEWAY_LOST)) is None
    # The bus's own rule: a service's history position is removed, never believed.
    headers = {POSITION_HEADER: "e:1", GROUP_HEADER: "feed.x", "keep": "1"}
    checked = from_service(_envelope(0, recipients=one, headers=headers))
    assert checked is not None and checked.headers == {"keep": "1"}
    assert from_service(gateway_lost_notice("g2", "1")) is None


async def test_the_direct_endpoint_checks_the_sender_as_the_bus_does(
    kit: Kit, wsbus_pyro_config: PyroConfig
) -> None:
    g1 = await kit.gateway("g1")
    client = await kit.client(g1)
    me = ConnId(client.conn_id or "")
    mine = Recipients(conn_ids=(me,))
    presence = {"event": "join", "conn_id": me, "group": "feed.x"}
    refused = [
        # A gateway's presence event, the bus's notice: a service may not send either.
        _envelope(1, type="wsbus.presence", sender=GatewayAddress(NodeId("g2")), content=presence),
        gateway_lost_notice("g2", "x"),
        _envelope(2, type=GATEWAY_LOST, recipients=mine),
        # Posing as another sender than a service.
        _envelope(3, recipients=mine, sender=GatewayAddress(NodeId("g2"))),
        _envelope(4, recipients=mine, sender=BUS_ADDRESS),
        # What needs the bus: a group, an alias, everyone, a control request.
        _envelope(5, recipients=Recipients(groups=("feed.x",))),
        _envelope(6, recipients=Recipients(aliases=("ann",))),
        _envelope(7, recipients=Recipients(everyone=True)),
        _envelope(8, type="wsbus.disconnect", to=GatewayAddress(NodeId("g1")), content=me),
        # A control request (or any wsbus.* type) with recipients and no `to`: the bus's.
        _envelope(9, type="wsbus.disconnect", recipients=mine, content={"conn_id": me}),
        # A client's sender: a service never sends as a client.
        _envelope(10, recipients=mine, sender=ClientAddress(me, alias="alice")),
    ]
    uri = kit.buses["g1"].uri

    def calls() -> list[Any]:
        answers: list[Any] = []
        with make_proxy(uri, wsbus_pyro_config) as gateway:
            for envelope in refused:
                answers.append(gateway.deliver_direct(encode_batch([envelope])))
            # One bad envelope refuses its whole batch: the good one is not taken either.
            good = _envelope(20, recipients=mine)
            answers.append(gateway.deliver_direct(encode_batch([good, refused[0]])))
            # Another gateway's connections: not refused as hostile, but not taken here.
            other = Recipients(conn_ids=(ConnId("g2.1"),))
            answers.append(gateway.deliver_direct(encode_batch([_envelope(21, recipients=other)])))
            # A position of the sender's own is removed, as the bus removes it.
            headers = {POSITION_HEADER: "forged:5", GROUP_HEADER: "feed.x"}
            stamped = _envelope(22, recipients=mine, headers=headers)
            answers.append(gateway.deliver_direct(encode_batch([stamped])))
        # A peer without the secret does not get past the handshake.
        wrong = msgspec.structs.replace(wsbus_pyro_config, secret="not-" + os.urandom(8).hex())
        with (
            pytest.raises(pyro_errors.CommunicationError),
            make_proxy(uri, wrong) as gateway,
        ):
            gateway.deliver_direct(encode_batch([_envelope(23, recipients=mine)]))
        return answers

    answers = await asyncio.to_thread(calls)
    assert answers[: len(refused)] == [REFUSED] * len(refused)
    # None: all taken (the shortest answer).
    assert answers[len(refused) :] == [REFUSED, NO_ROUTE, None]
    # The client got the one envelope taken, without the forged position, and nothing else.
    frame = await client.receive(WAIT)
    assert frame["id"] == "intruder-22" and "pos" not in frame and "group" not in frame
    await asyncio.sleep(0.2)
    assert client.pending() == 0
    assert kit.buses["g1"].direct_batches == 1


async def test_a_second_copy_through_the_bus_is_delivered_once(
    kit: Kit, wsbus_pyro_config: PyroConfig
) -> None:
    # A direct call that delivered, but whose answer was lost, is sent again through the
    # bus: the gateway's two endpoints share one memory of what they took.
    g1 = await kit.gateway("g1")
    client = await kit.client(g1)
    envelope = _envelope(30, recipients=Recipients(conn_ids=(ConnId(client.conn_id or ""),)))
    uri = kit.buses["g1"].uri

    def calls() -> Any:
        with make_proxy(uri, wsbus_pyro_config) as gateway:
            answer = gateway.deliver_direct(encode_batch([envelope]))
            gateway.deliver(encode_batch([envelope]))  # as the bus delivers it
            gateway.deliver(encode_batch([_envelope(31, recipients=envelope.recipients)]))
        return answer

    assert await asyncio.to_thread(calls) is None  # taken
    assert (await client.receive(WAIT))["id"] == "intruder-30"
    assert (await client.receive(WAIT))["id"] == "intruder-31"


async def test_an_envelope_with_a_seen_id_and_other_content_is_delivered(
    kit: Kit, wsbus_pyro_config: PyroConfig
) -> None:
    # A peer that guesses a service's next id and delivers first must not have the real
    # message dropped as a copy: only a true copy (same id, same content) is dropped.
    g1 = await kit.gateway("g1")
    client = await kit.client(g1)
    to = Recipients(conn_ids=(ConnId(client.conn_id or ""),))
    impostor = _envelope(40, recipients=to, content="decoy")
    real = _envelope(40, recipients=to, content="the real one")
    uri = kit.buses["g1"].uri

    def calls() -> None:
        with make_proxy(uri, wsbus_pyro_config) as gateway:
            assert gateway.deliver_direct(encode_batch([impostor])) is None
            gateway.deliver(encode_batch([real]))  # the real one, through the bus
            assert gateway.deliver_direct(encode_batch([real])) is None  # a true copy

    await asyncio.to_thread(calls)
    frames = [await client.receive(WAIT), await client.receive(WAIT)]
    assert [f["content"] for f in frames] == ["decoy", "the real one"]
    await asyncio.sleep(0.2)
    assert client.pending() == 0  # the true copy was dropped


async def test_the_bus_refuses_a_service_envelope_with_a_client_or_gateway_sender(
    kit: Kit, wsbus_pyro_config: PyroConfig
) -> None:
    g1 = await kit.gateway("g1")
    client = await kit.client(g1)
    me = ConnId(client.conn_id or "")
    to = Recipients(conn_ids=(me,))
    forged = [
        _envelope(50, recipients=to, sender=ClientAddress(me, alias="alice")),
        _envelope(51, recipients=to, sender=GatewayAddress(NodeId("billing"))),
    ]

    def route() -> Any:
        with lookup(wsbus_pyro_config.bus_name, wsbus_pyro_config) as bus:
            return bus.route(encode_batch([*forged, _envelope(52, recipients=to)]))

    assert await asyncio.to_thread(route) == [NO_ROUTE, NO_ROUTE, OK]
    frame = await client.receive(WAIT)
    assert frame["id"] == "intruder-52"
    await asyncio.sleep(0.2)
    assert client.pending() == 0


class Sink:
    """The gateway, as the endpoint sees it: keeps what it was handed."""

    node = NodeId("g1")

    def __init__(self) -> None:
        self.took: list[Envelope] = []

    def deliver(self, envelope: Envelope) -> None:
        self.took.append(envelope)


def test_direct_batches_waiting_for_the_loop_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    # A gateway loop that is behind (here: not running at all) holds at most a quarter of
    # max_message_size of direct batches, counted before they are decoded; a call past
    # that waits on its own thread for a moment, then answers unavailable, having decoded
    # and taken nothing.
    decoded: list[int] = []

    def counted(blob: Any) -> list[Envelope]:
        decoded.append(len(blob))
        return decode_batch(blob)

    monkeypatch.setattr(pyro_bus, "decode_batch", counted)
    config = PyroConfig(max_message_size=256 * 1024, call_timeout=0.2)
    loop = asyncio.new_event_loop()
    sink = Sink()
    endpoint = GatewayEndpoint(loop, sink, on_loop=False, node="g1", config=config)
    to = Recipients(conn_ids=(ConnId("g1.1"),))
    batches = [encode_batch([_envelope(i, recipients=to, content="x" * 20_000)]) for i in range(5)]
    try:
        answers = [endpoint.deliver_direct(batch) for batch in batches[:4]]
        assert answers == [None, None, None, UNAVAILABLE]
        assert len(decoded) == 3  # the refused batch was never decoded
        assert sink.took == []  # handed to the loop, which has not run
        loop.run_until_complete(asyncio.sleep(0))
        assert [e.id for e in sink.took] == ["intruder-0", "intruder-1", "intruder-2"]
        # Taken by the loop: room again.
        assert endpoint.deliver_direct(b64encode(batches[4]).decode()) is None  # as text too
        loop.run_until_complete(asyncio.sleep(0))
        assert sink.took[-1].id == "intruder-4"
        assert endpoint.direct_batches == 4
    finally:
        loop.close()


def test_bus_batches_waiting_for_the_loop_are_bounded_first_in_line_and_never_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The message bus's deliveries share the bound with the one-hop path and go first: a
    # bus batch is taken whenever less than the bound waits (direct batches cannot keep
    # it out); past it, the bus's call waits on its own thread until the loop has taken
    # enough, holding back the bus's sending to this gateway. The bus cannot send a batch
    # again, so after the wait (half of call_timeout here) it is taken anyway, with a
    # warning that the loop is behind: never refused.
    # Bound 64 KiB; the bus's wait 1 s (its most), so that "it waits" below holds on a
    # busy machine too.
    config = PyroConfig(max_message_size=256 * 1024, call_timeout=4.0)
    loop = asyncio.new_event_loop()
    sink = Sink()
    endpoint = GatewayEndpoint(loop, sink, on_loop=False, node="g1", config=config)
    to = Recipients(conn_ids=(ConnId("g1.1"),))

    def batch(i: int, size: int = 20_000) -> bytes:
        return encode_batch([_envelope(i, recipients=to, content="x" * size)])

    try:
        for i in range(4):
            endpoint.deliver(batch(i))  # under the bound each time: at once (80 KB wait)
        returned = threading.Event()

        def fifth() -> None:
            endpoint.deliver(batch(4))
            returned.set()

        waiting = threading.Thread(target=fifth)
        waiting.start()
        assert not returned.wait(0.05)  # past the bound: it waits for the loop
        loop.run_until_complete(asyncio.sleep(0))  # the loop takes the four
        assert returned.wait(10)
        waiting.join(10)
        loop.run_until_complete(asyncio.sleep(0))
        assert [e.id for e in sink.took] == [f"intruder-{i}" for i in range(5)]
        assert endpoint._waiting_bytes == 0

        # First in line: direct batches hold 60 KB; a 60 KB bus batch goes in at once,
        # and the next direct one finds no room.
        assert [endpoint.deliver_direct(batch(i)) for i in range(10, 13)] == [None] * 3
        endpoint.deliver(batch(13, 60_000))
        assert endpoint.deliver_direct(batch(14)) == UNAVAILABLE
        loop.run_until_complete(asyncio.sleep(0))
        assert [e.id for e in sink.took[5:]] == [f"intruder-{i}" for i in (10, 11, 12, 13)]

        # A loop that takes nothing: after the wait (0.2 s here), taken anyway, and said once.
        config = PyroConfig(max_message_size=256 * 1024, call_timeout=0.4)
        endpoint = GatewayEndpoint(loop, sink, on_loop=False, node="g1", config=config)
        with caplog.at_level("WARNING", logger="wsbus.pyro.gateway"):
            for i in range(20, 26):
                endpoint.deliver(batch(i))
        behind = [r for r in caplog.records if "has not made room" in r.getMessage()]
        assert len(behind) == 1, caplog.text
        assert endpoint.bus_overdue == 2  # the fifth and the sixth
        loop.run_until_complete(asyncio.sleep(0))
        assert [e.id for e in sink.took[9:]] == [f"intruder-{i}" for i in range(20, 26)]
        assert endpoint._waiting_bytes == 0  # every byte reserved was given back
    finally:
        loop.close()


class Pacer(Service):
    """In this process: ``pace.start`` ``{"a", "n"}`` sends the sender an item every 20 ms,
    each stamped with this process's monotonic clock, and every fifth one to ``a`` too."""

    name = "pacer"

    @handles("pace.start")
    async def start(self, message: Envelope, ctx: Context) -> None:
        """Send the items, paced."""
        assert isinstance(message.sender, ClientAddress)
        me = Recipients(conn_ids=(message.sender.conn_id,))
        other = Recipients(conn_ids=(ConnId(message.content["a"]),))
        for i in range(int(message.content["n"])):
            ctx.send(me, "pace.item", {"i": i, "t": time.monotonic()})
            if i % 5 == 0:
                ctx.send(other, "pace.item", {"i": i})
            await asyncio.sleep(0.02)


async def test_a_stalled_gateway_does_not_hold_up_a_services_other_gateways(
    kit: Kit, wsbus_pyro_config: PyroConfig
) -> None:
    # Gateway A runs on a loop of its own (a thread) and that loop is blocked before the
    # service first delivers to it: a new Pyro connection to A waits for A's loop. The
    # service's one forwarder thread carries its traffic to every gateway, so its direct
    # calls to A must give up quickly (and go through the bus) rather than hold B's
    # clients for the proxy's whole timeout. The service's comm_timeout is far longer
    # than A stays blocked: a forwarder stuck on A would keep B silent until A is free
    # again. So the check is an order, not a duration: B's client gets what was sent
    # after the block began while A is still blocked.
    config = msgspec.structs.replace(wsbus_pyro_config, comm_timeout=20 * WAIT)
    b = await kit.gateway("gb")
    client = await kit.client(b)
    a_loop = asyncio.new_event_loop()
    a_thread = threading.Thread(target=a_loop.run_forever, daemon=True)
    a_thread.start()
    blocked, release, unblocked = threading.Event(), threading.Event(), threading.Event()

    async def open_a() -> tuple[Gateway, MemoryClient, asyncio.Task[None]]:
        gateway = Gateway(
            PyroBus(wsbus_pyro_config), config=GatewayConfig(node=NodeId("ga")), entry_points=False
        )
        await gateway.start()
        conn, a_client = memory_pair(Codec.JSON, buffer=8192)
        task = asyncio.create_task(gateway.serve(conn))
        a_client.conn_id = (await a_client.receive(WAIT))["content"]["conn_id"]
        return gateway, a_client, task

    def block() -> None:
        blocked.set()
        release.wait(2 * WAIT)  # a bound, for a failing run: A is free again after it
        unblocked.set()

    a_gateway, a_client, a_task = asyncio.run_coroutine_threadsafe(open_a(), a_loop).result(WAIT)
    host = ServiceHost(Pacer(), config)
    try:
        await host.start()
        a_loop.call_soon_threadsafe(block)
        assert await asyncio.to_thread(blocked.wait, WAIT)
        began = time.monotonic()
        client.send("pace.start", {"a": a_client.conn_id, "n": 1500}, id="pace")
        async with asyncio.timeout(3 * WAIT):
            while True:
                frame = await client.receive(3 * WAIT)
                if frame["type"] == "pace.item" and frame["content"]["i"] >= 10:
                    break
        # Sent after the block began (and after sends to A), received while A is blocked.
        assert frame["content"]["t"] > began
        assert not unblocked.is_set(), "B's client waited for gateway A to be free"
    finally:
        release.set()
        await host.close()

        async def close_a() -> None:
            await a_gateway.close()
            await a_task

        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(close_a(), a_loop))
        a_loop.call_soon_threadsafe(a_loop.stop)
        await asyncio.to_thread(a_thread.join, WAIT)
        a_loop.close()
