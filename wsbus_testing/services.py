"""Small services used by the conformance suites; importable by path for process buses."""

from __future__ import annotations

import asyncio

import msgspec

from wsbus.envelope import ClientAddress, Envelope, Recipients
from wsbus.service import Context, Service, handles

__all__ = ["Director", "Failing", "Flood", "Probe", "Sequencer", "Watcher"]


class Probe(Service):
    """Echoes ``probe.echo``, joins on ``probe.join``, lists clients on ``probe.clients``.

    The echo is ``{"x": content, "sender": ...}``.
    """

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

    @handles("probe.clients")
    async def clients(self, message: Envelope, ctx: Context) -> None:
        """Reply with the connection ids of the clients (every gateway's, on a bus with several)."""
        ctx.reply({"clients": [info.conn_id for info in await ctx.clients()]})

    @handles("probe.send")
    async def send(self, message: Envelope, ctx: Context) -> None:
        """Send ``probe.item`` for each ``[recipients, body]`` of ``content["sends"]``, in order."""
        for recipients, body in message.content["sends"]:
            ctx.send(msgspec.convert(recipients, Recipients), "probe.item", body)


class Watcher(Service):
    """Declares ``wsbus.presence`` and keeps every presence event it gets.

    ``watcher.seen`` replies ``{"events": [{"sender": ..., "content": ...}, ...]}``.
    """

    name = "watcher"

    def __init__(self) -> None:
        self.events: list[dict[str, object]] = []

    @handles("wsbus.presence")
    async def presence(self, message: Envelope, ctx: Context) -> None:
        """Keep a presence event."""
        self.events.append(
            {"sender": msgspec.to_builtins(message.sender), "content": message.content}
        )

    @handles("watcher.seen")
    async def seen(self, message: Envelope, ctx: Context) -> None:
        """Reply with the events kept so far."""
        ctx.reply({"events": self.events})


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


class Director(Service):
    """Lets a test client drive gateway control and sends, through a real service.

    ``director.join`` ``{"group"}``, ``director.alias`` ``{"alias"}``: act on the sender and
    reply. ``director.send`` ``{"recipients": {...}, "body": ...}``: send ``director.item``
    with the body to those recipients. ``director.clients``: reply with the client list.
    Undeliverable reports are counted and answered on ``director.missed`` requests.
    """

    name = "director"

    def __init__(self) -> None:
        self.missed: list[dict[str, object]] = []

    @handles("director.join")
    async def join(self, message: Envelope, ctx: Context) -> None:
        """Add the sender to a group."""
        assert isinstance(message.sender, ClientAddress)
        ctx.reply({"joined": await ctx.join(message.sender.conn_id, message.content["group"])})

    @handles("director.alias")
    async def alias(self, message: Envelope, ctx: Context) -> None:
        """Set the sender's alias."""
        assert isinstance(message.sender, ClientAddress)
        ctx.reply({"alias": await ctx.set_alias(message.sender.conn_id, message.content["alias"])})

    @handles("director.send")
    async def send(self, message: Envelope, ctx: Context) -> None:
        """Send the body to the recipients named in the content."""
        recipients = msgspec.convert(message.content["recipients"], Recipients)
        ctx.send(recipients, "director.item", message.content["body"])

    @handles("director.clients")
    async def clients(self, message: Envelope, ctx: Context) -> None:
        """Reply with the connection ids the gateway lists."""
        ctx.reply({"clients": [c.conn_id for c in await ctx.clients()]})

    @handles("director.missed")
    async def report(self, message: Envelope, ctx: Context) -> None:
        """Reply with the undeliverable reports received so far."""
        ctx.reply({"missed": self.missed})

    @handles("wsbus.undeliverable")
    async def undeliverable(self, message: Envelope, ctx: Context) -> None:
        """Keep an undeliverable report."""
        self.missed.append(message.content)


class Failing(Service):
    """Handlers that raise, to show what a client is told when a service fails.

    ``failing.raise`` (async) and ``failing.raise_sync`` (a plain ``def``, run in a worker
    thread) raise ``RuntimeError(SECRET)``; ``failing.half`` replies ``"half"`` and then
    raises; ``failing.relay`` publishes ``failing.raise`` itself (a service's message that
    fails: nobody but this service's log hears of it); ``failing.ok`` replies ``"ok"``.
    """

    name = "failing"
    SECRET = "db password hunter2 at /srv/app/secret.py"
    """The text of every exception raised here: none of it may reach a client."""

    @handles("failing.raise")
    async def fail(self, message: Envelope, ctx: Context) -> None:
        """Raise."""
        raise RuntimeError(self.SECRET)

    @handles("failing.raise_sync")
    def fail_sync(self, message: Envelope, ctx: Context) -> None:
        """Raise, from a worker thread."""
        raise RuntimeError(self.SECRET)

    @handles("failing.half")
    async def half(self, message: Envelope, ctx: Context) -> None:
        """Reply, then raise."""
        ctx.reply("half")
        raise RuntimeError(self.SECRET)

    @handles("failing.relay")
    async def relay(self, message: Envelope, ctx: Context) -> None:
        """Send ``failing.raise`` as this service, then reply ``"relayed"``."""
        ctx.link.publish("failing.raise", None)
        ctx.reply("relayed")

    @handles("failing.ok")
    async def ok(self, message: Envelope, ctx: Context) -> None:
        """Reply ``"ok"``."""
        ctx.reply("ok")


class Flood(Service):
    """Sends ``content["n"]`` ``flood.item`` messages to the sender, or to ``content["group"]``.

    Each item is ``{"i": i}``, with ``"pad"`` (8 KiB) when ``content["pad"]`` is true. The
    edge suites use it to make slow consumers.
    """

    name = "flood"

    @handles("flood")
    async def flood(self, message: Envelope, ctx: Context) -> None:
        """Send the items, yielding to the event loop every 64, as a real service's pace would."""
        assert isinstance(message.sender, ClientAddress)
        n = int(message.content["n"])
        group = message.content.get("group")
        pad = "x" * 8192 if message.content.get("pad") else None
        recipients = (
            Recipients(groups=(group,)) if group else Recipients(conn_ids=(message.sender.conn_id,))
        )
        for i in range(n):
            ctx.send(recipients, "flood.item", {"i": i} if pad is None else {"i": i, "pad": pad})
            if i % 64 == 63:
                await asyncio.sleep(0)
