"""A gateway's NatsBus against hostile input on a real nats-server (H6's review findings).

The server here is open to all (``wsbus_nats_server``): a raw nats-py client plays a
service that sends what its own NATS user may send (its own subjects, its own directory
keys) but not what wsbus would. What the server's permissions refuse is tested in
test_permissions.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

import msgspec
import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from wsbus import control
from wsbus.envelope import (
    ConnId,
    Envelope,
    EnvelopeId,
    GatewayAddress,
    NodeId,
    Recipients,
    ServiceAddress,
    decode_envelope,
    encode_envelope,
)
from wsbus.errors import ConfigError
from wsbus_nats import NatsBus, NatsConfig
from wsbus_nats.bus import BATCH_LIMIT, LOST_HEADER, array_header
from wsbus_nats.directory import ServiceEntry, alias_key
from wsbus_nats.servers import NatsServer
from wsbus_nats.service import BATCH_COUNT
from wsbus_nats.subjects import Subjects

SUBJECTS = Subjects("wsbus")


class Sink:
    """A stand-in gateway: records deliveries and loss notices, answers nothing."""

    def __init__(self, node: str = "node1") -> None:
        self.node = NodeId(node)
        self.delivered: list[Envelope] = []
        self.notices: list[tuple[str, str]] = []

    def deliver(self, envelope: Envelope) -> None:
        self.delivered.append(envelope)

    def deliveries_lost(self, reason: str, detail: str) -> None:
        self.notices.append((reason, detail))


@pytest.fixture
async def raw(wsbus_nats_server: NatsServer) -> AsyncIterator[Client]:
    client = await nats.connect(wsbus_nats_server.url, allow_reconnect=False)
    yield client
    await client.close()


@pytest.fixture
async def gateway(nats_config: NatsConfig) -> AsyncIterator[tuple[NatsBus, Sink]]:
    bus, sink = NatsBus(nats_config), Sink()
    await bus.start(sink)
    yield bus, sink
    await bus.close()


async def until(condition: Callable[[], object]) -> None:
    async with asyncio.timeout(10):
        while not condition():
            await asyncio.sleep(0.01)


def to_client(sender: str, id_: str) -> Envelope:
    return Envelope(
        id=EnvelopeId(id_),
        type="note.say",
        sender=ServiceAddress(sender),
        content={},
        created=time.time(),
        recipients=Recipients(conn_ids=(ConnId("node1-1"),)),
    )


async def test_a_service_entry_counts_by_its_key_only(
    gateway: tuple[NatsBus, Sink], raw: Client
) -> None:
    bus, _ = gateway
    directory = bus.directory
    js = raw.jetstream(timeout=5)
    before = bus.counters.sender_mismatches
    # echo's user may write echo.<instance>: it names chat there, with chat's types.
    await js.publish(
        "$KV.wsbus_services.echo.x",
        msgspec.msgpack.encode(ServiceEntry("chat", "x", ["bank.transfer"])),
    )
    await js.publish(
        "$KV.wsbus_services.echo.y", msgspec.msgpack.encode(ServiceEntry("echo", "z", ["a"]))
    )
    await js.publish(
        "$KV.wsbus_services.echo.i1",
        msgspec.msgpack.encode(ServiceEntry("echo", "i1", ["echo.say"])),
    )
    await until(lambda: directory.services_for("echo.say") == ["echo"])
    assert directory.services() == {"echo": 1}
    assert directory.services_for("bank.transfer") == [] and directory.services_for("a") == []
    assert bus.counters.sender_mismatches - before == 2
    # An entry written again is indexed again (only that key): its old types go.
    await js.publish(
        "$KV.wsbus_services.echo.i1",
        msgspec.msgpack.encode(ServiceEntry("echo", "i1", ["echo.shout"])),
    )
    await until(lambda: directory.services_for("echo.shout") == ["echo"])
    assert directory.services_for("echo.say") == []
    kv = await js.key_value("wsbus_services")
    await kv.delete("echo.i1")
    await until(lambda: directory.services_for("echo.shout") == [])
    assert directory.services() == {}


async def test_a_reused_request_id_does_not_take_anothers_answer(
    gateway: tuple[NatsBus, Sink], raw: Client
) -> None:
    bus, sink = gateway
    answers: dict[str, list[Envelope]] = {"chat": [], "echo": []}
    for name in answers:

        async def on(msg: Msg, name: str = name) -> None:
            answers[name].append(decode_envelope(msg.data))

        await raw.subscribe(f"wsbus.reply.{name}.>", cb=on)
    request_id = EnvelopeId("chat-5")

    def request(sender: str) -> bytes:
        return encode_envelope(
            Envelope(
                id=request_id,
                type=control.CLIENTS,
                sender=ServiceAddress(sender),
                content={},
                created=time.time(),
                to=GatewayAddress(NodeId("node1")),
            )
        )

    await raw.publish(
        SUBJECTS.to_gateway("node1", "chat"), request("chat"), reply="wsbus.reply.chat.i1"
    )
    # echo asks next with chat's id (ids are the services' own choice).
    await raw.publish(
        SUBJECTS.to_gateway("node1", "echo"), request("echo"), reply="wsbus.reply.echo.j1"
    )
    await until(lambda: len(sink.delivered) == 2)

    def result(to: str) -> Envelope:
        return Envelope(
            id=EnvelopeId(f"r-{to}"),
            type=control.RESULT,
            sender=GatewayAddress(NodeId("node1")),
            content={"for": to},
            reply_to=request_id,
            created=time.time(),
            to=ServiceAddress(to),
        )

    await bus.publish(result("chat"))
    await bus.publish(result("echo"))
    await until(lambda: answers["chat"] and answers["echo"])
    assert [a.content for a in answers["chat"]] == [{"for": "chat"}]
    assert [a.content for a in answers["echo"]] == [{"for": "echo"}]


async def test_lost_notices_come_once_a_heartbeat_after_traffic(
    gateway: tuple[NatsBus, Sink], raw: Client
) -> None:
    _, sink = gateway
    subject = SUBJECTS.to_gateway("node1", "echo")

    async def notices(count: int) -> None:
        for _ in range(count):
            await raw.publish(subject, b"", headers={LOST_HEADER: "echo"})
        # One subscription keeps echo's order: once this arrives, the notices were heard.
        await raw.publish(subject, encode_envelope(to_client("echo", f"m{len(sink.delivered)}")))
        count = len(sink.delivered) + 1
        await until(lambda: len(sink.delivered) == count)
        await asyncio.sleep(0)  # the gateway hears of a loss on the next loop turn

    await raw.publish(subject, b"", headers={LOST_HEADER: "echo"})  # nothing sent yet
    await notices(0)
    assert sink.notices == []
    await notices(200)  # after traffic: one believed, the rest within the heartbeat not
    assert len(sink.notices) == 1 and "'echo'" in sink.notices[0][1]
    await asyncio.sleep(gateway[0].config.heartbeat)
    await notices(1)  # a heartbeat later, after traffic: believed
    assert len(sink.notices) == 2


async def test_a_batch_larger_than_a_service_sends_is_refused_undecoded(
    gateway: tuple[NatsBus, Sink], raw: Client
) -> None:
    bus, sink = gateway
    assert BATCH_LIMIT == BATCH_COUNT
    one = encode_envelope(to_client("echo", "b"))
    subject = SUBJECTS.to_gateway("node1", "echo")
    before = bus.counters.sender_mismatches
    # Its header says more than BATCH_LIMIT: refused on that alone (the rest is garbage).
    await raw.publish(subject, array_header(BATCH_LIMIT + 1) + b"\xc1" * 100)
    await raw.publish(subject, array_header(70_000) + one)
    await raw.publish(subject, array_header(BATCH_LIMIT) + one * BATCH_LIMIT)
    await until(lambda: len(sink.delivered) == BATCH_LIMIT)
    assert bus.counters.sender_mismatches - before == 2


async def test_a_gateway_finds_its_alias_taken_without_a_lapse(
    nats_config: NatsConfig, raw: Client
) -> None:
    config = msgspec.structs.replace(nats_config, heartbeat=0.1)
    bus, sink = NatsBus(config), Sink()
    await bus.start(sink)
    try:
        assert await bus.claim_alias("sam", ConnId("node1-1"))
        # Another gateway's user rewrites the key (any gateway may write the table).
        kv = await raw.jetstream(timeout=5).key_value("wsbus_aliases")
        await kv.put(alias_key("sam"), b"node2-9")
        await until(lambda: any(e.type == control.ALIAS_CLEAR for e in sink.delivered))
        clear = next(e for e in sink.delivered if e.type == control.ALIAS_CLEAR)
        assert clear.content == {"conn_id": "node1-1"}
    finally:
        await bus.close()


async def test_a_gateway_refuses_a_bucket_not_made_by_wsbus(
    nats_config: NatsConfig, raw: Client
) -> None:
    # Made first by nats-py's own create_key_value (rollups allowed: one publish wipes it).
    await raw.jetstream(timeout=5).create_key_value(bucket="wsbus_aliases", history=1)
    bus = NatsBus(nats_config)
    with pytest.raises(ConfigError, match=r"KV_wsbus_aliases.*rollup"):
        await bus.start(Sink())
    await bus.close()


async def test_credentials_in_a_url_are_never_logged(
    wsbus_nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "s3cret-in-the-url"
    host = wsbus_nats_server.url.removeprefix("nats://")
    config = NatsConfig(
        servers=(f"nats://someone:{secret}@{host}",), reconnect_wait=0.05, reconnect_wait_max=0.2
    )
    caplog.set_level(logging.INFO, logger="wsbus")
    bus = NatsBus(config)
    await bus.start(Sink())
    try:
        await asyncio.to_thread(wsbus_nats_server.stop)
        await until(lambda: not bus.available)
        await asyncio.to_thread(wsbus_nats_server.start)
        await until(lambda: bus.available)
    finally:
        await bus.close()
    assert "someone:***@" in caplog.text
    assert "reconnected" in caplog.text
    assert secret not in caplog.text
