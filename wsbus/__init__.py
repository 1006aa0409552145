"""wsbus: a WebSocket gateway between clients and internal services over a message bus.

The core is transport-neutral: plug in an edge adapter (``wsbus_websockets``) for the
clients and a bus (the in-memory :class:`MemoryBus`, or ``wsbus_pyro``) for the services.
"""

from ._version import __version__
from .bus import Bus, BusSink
from .control import Result, Undeliverable
from .edge import ClientConnection, MemoryClient, MemoryConnection, memory_pair
from .envelope import (
    Address,
    ClientAddress,
    ConnId,
    Envelope,
    EnvelopeId,
    GatewayAddress,
    NodeId,
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
    ControlError,
    HandshakeRefused,
    InvalidName,
    MissingExtra,
    NoRoute,
    PluginError,
    ProtocolError,
    RegistryError,
    RequestTimeout,
    ServerError,
    UnknownConnection,
    WsbusError,
)
from .gateway import CloseCode, Gateway, GatewayConfig, Stats
from .hooks import (
    Drop,
    HandshakeRequest,
    Hooks,
    Identity,
    Refusal,
    Verdict,
    hookimpl,
    hookspec,
)
from .memory import MemoryBus
from .plugins import AllowAnonymous, TokenAuth
from .registry import AliasPolicy, ClientInfo, ClientRegistry
from .router import Resolution, Router
from .service import Context, Service, ServiceLink, handles
from .wire import ClientFrame, Codec, ErrorCode, Rejection, WireLimits, decode_client_frame

__all__ = [
    "Address",
    "AliasPolicy",
    "AliasTaken",
    "AllowAnonymous",
    "Bus",
    "BusError",
    "BusSink",
    "BusUnavailable",
    "ChildFailed",
    "ClientAddress",
    "ClientConnection",
    "ClientFrame",
    "ClientInfo",
    "ClientRegistry",
    "CloseCode",
    "Codec",
    "ConfigError",
    "ConnId",
    "ConnectionClosed",
    "Context",
    "ControlError",
    "Drop",
    "Envelope",
    "EnvelopeId",
    "ErrorCode",
    "Gateway",
    "GatewayAddress",
    "GatewayConfig",
    "HandshakeRefused",
    "HandshakeRequest",
    "Hooks",
    "Identity",
    "InvalidName",
    "MemoryBus",
    "MemoryClient",
    "MemoryConnection",
    "MissingExtra",
    "NoRoute",
    "NodeId",
    "PluginError",
    "ProtocolError",
    "Recipients",
    "Refusal",
    "RegistryError",
    "Rejection",
    "RequestTimeout",
    "Resolution",
    "Result",
    "Router",
    "ServerError",
    "Service",
    "ServiceAddress",
    "ServiceLink",
    "Stats",
    "TokenAuth",
    "Undeliverable",
    "UnknownConnection",
    "Verdict",
    "WireLimits",
    "WsbusError",
    "__version__",
    "decode_client_frame",
    "handles",
    "hookimpl",
    "hookspec",
    "memory_pair",
]
