"""A FastAPI application with wsbus mounted at /ws/, serving the demo page there too.

For the browser test (test_fastapi.py): ``python -m tests.wsbus_asgi.fastapi_chat PORT``
runs it under uvicorn on 127.0.0.1 with the edge's uvicorn options, the demo's services and
settings (history, resume, presence) on the in-memory bus.
"""

from __future__ import annotations

import contextlib
import sys

import uvicorn
from fastapi import FastAPI

from wsbus import Gateway, MemoryBus
from wsbus_asgi import AsgiConfig, uvicorn_options
from wsbus_asgi import app as wsbus_app
from wsbus_cli.demo import demo_config, static_dir
from wsbus_cli.demo_services import Chat, Echo


def main(port: int) -> None:
    """Serve the application on 127.0.0.1:``port`` until SIGINT or SIGTERM."""
    with contextlib.ExitStack() as stack:
        page = stack.enter_context(static_dir())
        gateway = Gateway(MemoryBus([Echo(), Chat()]), config=demo_config())
        ws = wsbus_app(gateway, AsgiConfig(static_dir=str(page)))
        app = FastAPI(lifespan=ws.lifespan)
        app.mount("/ws", ws)

        @app.get("/")
        async def index() -> dict[str, str]:
            return {"page": "/ws/"}

        uvicorn.run(app, host="127.0.0.1", port=port, **uvicorn_options(gateway, ws.config))


if __name__ == "__main__":
    main(int(sys.argv[1]))
