"""Loaded by every process of a traced Pyro run (``python -m bench.trace_pyro``).

It wraps the points an envelope passes on its way from a service to a client and writes,
for each ``bench.stamp`` message, the monotonic time it passed each point (one clock for
every process on the machine). Nothing here is part of wsbus: it patches internals, for
measurement only.
"""

from __future__ import annotations

import base64
import os
import threading
import time
from typing import Any

_DIR = os.environ.get("WSBUS_TRACE_DIR")
_out: Any = None
_local = threading.local()


def _log(label: str, key: float, at: float | None = None) -> None:
    global _out
    if _out is None:
        _out = open(f"{_DIR}/{os.getpid()}.log", "a", buffering=1)  # noqa: SIM115
    _out.write(f"{label} {time.monotonic() if at is None else at:.7f} {key!r}\n")


def _key(envelopes: Any) -> float | None:
    for envelope in envelopes:
        content = envelope.content
        if envelope.type == "bench.stamp" and isinstance(content, dict) and "t" in content:
            return float(content["t"])
    return None


def _install() -> None:
    from Pyro5 import protocol

    from wsbus_pyro import bus, messagebus, transport

    receive = protocol.recv_stub

    def recv_stub(*args: Any, **kwargs: Any) -> Any:
        message = receive(*args, **kwargs)
        _local.received = time.monotonic()
        return message

    protocol.recv_stub = recv_stub

    put, send = transport.Forwarder.put, transport.Forwarder._send

    def traced_put(self: Any, envelope: Any, callback: Any = None) -> None:
        key = _key([envelope])
        if key is not None:
            # A service's forwarder sends to the bus or straight to a gateway.
            direct = isinstance(self, transport.DirectForwarder)
            where = "service" if direct else f"to {self.endpoint}"
            _log(f"{where}: queued for the forwarder thread", key)
        put(self, envelope, callback)

    def traced_send(self: Any, batch: Any) -> None:
        key = _key([envelope for envelope, _ in batch])
        if key is not None:
            _log(f"to {self.endpoint}: the forwarder thread calls Pyro", key)
        send(self, batch)

    call_direct = transport.DirectForwarder._call_direct

    def traced_call_direct(self: Any, node: str, blob: bytes, count: int) -> Any:
        key = _key(transport.decode_batch(blob))
        if key is not None:
            _log(f"to gateway {node} directly: the forwarder thread calls Pyro", key)
        return call_direct(self, node, blob, count)

    transport.DirectForwarder._call_direct = traced_call_direct  # type: ignore[method-assign]
    transport.Forwarder.put = traced_put  # type: ignore[method-assign]
    transport.Forwarder._send = traced_send  # type: ignore[method-assign]

    def arrived(label: str, blob: Any) -> None:
        # A service's direct batch comes as base64 text, the bus's as bytes.
        key = _key(
            transport.decode_batch(base64.b64decode(blob) if isinstance(blob, str) else blob)
        )
        if key is not None:
            _log(f"{label}: Pyro message received", key, getattr(_local, "received", None))
            _log(f"{label}: method called", key)

    route = messagebus.MessageBus.route

    def traced_route(self: Any, blob: Any, *args: Any) -> Any:
        arrived("bus", blob)
        return route(self, blob, *args)

    deliver, deliver_all = bus.GatewayEndpoint.deliver, bus.GatewayEndpoint._deliver_all
    direct, deliver_direct = bus.GatewayEndpoint.deliver_direct, bus.GatewayEndpoint._deliver_direct

    def traced_deliver(self: Any, blob: Any) -> None:
        arrived("gateway", blob)
        deliver(self, blob)

    def traced_deliver_all(self: Any, envelopes: Any) -> None:
        key = _key(envelopes)
        if key is not None:
            _log("gateway: on the event loop", key)
        deliver_all(self, envelopes)
        if key is not None:
            _log("gateway: written to the client's socket", key)

    def traced_direct(self: Any, blob: Any) -> Any:
        arrived("gateway (direct)", blob)
        return direct(self, blob)

    def traced_deliver_direct(self: Any, envelopes: Any, size: int) -> None:
        key = _key(envelopes)
        if key is not None:
            _log("gateway (direct): on the event loop", key)
        deliver_direct(self, envelopes, size)
        if key is not None:
            _log("gateway (direct): written to the client's socket", key)

    traced_direct._pyroExposed = True  # type: ignore[attr-defined]
    bus.GatewayEndpoint.deliver_direct = traced_direct  # type: ignore[method-assign]
    bus.GatewayEndpoint._deliver_direct = traced_deliver_direct  # type: ignore[method-assign]
    traced_route._pyroExposed = True  # type: ignore[attr-defined]
    traced_deliver._pyroExposed = True  # type: ignore[attr-defined]
    messagebus.MessageBus.route = traced_route  # type: ignore[method-assign,assignment]
    bus.GatewayEndpoint.deliver = traced_deliver  # type: ignore[method-assign]
    bus.GatewayEndpoint._deliver_all = traced_deliver_all  # type: ignore[method-assign]


if _DIR:
    _install()
