"""SPEC section 4, wrapping: no client frame, valid or not, can change the sender the gateway
stamps, and a rejected frame puts nothing on the bus."""

from __future__ import annotations

import asyncio

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import assert_balanced
from tests.loops import run_in_own_loop
from wsbus import ClientAddress, Codec, Envelope, Gateway, GatewayConfig, memory_pair
from wsbus.bus import BusSink
from wsbus.wire import ClientFrame, decode_client_frame
from wsbus_testing import strategies as wst


class AcceptingBus:
    """A bus that takes every envelope, whatever its type, and keeps it."""

    def __init__(self) -> None:
        self.published: list[Envelope] = []

    async def start(self, sink: BusSink) -> None:
        self.sink = sink

    async def publish(self, envelope: Envelope) -> None:
        self.published.append(envelope)

    async def close(self) -> None:
        pass


async def _run(frames: list[str | bytes], codec: Codec) -> None:
    bus = AcceptingBus()
    config = GatewayConfig(node="p", error_budget=1000, rate=1e6, burst=10**6, drain_timeout=0)
    gateway = Gateway(bus, config=config, entry_points=False)
    await gateway.start()
    conn, client = memory_pair(codec)
    serving = asyncio.create_task(gateway.serve(conn))
    welcome = await client.receive()
    conn_id = welcome["content"]["conn_id"]
    for frame in frames:
        client.send_raw(frame)
    client.send("end", id="the-end")
    answers = []
    while True:
        answer = await client.receive()
        if answer["type"] == "wsbus.ack" and answer["content"]["ref"] == "the-end":
            break
        answers.append(answer)
    await gateway.close()
    await asyncio.wait_for(serving, 5)

    *published, last = bus.published
    assert last.id == "the-end"
    rejected = [a for a in answers if a["type"] == "wsbus.error"]
    # Each frame ended as exactly one of published or rejected.
    assert len(published) + len(rejected) == len(frames)
    # Every envelope on the bus carries exactly the stamped sender, whatever was sent.
    assert all(e.sender == ClientAddress(conn_id) for e in bus.published)
    # What reached the bus is exactly the frames that are valid, in order.
    valid = [
        f
        for f in map(lambda f: decode_client_frame(f, codec), frames)
        if isinstance(f, ClientFrame)
    ]
    assert [(e.type, e.content, e.reply_to) for e in published] == [
        (f.type, f.content, f.reply_to) for f in valid
    ]
    stats = gateway.stats()
    assert stats.frames_published == len(frames) + 1 - len(rejected)
    assert stats.frames_rejected == len(rejected)
    assert_balanced(stats)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_no_frame_changes_the_stamped_sender(data: st.DataObject) -> None:
    codec = data.draw(st.sampled_from(list(Codec)))
    frames = data.draw(st.lists(wst.adversarial_frames(codec=codec), min_size=1, max_size=15))
    run_in_own_loop(_run(frames, codec))
