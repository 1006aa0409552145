"""The demo services: echo, and chat rooms with nicknames.

They are ordinary :class:`~wsbus.Service` subclasses, and run unchanged on the in-memory bus
and as Pyro service processes.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from wsbus.envelope import ClientAddress, ConnId, Envelope, Recipients
from wsbus.errors import ControlError, WsbusError
from wsbus.service import Context, Service, handles

__all__ = ["NICK_RULE", "ROOM_RULE", "Chat", "Echo"]


class Echo(Service):
    """Answers ``echo`` with ``echo.reply``: what was sent and who the service saw send it."""

    name = "echo"

    @handles("echo")
    async def echo(self, message: Envelope, ctx: Context) -> None:
        """Reply with ``{"content": <as sent>, "sender": <the stamped sender>}``."""
        ctx.reply({"content": message.content, "sender": msgspec.to_builtins(message.sender)})


_ROOM = re.compile(r"[A-Za-z0-9_-]{1,48}")
ROOM_RULE = "a room name is 1-48 of A-Z a-z 0-9 _ -"
"""The rule for room names, as the page and the replies state it."""


def _room(content: Any) -> str | None:
    room = content.get("room") if isinstance(content, dict) else None
    return room if isinstance(room, str) and _ROOM.fullmatch(room) is not None else None


_NICK = re.compile(r"[A-Za-z0-9_-]{1,32}")
NICK_RULE = "a nickname is 1-32 of A-Z a-z 0-9 _ -"
"""The rule for nicknames, as the page and the replies state it."""
_NICK_ERRORS = {
    "alias_taken": "that nickname is taken",
    "invalid_name": NICK_RULE,
}


class Chat(Service):
    """Chat rooms with nicknames, and who is in them.

    ``chat.nick`` sets a nickname, ``chat.join``/``chat.leave`` a room, and ``chat.say``
    sends ``chat.message`` ``{"room", "from", "text"}`` to the room; only a member of the
    room may. ``chat.members`` lists who is in a room: ``{"ok": true, "room", "members":
    [{"conn_id", "alias", "user"}, ...]}`` (at most :attr:`max_members`, ``"more": true``
    past them), asked of every gateway. A room is the group ``room.<name>``: the demo's
    gateway keeps its history (a reloaded page gets what it missed) and sends its members
    ``wsbus.presence`` frames as others join and leave, which keep the page's list current.

    ``chat.nick``, ``chat.join``, ``chat.leave`` and ``chat.members`` are answered with
    ``<type>.reply``: ``{"ok": true, ...}`` or ``{"ok": false, "error": ...}``. ``chat.say``
    is answered only when refused (``{"ok": false, "error": ...}``): the message itself,
    which the sender gets too, says it went out.
    """

    name = "chat"
    max_text = 2000
    max_members = 500
    """Members listed in one ``chat.members`` answer."""
    max_cached = 100_000
    """Memberships remembered before the cache is cleared (it holds closed connections too)."""

    def __init__(self) -> None:
        # room -> the connections seen joining it. The gateway's groups are the truth; this
        # spares asking it on every message. A miss is checked with the gateway.
        self._members: dict[str, set[ConnId]] = {}
        self._cached = 0

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
            ctx.reply({"ok": False, "error": f'send {{"room": "name"}}: {ROOM_RULE}'})
            return
        try:
            if message.type == "chat.join":
                await ctx.join(sender.conn_id, f"room.{room}")
                self._remember(room, sender.conn_id)
            else:
                self._members.get(room, set()).discard(sender.conn_id)
                await ctx.leave(sender.conn_id, f"room.{room}")
        except ControlError as exc:
            ctx.reply({"ok": False, "error": exc.message})
            return
        ctx.reply({"ok": True, "room": room})

    @handles("chat.members")
    async def members(self, message: Envelope, ctx: Context) -> None:
        """List who is in the room named in the content, on every gateway."""
        room = _room(message.content)
        if room is None:
            ctx.reply({"ok": False, "error": f'send {{"room": "name"}}: {ROOM_RULE}'})
            return
        try:
            found = await ctx.presence(f"room.{room}")
        except WsbusError as exc:
            ctx.reply({"ok": False, "room": room, "error": f"cannot list #{room} now ({exc})"})
            return
        members = [
            {"conn_id": member.conn_id, "alias": member.alias, "user": member.user}
            for member in found[: self.max_members]
        ]
        answer: dict[str, Any] = {"ok": True, "room": room, "members": members}
        if len(found) > self.max_members:
            answer["more"] = True
        ctx.reply(answer)

    def _remember(self, room: str, conn_id: ConnId) -> None:
        if self._cached >= self.max_cached:
            self._members.clear()
            self._cached = 0
        members = self._members.setdefault(room, set())
        if conn_id not in members:
            members.add(conn_id)
            self._cached += 1

    async def _is_member(self, room: str, conn_id: ConnId, ctx: Context) -> bool:
        if conn_id in self._members.get(room, ()):
            return True
        # Not seen joining (this service may have restarted since): ask the gateway.
        try:
            members = await ctx.clients(f"room.{room}")
        except WsbusError:
            return False
        if any(member.conn_id == conn_id for member in members):
            self._remember(room, conn_id)
            return True
        return False

    @handles("chat.say")
    async def say(self, message: Envelope, ctx: Context) -> None:
        """Send the text to everyone in the room, the sender included."""
        sender = message.sender
        room = _room(message.content)
        text = message.content.get("text") if isinstance(message.content, dict) else None
        if not isinstance(sender, ClientAddress) or room is None or not isinstance(text, str):
            ctx.reply({"ok": False, "error": f'send {{"room": ..., "text": ...}}: {ROOM_RULE}'})
            return
        if not await self._is_member(room, sender.conn_id, ctx):
            ctx.reply(
                {"ok": False, "room": room, "error": f"you are not in #{room}: join it first"}
            )
            return
        author = sender.alias if sender.alias is not None else sender.conn_id
        ctx.send(
            Recipients(groups=(f"room.{room}",)),
            "chat.message",
            {"room": room, "from": author, "text": text[: self.max_text]},
        )
