"""Small services used by the conformance suites; importable by path for process buses."""

from __future__ import annotations

import asyncio

import msgspec

from wsbus.envelope import ClientAddress, Envelope, Recipients
from wsbus.service import Context, Service, handles

__all__ = ["Probe", "Sequencer"]


class Probe(Service):
    """Echoes ``probe.echo`` as ``{"x": content, "sender": ...}``; ``probe.join`` joins a group."""

    name = "probe"

    @handles("probe.echo")
    async def echo(self, message: Envelope, ctx: Context) -> None:
        """Reply with the content and the sender the service saw."""
        ctx.reply({"x": message.content, "sender": msgspec.to_builtins(message.sender)})

    @handles("probe.join")
    async def join(self, message: Envelope, ctx: Context) -> None:
        """Ask the gateway to add the sender to ``content["group"]``; reply with the answer."""
        assert isinstance(message.sender, ClientAddress)
        joined = await ctx.join(message.sender.conn_id, message.content["group"])
        ctx.reply({"joined": joined})


class Sequencer(Service):
    """Sends ``content["n"]`` messages numbered 0..n-1 to the sender, yielding now and then."""

    name = "sequencer"

    @handles("sequence")
    async def sequence(self, message: Envelope, ctx: Context) -> None:
        """Send the numbered messages."""
        assert isinstance(message.sender, ClientAddress)
        recipients = Recipients(conn_ids=(message.sender.conn_id,))
        for i in range(int(message.content["n"])):
            ctx.send(recipients, "sequence.item", i)
            if i % 64 == 63:
                await asyncio.sleep(0)
