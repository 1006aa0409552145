"""A client's frame reaches an in-memory service uncopied only when nothing else holds it.

The gateway hands the in-memory bus a frame no plugin saw with ``publish_fresh_nowait``
(:class:`wsbus.bus.PublishesFresh`), which does not copy it; the protection the copy gives
(a service cannot change what anyone else holds) is kept wherever something else does hold
it: a plugin that saw the message, the bus's own record.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import AsyncIterator
from typing import Any

import pytest

from wsbus import (
    BusUnavailable,
    Context,
    Envelope,
    Gateway,
    GatewayConfig,
    MemoryBus,
    NoRoute,
    Service,
    handles,
    hookimpl,
)
from wsbus.bus import PublishesFresh
from wsbus.edge import MemoryClient, memory_pair
from wsbus_testing.conformance import RecordingSink, client_message


class Scribbler(Service):
    """Changes the content of every message it takes, as a careless service might."""

    name = "scribbler"

    def __init__(self) -> None:
        self.seen: list[Any] = []
        self.took = asyncio.Event()

    @handles("scribble")
    async def scribble(self, message: Envelope, ctx: Context) -> None:
        self.seen.append(copy.deepcopy(message.content))
        message.content["text"] = "scribbled"
        message.content["list"].append("more")
        message.headers["scribbled"] = "yes"
        self.took.set()


class Keeper:
    """A plugin that keeps every inbound message it sees (an audit log, say)."""

    def __init__(self) -> None:
        self.kept: list[Envelope] = []

    @hookimpl
    def wsbus_transform_inbound(self, message: Envelope) -> Envelope | None:
        self.kept.append(message)
        return None


@contextlib.asynccontextmanager
async def _client(bus: MemoryBus, plugins: list[object]) -> AsyncIterator[MemoryClient]:
    """A welcomed client of a started gateway on ``bus``; its task ended at the close."""
    gateway = Gateway(bus, config=GatewayConfig(node="test"), plugins=plugins, entry_points=False)
    await gateway.start()
    conn, client = memory_pair()
    task = asyncio.create_task(gateway.serve(conn))
    try:
        async with asyncio.timeout(10):
            frame = await client.receive()
        assert frame["type"] == "wsbus.welcome", frame
        yield client
    finally:
        await gateway.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


CONTENT = {"text": "as sent", "list": [1, 2]}


async def test_the_in_memory_bus_takes_fresh_frames() -> None:
    assert isinstance(MemoryBus(), PublishesFresh)


async def test_a_service_cannot_change_the_message_a_plugin_kept() -> None:
    scribbler, keeper = Scribbler(), Keeper()
    async with _client(MemoryBus([scribbler]), [keeper]) as client:
        client.send("scribble", CONTENT)
        async with asyncio.timeout(10):
            await scribbler.took.wait()
    assert scribbler.seen == [CONTENT]
    [kept] = keeper.kept
    assert kept.content == CONTENT and kept.headers == {}


async def test_a_service_cannot_change_what_the_bus_recorded() -> None:
    scribbler = Scribbler()
    bus = MemoryBus([scribbler], record=True)
    async with _client(bus, []) as client:
        client.send("scribble", CONTENT)
        async with asyncio.timeout(10):
            await scribbler.took.wait()
    [published] = bus.published
    assert published.content == CONTENT and published.headers == {}


async def test_a_frame_no_plugin_saw_reaches_the_service_as_sent() -> None:
    scribbler = Scribbler()
    async with _client(MemoryBus([scribbler]), []) as client:
        client.send("scribble", CONTENT)
        async with asyncio.timeout(10):
            await scribbler.took.wait()
    assert scribbler.seen == [CONTENT]


async def test_publish_fresh_nowait_refuses_as_publish_nowait_does() -> None:
    bus = MemoryBus([Scribbler()], inbox_size=1)
    await bus.start(RecordingSink(bus))
    try:
        with pytest.raises(NoRoute):
            bus.publish_fresh_nowait(client_message("nobody.handles", 1))
        # Not started handling yet: the first fills the inbox, the next must wait.
        assert bus.publish_fresh_nowait(client_message("scribble", {"text": "", "list": []}))
        assert not bus.publish_fresh_nowait(client_message("scribble", {"text": "", "list": []}))
        bus.down = True
        with pytest.raises(BusUnavailable):
            bus.publish_fresh_nowait(client_message("scribble", {"text": "", "list": []}))
    finally:
        bus.down = False
        await bus.close()


async def test_publish_fresh_waits_and_refuses_as_publish_does() -> None:
    scribbler = Scribbler()
    bus = MemoryBus([scribbler], record=True)
    await bus.start(RecordingSink(bus))
    try:
        with pytest.raises(NoRoute):
            await bus.publish_fresh(client_message("nobody.handles", 1))
        async with asyncio.timeout(10):
            await bus.publish_fresh(client_message("scribble", {"text": "as sent", "list": [1]}))
            await scribbler.took.wait()
        [published] = bus.published
        assert published.content == {"text": "as sent", "list": [1]}  # recorded: copied
        bus.down = True
        with pytest.raises(BusUnavailable):
            await bus.publish_fresh(client_message("scribble", {"text": "", "list": []}))
    finally:
        bus.down = False
        await bus.close()
