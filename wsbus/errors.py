"""Every exception wsbus raises, in one tree.

::

    WsbusError
     +-- ConfigError (ValueError)                a setting or argument is out of range
     +-- RegistryError (LookupError)
     |    +-- UnknownConnection                  no open connection has that id
     |    +-- AliasTaken                         the alias belongs to another connection
     |    +-- ConnIdTaken (ValueError)           the connection id is already registered
     |    +-- InvalidName (ValueError)           an alias, user or group name is not acceptable
     +-- BusError
     |    +-- NoRoute (LookupError)              nothing on the bus handles that type
     |    +-- BusUnavailable                     the bus is down or overloaded; retry later
     +-- ControlError                            the gateway refused a service's control request
     +-- PluginError                             a plugin's hook raised (a server fault)
     +-- RequestTimeout (TimeoutError)           a reply did not come in time
     +-- ConnectionClosed (ConnectionError)      a client connection closed, with its close code
     +-- HandshakeRefused (ConnectionError)      the server refused the WebSocket upgrade
     +-- MessageRejected                         the gateway answered a message with wsbus.error
     |    +-- InvalidFrame (ValueError)          the frame broke the wire protocol: a client bug
     |    +-- Forbidden                          an authorization hook refused the message
     |    +-- Unrouted (LookupError)             nothing on the bus handles the message's type
     |    +-- ServiceFailed                      the service that took the message failed
     |    +-- ResumeFailed                       the gateway refused to resume a session
     |    +-- TryLater                           refused for now: send it again later
     |         +-- RateLimited                   the connection sends faster than its rate
     +-- MissingExtra (ImportError)              an optional transport is not installed
     +-- ChildFailed (RuntimeError)              a child process exited or did not get ready

Every exception keeps its data in attributes and pickles, because the Pyro bus ships them
between processes. ``tests/wsbus/test_errors.py`` checks this drawing against the classes.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "AliasTaken",
    "BusError",
    "BusUnavailable",
    "ChildFailed",
    "ConfigError",
    "ConnIdTaken",
    "ConnectionClosed",
    "ControlError",
    "Forbidden",
    "HandshakeRefused",
    "InvalidFrame",
    "InvalidName",
    "MessageRejected",
    "MissingExtra",
    "NoRoute",
    "PluginError",
    "RateLimited",
    "RegistryError",
    "RequestTimeout",
    "ResumeFailed",
    "ServiceFailed",
    "TryLater",
    "UnknownConnection",
    "Unrouted",
    "WsbusError",
]


class WsbusError(Exception):
    """The root of every exception wsbus raises."""


class ConfigError(WsbusError, ValueError):
    """A setting or argument is out of its allowed range."""


class RegistryError(WsbusError, LookupError):
    """A ClientRegistry operation could not be done."""


class UnknownConnection(RegistryError):
    """No open connection has this id (it may have left already).

    Attributes:
        conn_id: the connection id that was asked for.
    """

    def __init__(self, conn_id: str) -> None:
        super().__init__(conn_id)
        self.conn_id = conn_id

    def __str__(self) -> str:
        return f"no open connection has id {self.conn_id!r}; it may have disconnected"


class AliasTaken(RegistryError):
    """The alias belongs to another open connection and the policy is to refuse.

    Attributes:
        alias: the alias asked for.
    """

    def __init__(self, alias: str) -> None:
        super().__init__(alias)
        self.alias = alias

    def __str__(self) -> str:
        return (
            f"alias {self.alias!r} is taken by another connection; choose another, or set the "
            "registry's alias policy to 'suffix'"
        )


class ConnIdTaken(RegistryError, ValueError):
    """The connection id is already registered (ids are never reused): a bug in the caller.

    Attributes:
        conn_id: the connection id given twice.
    """

    def __init__(self, conn_id: str) -> None:
        super().__init__(conn_id)
        self.conn_id = conn_id

    def __str__(self) -> str:
        return f"connection id {self.conn_id!r} is already registered; ids are never reused"


class InvalidName(RegistryError, ValueError):
    """An alias, user or group name does not match the accepted pattern.

    Attributes:
        kind: ``"alias"``, ``"user"`` or ``"group"``.
        name: the rejected name.
    """

    def __init__(self, kind: str, name: str) -> None:
        super().__init__(kind, name)
        self.kind = kind
        self.name = name

    def __str__(self) -> str:
        return f"{self.kind} name {self.name[:80]!r} is not acceptable: see the naming rules"


class BusError(WsbusError):
    """The bus could not take an envelope."""


class NoRoute(BusError, LookupError):
    """Nothing on the bus handles this message type.

    Attributes:
        type: the message type that found no handler.
    """

    def __init__(self, type: str) -> None:
        super().__init__(type)
        self.type = type

    def __str__(self) -> str:
        return f"no service on the bus handles message type {self.type!r}"


class BusUnavailable(BusError):
    """The bus, or the service behind it, is down or overloaded; the caller may retry.

    Attributes:
        reason: what is unavailable, for logs.
        whole_bus: True when the bus itself is down, False when only one service is busy
            or gone (the gateway then keeps admitting clients).
    """

    def __init__(self, reason: str, whole_bus: bool = True) -> None:
        super().__init__(reason, whole_bus)
        self.reason = reason
        self.whole_bus = whole_bus

    def __str__(self) -> str:
        return f"the bus is unavailable: {self.reason}"


class ControlError(WsbusError):
    """The gateway refused a service's control request (join, alias, disconnect, ...).

    Attributes:
        code: a short machine-readable reason (``unknown_connection``, ``alias_taken``, ...).
        message: the gateway's explanation.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class PluginError(WsbusError):
    """A plugin's hook raised. The gateway treats it as its own fault, never the client's.

    :class:`~wsbus.Hooks` raises it from the plugin's exception (``__cause__``) after
    logging it; a client whose message it was checking is answered ``unavailable``.

    Attributes:
        hook: the hook that raised (``wsbus_authorize``, ...).
        plugin: the name of the plugin whose implementation raised.
    """

    def __init__(self, hook: str, plugin: str) -> None:
        super().__init__(hook, plugin)
        self.hook = hook
        self.plugin = plugin

    def __str__(self) -> str:
        return f"plugin {self.plugin!r} raised in its {self.hook} hook; fix or remove the plugin"


