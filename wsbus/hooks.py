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

import difflib
import inspect
import logging
import time
import types
from collections.abc import Iterable
from typing import Any, Final

import msgspec
import pluggy

from .control import Undeliverable
from .envelope import ClientAddress, Envelope
from .errors import ConfigError, PluginError

__all__ = [
    "PLUGIN_LOG_INTERVAL",
    "PROJECT",
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
"""The pluggy project name, and the entry-point group plugins register under."""
hookspec = pluggy.HookspecMarker(PROJECT)
"""Marks a hook specification (for wsbus itself)."""
hookimpl = pluggy.HookimplMarker(PROJECT)
"""Marks a plugin's hook implementation."""

log = logging.getLogger("wsbus.hooks")

PLUGIN_LOG_INTERVAL: Final = 60.0
"""Seconds between log lines about one plugin's hook that keeps raising: the first failure
is logged at once, with its traceback; later ones are counted and logged at most once per
interval, so a broken plugin on a busy gateway cannot flood the log."""

# What each hook's failure means for the message or client at hand, for the log line.
_CONSEQUENCE: Final = {
    "wsbus_authenticate": "the client was closed 1013 (try again later)",
    "wsbus_authorize": "the client was answered `unavailable` (retry true)",
    "wsbus_transform_inbound": "the client was answered `unavailable` (retry true)",
    "wsbus_transform_outbound": "the message was reported undeliverable to its sender",
}


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
    def wsbus_delivery_failed(self, message: Envelope, failure: Undeliverable) -> None:
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
        self._failures = _FailureLog(PLUGIN_LOG_INTERVAL)
        if entry_points:
            self.pm.load_setuptools_entrypoints(PROJECT)
        for plugin in plugins:
            _check_plugin(self.pm, plugin)
            self.pm.register(plugin)
        self._check_pending()
        self._refresh()

    def register(self, plugin: object, name: str | None = None) -> None:
        """Register one more plugin.

        Raises:
            ConfigError: the plugin implements a hook wsbus does not have (a misspelled
                name), or takes an argument the hook does not pass.
        """
        _check_plugin(self.pm, plugin)
        self.pm.register(plugin, name)
        self._check_pending()
        self._refresh()

    def _check_pending(self) -> None:
        # _check_plugin already refused what it can name; this also covers plugins loaded
        # from entry points, which pluggy registers itself.
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise ConfigError(f"plugin {_label(exc.plugin)}: {exc}") from None

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
        """Run ``wsbus_authenticate``; None means no plugin decided.

        Raises:
            PluginError: a plugin raised (logged here, rate-limited).
        """
        caller = self.pm.hook.wsbus_authenticate
        try:
            result: Identity | Refusal | None = caller(request=request)
        except Exception as exc:
            raise self._failed("wsbus_authenticate", _culprit(caller, exc)) from exc
        return result

    def authorize(self, client: ClientAddress, message: Envelope) -> Verdict:
        """Run ``wsbus_authorize``; allowed when no plugin decides.

        Raises:
            PluginError: a plugin raised (logged here, rate-limited).
        """
        if not self._authorize:
            return _ALLOW
        caller = self.pm.hook.wsbus_authorize
        try:
            verdict: Verdict | None = caller(client=client, message=message)
        except Exception as exc:
            raise self._failed("wsbus_authorize", _culprit(caller, exc)) from exc
        return _ALLOW if verdict is None else verdict

    def transform_inbound(self, client: ClientAddress, message: Envelope) -> Envelope | Drop:
        """Run the ``wsbus_transform_inbound`` chain.

        Raises:
            PluginError: a plugin raised (logged here, rate-limited).
        """
        for function, argnames, plugin in self._inbound:
            args = {"client": client, "message": message}
            try:
                result = function(**{name: args[name] for name in argnames})
            except Exception as exc:
                raise self._failed("wsbus_transform_inbound", plugin) from exc
            if isinstance(result, Drop):
                return result
            if result is not None:
                message = result
        return message

    def transform_outbound(self, message: Envelope) -> Envelope | Drop:
        """Run the ``wsbus_transform_outbound`` chain.

        Raises:
            PluginError: a plugin raised (logged here, rate-limited).
        """
        for function, argnames, plugin in self._outbound:
            try:
                result = function(**{name: message for name in argnames})
            except Exception as exc:
                raise self._failed("wsbus_transform_outbound", plugin) from exc
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

    def delivery_failed(self, message: Envelope, failure: Undeliverable) -> None:
        """Run ``wsbus_delivery_failed``; a failing plugin is logged, not raised."""
        self._notify("wsbus_delivery_failed", message=message, failure=failure)

    def _notify(self, name: str, **kwargs: Any) -> None:
        caller = getattr(self.pm.hook, name)
        if not caller.get_hookimpls():
            return
        try:
            caller(**kwargs)
        except Exception as exc:
            self._failed(name, _culprit(caller, exc))

    def _failed(self, hook: str, plugin: str) -> PluginError:
        """Log a plugin's exception (rate-limited); return the error to raise from it.

        Called in the ``except`` block, so the first line of each interval has the traceback.
        """
        count = self._failures.admit((hook, plugin), time.monotonic())
        if count is not None:
            consequence = _CONSEQUENCE.get(hook, "the gateway carries on")
            if count == 0:
                log.exception(
                    "plugin %r: its %s hook raised; %s. Fix or remove the plugin; further "
                    "failures of it are logged at most once every %g s",
                    plugin,
                    hook,
                    consequence,
                    self._failures.interval,
                )
            else:
                log.error(
                    "plugin %r: its %s hook raised again: %d failures since the last report "
                    "(the last one's traceback follows); %s. Fix or remove the plugin",
                    plugin,
                    hook,
                    count,
                    consequence,
                    exc_info=True,
                )
        return PluginError(hook, plugin)


class _FailureLog:
    """Decides when a failure that keeps happening is logged.

    The first time at once, then at most once per interval with the count of those not
    logged. Pure bookkeeping: ``now`` comes in as an argument.

    Args:
        interval: the least seconds between two log lines for one key.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        # key -> [when last logged, failures since then that were not logged]. One entry
        # per (hook, plugin): bounded by the plugins registered.
        self._state: dict[Any, list[float]] = {}

    def admit(self, key: Any, now: float) -> int | None:
        """Record one failure and say whether to log it.

        Returns:
            None: stay quiet. 0: the key's first failure ever. Otherwise the failures since
            the last line, this one included.
        """
        state = self._state.get(key)
        if state is None:
            self._state[key] = [now, 0]
            return 0
        if now - state[0] >= self.interval:
            count = int(state[1]) + 1
            state[0], state[1] = now, 0
            return count
        state[1] += 1
        return None


_HOOK_ARGS: Final = {
    name: tuple(p for p in inspect.signature(function).parameters if p != "self")
    for name, function in vars(_Specs).items()
    if name.startswith("wsbus_")
}


def _label(plugin: object) -> str:
    if inspect.ismodule(plugin):
        return plugin.__name__
    cls = plugin if isinstance(plugin, type) else type(plugin)
    return f"{cls.__module__}.{cls.__qualname__}"


def _required_args(function: Any) -> list[str]:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return []
    # pluggy passes only arguments without a default; ``self`` of an unbound method is the
    # plugin object itself.
    return [
        p.name
        for p in parameters
        if p.default is p.empty
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        and p.name != "self"
    ]


def _check_plugin(pm: pluggy.PluginManager, plugin: object) -> None:
    """Refuse a plugin whose hooks wsbus would silently never call, before registering it.

    Raises:
        ConfigError: a hook name is not a wsbus hook (the message suggests the closest),
            or an implementation takes an argument its hook does not pass.
    """
    label = _label(plugin)
    for attr in dir(plugin):
        opts = pm.parse_hookimpl_opts(plugin, attr)
        if opts is None:
            continue
        hook = opts.get("specname") or attr
        args = _HOOK_ARGS.get(hook)
        if args is None:
            if opts.get("optionalhook"):
                continue
            close = difflib.get_close_matches(hook, list(_HOOK_ARGS), n=1)
            hint = (
                f"did you mean {close[0]}?" if close else "the hooks are " + ", ".join(_HOOK_ARGS)
            )
            raise ConfigError(f"plugin {label}: {hook} is not a wsbus hook; {hint}")
        unknown = [name for name in _required_args(getattr(plugin, attr)) if name not in args]
        if unknown:
            raise ConfigError(
                f"plugin {label}: {hook} takes {unknown[0]!r}, which the hook does not pass; "
                f"its arguments are {', '.join(args)} (take any of them, by these names)"
            )


def _chain(caller: pluggy.HookCaller) -> list[tuple[Any, tuple[str, ...], str]]:
    """Return a hook's implementations as (function, argnames, plugin name), in call order."""
    return [
        (impl.function, impl.argnames, _plugin_name(impl))
        for impl in reversed(caller.get_hookimpls())
        if not (impl.hookwrapper or impl.wrapper)
    ]


def _plugin_name(impl: Any) -> str:
    """Return the name a user knows a plugin by.

    Its registered or entry-point name, else its module's, else its class's: pluggy names
    an object registered without a name by its ``id``, which tells a reader nothing.
    """
    name = str(impl.plugin_name)
    if not name.isdigit():
        return name
    plugin = impl.plugin
    if isinstance(plugin, types.ModuleType):
        return plugin.__name__
    cls = type(plugin)
    return f"{cls.__module__}.{cls.__qualname__}"


def _culprit(caller: pluggy.HookCaller, exc: BaseException) -> str:
    """Return the name of the plugin whose implementation ``exc`` was raised through.

    pluggy re-raises a plugin's own exception, whose traceback still holds the frame of
    the implementation it passed through.
    """
    codes = set()
    tb = exc.__traceback__
    while tb is not None:
        codes.add(tb.tb_frame.f_code)
        tb = tb.tb_next
    for impl in caller.get_hookimpls():
        if getattr(impl.function, "__code__", None) in codes:
            return _plugin_name(impl)
    return "unknown"
