"""The service the Pyro benchmark runs as its own process."""

from __future__ import annotations

import asyncio
import time

from wsbus import ClientAddress, Context, Envelope, Recipients, Service, handles


class Bench(Service):
    """``bench.send`` ``{"n"}``: n numbered messages to the sender; ``bench.stamp``, ``echo``."""

    name = "bench"

    @handles("bench.send")
    async def send(self, message: Envelope, ctx: Context) -> None:
        """Send the messages, yielding now and then as a real producer would."""
        assert isinstance(message.sender, ClientAddress)
        to = Recipients(conn_ids=(message.sender.conn_id,))
        for i in range(int(message.content["n"])):
            ctx.send(to, "bench.item", {"i": i})
            if i % 256 == 255:
                await asyncio.sleep(0)

    @handles("bench.stamp")
    async def stamp(self, message: Envelope, ctx: Context) -> None:
        """Send the sender one message stamped with this process's monotonic clock."""
        assert isinstance(message.sender, ClientAddress)
        to = Recipients(conn_ids=(message.sender.conn_id,))
        ctx.send(to, "bench.stamp", {"n": message.content, "t": time.monotonic()})

    @handles("bench.echo")
    async def echo(self, message: Envelope, ctx: Context) -> None:
        """Reply at once."""
        ctx.reply(message.content)