class RequestTimeout(WsbusError, TimeoutError):
    """A reply did not arrive within the timeout.

    Attributes:
        what: the request that timed out.
        timeout: the seconds waited.
    """

    def __init__(self, what: str, timeout: float) -> None:
        super().__init__(what, timeout)
        self.what = what
        self.timeout = timeout

    def __str__(self) -> str:
        return f"no reply to {self.what} within {self.timeout:g} s"


class ConnectionClosed(WsbusError, ConnectionError):
    """A client connection is closed: raised by receive and send once it is.

    Attributes:
        code: the WebSocket close code (1006 when the connection was lost without one).
        reason: the close reason text.
    """

    def __init__(self, code: int = 1006, reason: str = "") -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        text = f"connection closed with code {self.code}"
        return f"{text}: {self.reason}" if self.reason else text


class HandshakeRefused(WsbusError, ConnectionError):
    """The server refused the WebSocket upgrade with an HTTP status.

    Attributes:
        status: the HTTP status (403 origin refused, 503 full or shutting down, 400 no
            supported subprotocol).
        body: the start of the response body, which says why.
    """

    def __init__(self, status: int, body: str = "") -> None:
        super().__init__(status, body)
        self.status = status
        self.body = body

    def __str__(self) -> str:
        return f"the server refused the WebSocket upgrade with HTTP {self.status}: {self.body}"


