"""What the edge suites share: the edge under test, its settings, the services they talk to.

An edge suite (:class:`wsbus_testing.edge_attacks.EdgeAttacks`,
:class:`wsbus_testing.edge_conformance.EdgeConformance`) runs against a real server on
127.0.0.1 that your edge puts a gateway on. Subclass the suite in a test module and provide
``wsbus_serve_edge``: an async factory that takes a started gateway and the suite's
settings (keywords, named as ``wsbus_websockets.EdgeConfig``'s fields) and returns your
running edge on an ephemeral port::

    class TestMyEdgeAttacks(EdgeAttacks):
        @pytest.fixture
        def wsbus_serve_edge(self):
            async def serve(gateway, **settings):
                return await my_edge.serve(gateway, "127.0.0.1", 0, config=MyConfig(**settings))

            return serve

The settings a suite passes are among ``allowed_origins``, ``static_dir``,
``ping_interval``, ``ping_timeout``, ``close_timeout`` and ``open_timeout``; an edge that
has a setting under another name translates it. The suites talk to the edge with the
``websockets`` client and raw sockets, so they need the ``websockets`` extra.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import pytest
import pytest_asyncio

from wsbus import Gateway, Service

__all__ = ["EdgeSuite", "RunningEdge", "ServeEdge"]


class RunningEdge(Protocol):
    """An edge listening on a port, as the suites use it."""

    @property
    def url(self) -> str:
        """``ws://host:port/``."""
        ...

    @property
    def port(self) -> int:
        """The port it listens on."""
        ...

    async def close(self) -> None:
        """Close its listening socket and its connections (1001); never the gateway."""
        ...


ServeEdge = Callable[..., Awaitable[Any]]
"""``await serve(gateway, **settings)``: the edge on ``gateway``, listening on 127.0.0.1."""


class EdgeSuite:
    """The fixtures every edge suite uses. Subclass a suite, not this.

    A subclass provides ``wsbus_serve_edge``. The suite's own ``wsbus_server`` (the edge on
    the plugin's ``wsbus_gateway``, with ``wsbus_edge_settings``) replaces the plugin's
    websockets one for its tests, and so does every fixture built on it
    (``wsbus_ws_connect``). ``wsbus_services`` are the suite's: an echo service
    (``echo`` -> ``echo.reply``) and :class:`~wsbus_testing.services.Flood`.
    """

    @pytest.fixture
    def wsbus_serve_edge(self) -> ServeEdge:
        """The edge under test: provide it in your subclass (see the module's docstring)."""
        pytest.fail("an edge suite needs the wsbus_serve_edge fixture: see wsbus_testing.edges")

    @pytest.fixture
    def wsbus_edge_settings(self) -> dict[str, Any]:
        """The settings a test gives ``wsbus_serve_edge``: none (the edge's defaults)."""
        return {}

    @pytest.fixture
    def wsbus_services(self) -> list[Service]:
        """The services the suites talk to: echo and flood."""
        from wsbus_cli.demo_services import Echo

        from .services import Flood

        return [Echo(), Flood()]

    @pytest_asyncio.fixture
    async def wsbus_server(
        self,
        wsbus_gateway: Gateway,
        wsbus_serve_edge: ServeEdge,
        wsbus_edge_settings: dict[str, Any],
    ) -> AsyncIterator[RunningEdge]:
        """``wsbus_gateway`` on the edge under test, on 127.0.0.1 (an ephemeral port).

        Closed as ``wsbus serve`` closes: the gateway first (it drains and closes every
        connection with 1001), then the edge.
        """
        server: RunningEdge = await wsbus_serve_edge(wsbus_gateway, **wsbus_edge_settings)
        try:
            yield server
        finally:
            await wsbus_gateway.close()
            await server.close()
