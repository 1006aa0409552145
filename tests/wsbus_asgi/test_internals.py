"""What ``wsbus_asgi.server.WebSocketProtocol`` reads of uvicorn's internals is there.

The protocol subclasses uvicorn's ``websockets-sansio`` protocol and reads a few of its
attributes (README, supported versions): a uvicorn release that moves one fails here, by
name, instead of degrading a close or a keepalive. What the subclass does with them is
tested against a real server by the edge suites (test_edge.py: the 1011 keepalive close,
the slow reader's 4507; test_attacks.py: no error logged for a refused upgrade;
test_server.py: close_timeout, the ping flood, the refused and oversized heads, the head
deadline). ``wsbus_asgi.server.HttpProtocol`` subclasses uvicorn's h11 protocol: what it
reads is checked here too.
"""

from __future__ import annotations

import asyncio
import inspect

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol, RequestResponseCycle
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState

from wsbus_asgi import app
from wsbus_asgi.server import HttpProtocol, WebSocketProtocol

ATTRIBUTES = (
    "client",
    "close_sent",
    "close_timer",
    "close_timeout",
    "conn",
    "handshake_complete",
    "handshake_initiated",
    "loop",
    "queue",
    "read_paused",
    "transport",
    "writable",
)
"""The attributes the subclass reads or sets on uvicorn's protocol."""

METHODS = (
    "handle_connect",
    "send",
    "keepalive_timeout",
    "data_received",
    "pause_writing",
    "resume_writing",
    "receive",
)
"""The methods it overrides, calling uvicorn's."""


async def test_uvicorn_internals_we_rely_on_are_there() -> None:
    from wsbus import Gateway, MemoryBus

    config = uvicorn.Config(app(Gateway(MemoryBus([]), entry_points=False)), log_config=None)
    config.load()
    protocol = WebSocketsSansIOProtocol(
        config=config, server_state=ServerState(), app_state={}, _loop=asyncio.get_running_loop()
    )
    missing = [name for name in ATTRIBUTES if not hasattr(protocol, name)]
    # uvicorn's __init__ sets close_timeout on the instance: ours must set the edge's after.
    edge = type("Edge", (WebSocketProtocol,), {"close_timeout": 0.25})(
        config=config, server_state=ServerState(), app_state={}, _loop=asyncio.get_running_loop()
    )
    assert edge.close_timeout == 0.25, "uvicorn's __init__ hides the edge's close_timeout"
    assert missing == [], f"uvicorn's WebSocketsSansIOProtocol lost {missing}"
    for name in METHODS:
        ours = getattr(WebSocketProtocol, name)
        theirs = getattr(WebSocketsSansIOProtocol, name)
        assert list(inspect.signature(ours).parameters) == list(
            inspect.signature(theirs).parameters
        ), name
    # handle_connect keeps the upgrade's response and the scope it builds (with the
    # extensions the abort goes into) where the subclass reads them.
    source = inspect.getsource(WebSocketsSansIOProtocol.handle_connect)
    for name in ("self.response =", "self.scope", '"extensions"'):
        assert name in source, f"uvicorn's handle_connect no longer sets {name}"
    # receive is replaced (not extended): it must still be uvicorn's queue and read_paused.
    source = inspect.getsource(WebSocketsSansIOProtocol.receive)
    for name in ("self.queue.get()", "self.read_paused = False", "resume_reading()"):
        assert name in source, f"uvicorn's receive no longer does {name}"
    # websockets' sansio protocol keeps a refused head's error and queues the answer.
    assert hasattr(protocol.conn, "handshake_exc"), "websockets' ServerProtocol lost handshake_exc"
    assert callable(protocol.conn.data_to_send)


HTTP_METHODS = ("connection_made", "connection_lost", "data_received", "on_response_complete")
"""The methods ``wsbus_asgi.server.HttpProtocol`` overrides on uvicorn's h11 protocol."""


async def test_uvicorn_h11_internals_we_rely_on_are_there() -> None:
    from wsbus import Gateway, MemoryBus

    config = uvicorn.Config(app(Gateway(MemoryBus([]), entry_points=False)), log_config=None)
    config.load()
    protocol = H11Protocol(
        config=config, server_state=ServerState(), app_state={}, _loop=asyncio.get_running_loop()
    )
    missing = [
        name for name in ("client", "cycle", "loop", "transport") if not hasattr(protocol, name)
    ]
    assert missing == [], f"uvicorn's H11Protocol lost {missing}"
    for name in HTTP_METHODS:
        ours = getattr(HttpProtocol, name)
        theirs = getattr(H11Protocol, name)
        assert list(inspect.signature(ours).parameters) == list(
            inspect.signature(theirs).parameters
        ), name
    # uvicorn calls on_response_complete when a response is done, and the head of the next
    # request on a kept-alive connection is read after it.
    assert "on_response_complete" in inspect.getsource(H11Protocol)
    # A request being answered is a cycle whose response is not complete.
    source = inspect.getsource(RequestResponseCycle.__init__)
    assert "self.response_complete = False" in source, "uvicorn's cycle lost response_complete"
