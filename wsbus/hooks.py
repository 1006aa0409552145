"""Hook specifications and the typed facade the gateway calls them through.

Plugins are plain objects (or modules) with functions marked ``@hookimpl``; they are found
through the entry-point group ``wsbus`` and through objects passed to :class:`Hooks`. An
implementation may take any subset of a hook's arguments, by name.

Example::

    from wsbus import hookimpl, Verdict

    class NoShouting:
        @hookimpl
        def wsbus_authorize(self, client, message):
            if message.type == "chat.say" and str(message.content).isupper():
                return Verdict.deny("no shouting")
            return None
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Final

import msgspec
import pluggy

from .envelope import ClientAddress, Envelope, Recipients

__all__ = [
    "PROJECT",
    "DeliveryFailure",
    "Drop",
    "HandshakeRequest",
    "Hooks",
    "Identity",
    "Refusal",
    "Verdict",
    "hookimpl",
    "hookspec",
]

PROJECT: Final = "wsbus"
hookspec = pluggy.HookspecMarker(PROJECT)
"""Marks a hook specification (for wsbus itself)."""
hookimpl = pluggy.HookimplMarker(PROJECT)
"""Marks a plugin's hook implementation."""

log = logging.getLogger("wsbus.hooks")


class HandshakeRequest(msgspec.Struct, frozen=True):
    """What an edge adapter knows about a connecting client, for authentication.

    Attributes:
        path: the request path, without the query string.
        query: query-string parameters (the last value of each).
        headers: request headers, names lower-cased.
        remote: the peer's address, ``host:port``.
        subprotocols: the subprotocols the client offered.
        token: a bearer token the edge found (``Authorization: Bearer``, a ``token``
            query parameter or cookie, a ``wsbus.token.<t>`` subprotocol) or that came in a
            first ``wsbus.auth`` frame; None when there was none.
        via: ``"handshake"``, or ``"frame"`` when the token came in a ``wsbus.auth`` frame.
    """

    path: str = "/"
    query: dict[str, str] = msgspec.field(default_factory=dict)
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    remote: str = ""
    subprotocols: tuple[str, ...] = ()
    token: str | None = None
    via: str = "handshake"


class Identity(msgspec.Struct, frozen=True):
    """An accepted client.

    Attributes:
        user: the authenticated user, or None for an anonymous client. All of a user's
            connections can be addressed together.
        alias: an alias to set on the connection at once, if any.
    """

    user: str | None = None
    alias: str | None = None


class Refusal(msgspec.Struct, frozen=True):
    """A refused client. The client is closed 4401 with one reason text for every cause.

    Attributes:
        reason: why, for the gateway's log only: never sent to the client.
    """

    reason: str = "refused"


class Verdict(msgspec.Struct, frozen=True):
    """An authorization decision on one inbound message.

    Attributes:
        allowed: whether the message may go on the bus.
        reason: a short text for the client's ``forbidden`` error.
        close: when denied, also close the connection with 4403.
    """

    allowed: bool
    reason: str = ""
    close: bool = False

    @classmethod
    def allow(cls) -> Verdict:
        """Let the message through."""
        return _ALLOW

    @classmethod
    def deny(cls, reason: str = "not allowed", *, close: bool = False) -> Verdict:
        """Refuse the message with ``forbidden``; ``close`` also closes the connection 4403."""
        return cls(False, reason, close)


_ALLOW: Final = Verdict(True)


class Drop(msgspec.Struct, frozen=True):
    """Returned by a transform hook to stop a message.

    An inbound message that is dropped is rejected with ``forbidden``; an outbound one is
    reported undeliverable to its sender. Nothing is dropped silently.

    Attributes:
        reason: a short explanation (the client sees it for inbound messages).
    """

    reason: str = "filtered"


class DeliveryFailure(msgspec.Struct, frozen=True):
    """Why an outbound message did not reach some recipients.

    Attributes:
        reason: ``no_match`` (recipients matched no connection), ``filtered`` (a hook
            dropped it), ``slow_consumer`` (a connection's queue was full and the policy is
            ``drop``), ``encode_failed`` (the content cannot be encoded).
        recipients: the recipients that were missed.
        detail: a human-readable explanation.
    """

    reason: str
    recipients: Recipients
    detail: str = ""


