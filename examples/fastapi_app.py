"""wsbus inside a FastAPI application, under uvicorn: one port for the API and the WebSockets.

The gateway's WebSocket endpoint is mounted at ``/ws/`` (clients connect to
``ws://HOST:PORT/ws/``; its health endpoint is ``/ws/healthz``), beside the application's
own routes. FastAPI's lifespan starts the gateway, and closes it (gracefully: every client
gets 1001) when the server stops. The services are the demo's echo and chat, on the
in-memory bus; put your own bus there (docs/asgi.md).

Run it (``pip install 'wsbus[asgi]' fastapi``)::

    uvicorn examples.fastapi_app:app --http wsbus_asgi.server:HttpProtocol \
        --ws wsbus_asgi.server:WebSocketProtocol --ws-max-size 65536

or ``python examples/fastapi_app.py --port 8000``, which passes the same options.
"""

from __future__ import annotations

import argparse

from fastapi import FastAPI

from wsbus import Gateway, MemoryBus
from wsbus_asgi import AsgiConfig
from wsbus_asgi import app as wsbus_app
from wsbus_cli.demo_services import Chat, Echo

gateway = Gateway(MemoryBus([Echo(), Chat()]))
ws = wsbus_app(
    gateway,
    # Browsers on pages of this server are same-origin; list the other origins allowed.
    AsgiConfig(allowed_origins=("https://app.example.com",)),
)

app = FastAPI(lifespan=ws.lifespan)
app.mount("/ws", ws)


@app.get("/")
async def index() -> dict[str, str]:
    """An ordinary route of the application, beside the mounted gateway."""
    return {"websocket": "/ws/", "health": "/ws/healthz"}


def main() -> None:
    """Run the application under uvicorn with the options the edge's limits need."""
    import uvicorn

    from wsbus_asgi import uvicorn_options

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    options = parser.parse_args()
    uvicorn.run(
        app,
        host=options.host,
        port=options.port,
        # The edge's uvicorn settings: its WebSocket protocol, frame cap, keepalive, ...
        **uvicorn_options(gateway, ws.config),
    )


if __name__ == "__main__":
    main()