class MessageRejected(WsbusError):
    """The gateway refused a message: it answered it with a ``wsbus.error`` frame.

    The Python client raises the subclass for the code (see :meth:`for_code`), so that a
    caller can catch the refusals it handles apart (``except RateLimited``) and the rest
    together (``except MessageRejected``).

    Attributes:
        code: the error code (``no_route``, ``forbidden``, ...: ``wsbus.wire.ErrorCode``).
        message: the gateway's explanation.
        retry: whether sending the same message later may succeed.
    """

    def __init__(self, code: str, message: str, retry: bool = False) -> None:
        super().__init__(code, message, retry)
        self.code = code
        self.message = message
        self.retry = retry

    def __str__(self) -> str:
        return f"{self.code}: {self.message}" + (" (retry later)" if self.retry else "")

    @staticmethod
    def for_code(code: str, message: str, retry: bool = False) -> MessageRejected:
        """Return the exception for a ``wsbus.error`` frame's content.

        A code this version does not know (a newer gateway's) gives :class:`MessageRejected`
        itself, with ``retry`` as the gateway said.
        """
        return _REJECTED_BY_CODE.get(code, MessageRejected)(code, message, retry)


class InvalidFrame(MessageRejected, ValueError):
    """The frame broke the wire protocol: fix the code that built it.

    The codes ``malformed``, ``invalid_message``, ``unknown_field``, ``reserved_type``,
    ``limit_exceeded`` and ``bad_value``. Each spends the connection's error budget (past
    it, the connection is closed with 4400).
    """


class Forbidden(MessageRejected):
    """An authorization hook refused the message (``forbidden``); ``message`` says why."""


class Unrouted(MessageRejected, LookupError):
    """Nothing on the bus handles the message's type (``no_route``).

    The client's view of :class:`NoRoute`: the service is not running, or the type is wrong.
    """


class ServiceFailed(MessageRejected):
    """The service that took the message failed handling it (``service_error``).

    The message was published (its ack came first); the service's log has the traceback
    under the message's id. Sending it again will most likely fail the same way.
    """


class ResumeFailed(MessageRejected):
    """The gateway refused a ``wsbus.resume`` (``resume_failed``): nothing was restored.

    The token is not genuine or not this user's, it was used already, its session's window
    has passed, resume is off, or the session store cannot be read. The connection goes on
    as a new session: join the groups again and resync their state.
    """


class TryLater(MessageRejected):
    """Refused for now: the same message may succeed later, after a pause.

    The codes ``unavailable``, ``shutting_down`` and ``rate_limited``: ``retry`` is True.
    """


class RateLimited(TryLater):
    """The connection sends faster than its rate (``rate_limited``): slow down.

    Refused again and again with no quiet second, the connection is closed with 4429.
    """


_REJECTED_BY_CODE: dict[str, type[MessageRejected]] = {
    "malformed": InvalidFrame,
    "invalid_message": InvalidFrame,
    "unknown_field": InvalidFrame,
    "reserved_type": InvalidFrame,
    "limit_exceeded": InvalidFrame,
    "bad_value": InvalidFrame,
    "forbidden": Forbidden,
    "no_route": Unrouted,
    "service_error": ServiceFailed,
    "unavailable": TryLater,
    "shutting_down": TryLater,
    "rate_limited": RateLimited,
    "resume_failed": ResumeFailed,
}
"""The exception for each ``wsbus.wire.ErrorCode`` (tests/wsbus/test_errors.py checks it covers
every code, and that TryLater is exactly the codes whose ``retry`` is True)."""


class MissingExtra(WsbusError, ImportError):
    """An optional transport was used without its extra installed.

    Attributes:
        extra: the extra to install (``websockets``, ``pyro``).
    """

    def __init__(self, extra: str) -> None:
        super().__init__(extra)
        self.extra = extra

    def __str__(self) -> str:
        return f"this needs the {self.extra!r} extra: pip install 'wsbus[{self.extra}]'"


class ChildFailed(WsbusError, RuntimeError):
    """A child process (name server, bus, service) exited, or did not get ready in time.

    Attributes:
        message: what happened, with what the child printed.
        child_args: the child's arguments (after ``python -m wsbus_cli``).
        output: everything the child printed.
    """

    def __init__(self, message: str, args: Sequence[str], output: str) -> None:
        super().__init__(message, list(args), output)
        self.message = message
        self.child_args = list(args)
        self.output = output

    def __str__(self) -> str:
        return self.message

    @property
    def last_line(self) -> str:
        """The last line the child printed: usually why it stopped."""
        lines = [line.strip() for line in self.output.splitlines() if line.strip()]
        return lines[-1] if lines else "(it printed nothing)"