class _Specs:
    """The hook specifications. Implement any of these, by name, in a plugin."""

    @hookspec(firstresult=True)
    def wsbus_authenticate(self, request: HandshakeRequest) -> Identity | Refusal | None:
        """Decide who a connecting client is.

        The first implementation that returns an :class:`Identity` (accept) or a
        :class:`Refusal` (close 4401) wins; ``None`` defers to the next. When every
        implementation defers the client is refused, unless the gateway allows anonymous
        clients (a built-in plugin that runs last).
        """

    @hookspec(firstresult=True)
    def wsbus_authorize(self, client: ClientAddress, message: Envelope) -> Verdict | None:
        """Decide whether ``client`` may publish ``message``.

        The first implementation that returns a verdict wins; ``None`` defers to the next.
        When all defer, the message is allowed.
        """

    @hookspec
    def wsbus_transform_inbound(
        self, client: ClientAddress, message: Envelope
    ) -> Envelope | Drop | None:
        """Rewrite or stop a client message after it was authorized, before it is published.

        Implementations are chained: each gets the message as the previous one returned
        it. Return a new envelope to replace it, :class:`Drop` to reject it with
        ``forbidden``, or ``None`` to leave it as it is. The sender cannot be changed: the
        gateway stamps it again after the chain.
        """

    @hookspec
    def wsbus_transform_outbound(self, message: Envelope) -> Envelope | Drop | None:
        """Rewrite or stop a service message before it is fanned out to clients.

        Chained like :meth:`wsbus_transform_inbound`. Called once per message, not once
        per recipient, so the message is still encoded once. A dropped message is reported
        undeliverable to its sender.
        """

    @hookspec
    def wsbus_client_connected(self, client: ClientAddress, request: HandshakeRequest) -> None:
        """Learn that a client connected and was authenticated."""

    @hookspec
    def wsbus_client_disconnected(self, client: ClientAddress, code: int, reason: str) -> None:
        """Learn that a client's connection ended, with the close code."""

    @hookspec
    def wsbus_delivery_failed(self, message: Envelope, failure: DeliveryFailure) -> None:
        """Learn that a service message missed some recipients (also reported to the sender)."""


class Hooks:
    """The typed facade over pluggy through which the gateway calls every hook.

    Args:
        plugins: plugin objects or modules to register, in order.
        entry_points: also load the plugins installed under the ``wsbus`` entry-point group.
    """

    def __init__(self, plugins: Iterable[object] = (), *, entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(_Specs)
        if entry_points:
            self.pm.load_setuptools_entrypoints(PROJECT)
        for plugin in plugins:
            self.pm.register(plugin)
        self._refresh()

    def register(self, plugin: object, name: str | None = None) -> None:
        """Register one more plugin."""
        self.pm.register(plugin, name)
        self._refresh()

    def unregister(self, plugin: object) -> None:
        """Remove a plugin."""
        self.pm.unregister(plugin)
        self._refresh()

    def _refresh(self) -> None:
        # Cached so the per-message path skips hooks that nobody implements.
        hook = self.pm.hook
        self._authorize = bool(hook.wsbus_authorize.get_hookimpls())
        self._inbound = _chain(hook.wsbus_transform_inbound)
        self._outbound = _chain(hook.wsbus_transform_outbound)
        self.inbound_hooks = self._authorize or bool(self._inbound)
        """True when any plugin authorizes or transforms inbound messages."""

    def authenticate(self, request: HandshakeRequest) -> Identity | Refusal | None:
        """Run ``wsbus_authenticate``; None means no plugin decided."""
        result: Identity | Refusal | None = self.pm.hook.wsbus_authenticate(request=request)
        return result

    def authorize(self, client: ClientAddress, message: Envelope) -> Verdict:
        """Run ``wsbus_authorize``; allowed when no plugin decides."""
        if not self._authorize:
            return _ALLOW
        verdict: Verdict | None = self.pm.hook.wsbus_authorize(client=client, message=message)
        return _ALLOW if verdict is None else verdict

    def transform_inbound(self, client: ClientAddress, message: Envelope) -> Envelope | Drop:
        """Run the ``wsbus_transform_inbound`` chain."""
        for function, argnames in self._inbound:
            args = {"client": client, "message": message}
            result = function(**{name: args[name] for name in argnames})
            if isinstance(result, Drop):
                return result
            if result is not None:
                message = result
        return message

    def transform_outbound(self, message: Envelope) -> Envelope | Drop:
        """Run the ``wsbus_transform_outbound`` chain."""
        for function, argnames in self._outbound:
            result = function(**{name: message for name in argnames})
            if isinstance(result, Drop):
                return result
            if result is not None:
                message = result
        return message

    def client_connected(self, client: ClientAddress, request: HandshakeRequest) -> None:
        """Run ``wsbus_client_connected``; a failing plugin is logged, not raised."""
        self._notify("wsbus_client_connected", client=client, request=request)

    def client_disconnected(self, client: ClientAddress, code: int, reason: str) -> None:
        """Run ``wsbus_client_disconnected``; a failing plugin is logged, not raised."""
        self._notify("wsbus_client_disconnected", client=client, code=code, reason=reason)

    def delivery_failed(self, message: Envelope, failure: DeliveryFailure) -> None:
        """Run ``wsbus_delivery_failed``; a failing plugin is logged, not raised."""
        self._notify("wsbus_delivery_failed", message=message, failure=failure)

    def _notify(self, name: str, **kwargs: Any) -> None:
        caller = getattr(self.pm.hook, name)
        if not caller.get_hookimpls():
            return
        try:
            caller(**kwargs)
        except Exception:
            log.exception("a plugin's %s hook raised; the gateway carries on", name)


def _chain(caller: pluggy.HookCaller) -> list[tuple[Any, tuple[str, ...]]]:
    """Return a hook's implementations as (function, argnames), in pluggy's call order."""
    return [
        (impl.function, impl.argnames)
        for impl in reversed(caller.get_hookimpls())
        if not (impl.hookwrapper or impl.wrapper)
    ]
