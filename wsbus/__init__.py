"""wsbus: a WebSocket gateway between clients and internal services over a message bus.

The core is transport-neutral: plug in an edge adapter (``wsbus_websockets``) for the
clients and a bus (the in-memory :class:`MemoryBus`, or ``wsbus_pyro``) for the services.

This package holds what users need: writing services (:class:`Service`, :func:`handles`,
:class:`Context`, :class:`Envelope` and the addresses), running a gateway (:class:`Gateway`,
:class:`GatewayConfig`, :class:`Stats`, :class:`CloseCode`; history and resume,
:class:`HistoryConfig`, :class:`ResumeSettings` and :class:`Position`; in memory, :class:`MemoryBus`
and :func:`memory_pair`), writing plugins (:data:`hookimpl` and the hook value types), the
settings users configure (:class:`Codec`, :class:`WireLimits`, :class:`AliasPolicy`) and
every exception (:mod:`wsbus.errors`). What adapter authors and tests need stays public in
its own module: the bus and edge interfaces and in-memory fakes (:mod:`wsbus.bus`,
:mod:`wsbus.edge`: ``MemoryClient``, ``MemoryConnection``), the pure core
(:mod:`wsbus.registry`, :mod:`wsbus.router`, :mod:`wsbus.wire`), the hook machinery
(:mod:`wsbus.hooks`) and the control messages (:mod:`wsbus.control`).
"""

from ._version import __version__
from .control import Undeliverable
from .edge import memory_pair
from .envelope import (
    Address,
    ClientAddress,
    ConnId,
    Envelope,
    GatewayAddress,
    Recipients,
    ServiceAddress,
)
from .errors import (
    AliasTaken,
    BusError,
    BusUnavailable,
    ChildFailed,
    ConfigError,
    ConnectionClosed,
    ConnIdTaken,
    ControlError,
    Forbidden,
    HandshakeRefused,
    InvalidFrame,
    InvalidName,
    MessageRejected,
    MissingExtra,
    NoRoute,
    PluginError,
    RateLimited,
    RegistryError,
    RequestTimeout,
    ResumeFailed,
    ServiceFailed,
    TryLater,
    UnknownConnection,
    Unrouted,
    WsbusError,
)
from .gateway import CloseCode, Gateway, GatewayConfig, ResumeSettings, Stats
from .history import HistoryConfig, Position
from .hooks import Drop, HandshakeRequest, Identity, Refusal, Verdict, hookimpl
from .memory import MemoryBus
from .plugins import AllowAnonymous, TokenAuth
from .registry import AliasPolicy, ClientInfo
from .service import Context, Service, ServiceLink, handles
from .wire import Codec, ErrorCode, WireLimits

__all__ = [
    "Address",
    "AliasPolicy",
    "AliasTaken",
    "AllowAnonymous",
    "BusError",
    "BusUnavailable",
    "ChildFailed",
    "ClientAddress",
    "ClientInfo",
    "CloseCode",
    "Codec",
    "ConfigError",
    "ConnId",
    "ConnIdTaken",
    "ConnectionClosed",
    "Context",
    "ControlError",
    "Drop",
    "Envelope",
    "ErrorCode",
    "Forbidden",
    "Gateway",
    "GatewayAddress",
    "GatewayConfig",
    "HandshakeRefused",
    "HandshakeRequest",
    "HistoryConfig",
    "Identity",
    "InvalidFrame",
    "InvalidName",
    "MemoryBus",
    "MessageRejected",
    "MissingExtra",
    "NoRoute",
    "PluginError",
    "Position",
    "RateLimited",
    "Recipients",
    "Refusal",
    "RegistryError",
    "RequestTimeout",
    "ResumeFailed",
    "ResumeSettings",
    "Service",
    "ServiceAddress",
    "ServiceFailed",
    "ServiceLink",
    "Stats",
    "TokenAuth",
    "TryLater",
    "Undeliverable",
    "UnknownConnection",
    "Unrouted",
    "Verdict",
    "WireLimits",
    "WsbusError",
    "__version__",
    "handles",
    "hookimpl",
    "memory_pair",
]
