"""The Python client (wsbus_websockets/client.py) against servers that misbehave.

The client's behaviour with the real edge is in tests/wsbus_websockets/test_server.py.
"""

from __future__ import annotations

import asyncio

import pytest
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.typing import Subprotocol

from wsbus.errors import RequestTimeout, WsbusError
from wsbus.wire import Codec
from wsbus_websockets import connect


async def test_a_server_that_never_welcomes_times_out_the_open_and_is_closed() -> None:
    # The upgrade succeeds with the wsbus subprotocol, then nothing: only open_timeout
    # ends the wait (a gateway would end it with its auth_timeout; this server never does).
    closed: asyncio.Future[tuple[int | None, str | None]] = (
        asyncio.get_running_loop().create_future()
    )

    async def silent(ws: ServerConnection) -> None:
        await ws.wait_closed()
        if not closed.done():
            closed.set_result((ws.close_code, ws.close_reason))

    async with ws_serve(
        silent, "127.0.0.1", 0, subprotocols=[Subprotocol(Codec.JSON.value)]
    ) as server:
        port = server.sockets[0].getsockname()[1]
        async with asyncio.timeout(20):
            with pytest.raises(RequestTimeout) as raised:
                await connect(f"ws://127.0.0.1:{port}/", reconnect=False, open_timeout=0.2)
            assert isinstance(raised.value, TimeoutError) and isinstance(raised.value, WsbusError)
            assert "wsbus.welcome" in str(raised.value)
            # The client closed the socket itself, with a reason that says why.
            assert await closed == (1000, "no wsbus.welcome in time")
