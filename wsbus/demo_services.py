"""The demo services: echo, and chat rooms with nicknames.

They are ordinary :class:`~wsbus.Service` subclasses, and run unchanged on the in-memory bus
and as Pyro service processes.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from .envelope import ClientAddress, Envelope, Recipients
from .errors import ControlError
from .service import Context, Service, handles

__all__ = ["Chat", "Echo"]


class Echo(Service):
    """Answers ``echo`` with ``echo.reply``: what was sent and who the service saw send it."""

    name = "echo"

    @handles("echo")
    async def echo(self, message: Envelope, ctx: Context) -> None:
        """Reply with ``{"content": <as sent>, "sender": <the stamped sender>}``."""
        ctx.reply({"content": message.content, "sender": msgspec.to_builtins(message.sender)})


def _room(content: Any) -> str | None:
    room = content.get("room") if isinstance(content, dict) else None
    return room if isinstance(room, str) and 0 < len(room) <= 48 else None


_NICK = re.compile(r"[A-Za-z0-9_-]{1,32}")
_NICK_ERRORS = {
    "alias_taken": "that nickname is taken",
    "invalid_name": "a nickname is 1-32 of A-Z a-z 0-9 _ -",
}


class Chat(Service):
    """Chat rooms with nicknames.

    ``chat.nick`` sets a nickname, ``chat.join``/``chat.leave`` a room, and ``chat.say``
    sends ``chat.message`` ``{"room", "from", "text"}`` to the room.

    Every request is answered with ``<type>.reply``: ``{"ok": true, ...}`` or
    ``{"ok": false, "error": ...}``.
    """

    name = "chat"
    max_text = 2000

    @handles("chat.nick")
    async def nick(self, message: Envelope, ctx: Context) -> None:
        """Set the sender's nickname (an alias); the gateway's alias policy rules a taken one."""
        sender = message.sender
        nick = message.content.get("nick") if isinstance(message.content, dict) else None
        if not isinstance(sender, ClientAddress) or not isinstance(nick, str):
            ctx.reply({"ok": False, "error": 'send {"nick": "name"}'})
            return
        if _NICK.fullmatch(nick) is None:
            # No dots: connection ids always have one, so no nickname can pose as one.
            ctx.reply({"ok": False, "error": _NICK_ERRORS["invalid_name"]})
            return
        try:
            given = await ctx.set_alias(sender.conn_id, nick)
        except ControlError as exc:
            reason = _NICK_ERRORS.get(exc.code, "nickname not accepted")
            ctx.reply({"ok": False, "error": reason})
            return
        ctx.reply({"ok": True, "nick": given})

    @handles("chat.join", "chat.leave")
    async def membership(self, message: Envelope, ctx: Context) -> None:
        """Join or leave the room named in the content."""
        sender = message.sender
        room = _room(message.content)
        if not isinstance(sender, ClientAddress) or room is None:
            ctx.reply({"ok": False, "error": 'send {"room": "name"} (1-48 characters)'})
            return
        try:
            if message.type == "chat.join":
                await ctx.join(sender.conn_id, f"room.{room}")
            else:
                await ctx.leave(sender.conn_id, f"room.{room}")
        except ControlError as exc:
            ctx.reply({"ok": False, "error": exc.message})
            return
        ctx.reply({"ok": True, "room": room})

    @handles("chat.say")
    async def say(self, message: Envelope, ctx: Context) -> None:
        """Send the text to everyone in the room, the sender included."""
        sender = message.sender
        room = _room(message.content)
        text = message.content.get("text") if isinstance(message.content, dict) else None
        if not isinstance(sender, ClientAddress) or room is None or not isinstance(text, str):
            ctx.reply({"ok": False, "error": 'send {"room": ..., "text": ...}'})
            return
        author = sender.alias if sender.alias is not None else sender.conn_id
        ctx.send(
            Recipients(groups=(f"room.{room}",)),
            "chat.message",
            {"room": room, "from": author, "text": text[: self.max_text]},
        )
