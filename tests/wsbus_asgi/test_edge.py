"""The ASGI edge against a real uvicorn server on 127.0.0.1: the edge conformance suite
(wsbus_testing.edge_conformance), as the websockets and picows edges run it.

What does not apply: an ASGI application cannot tell which frames it sent have reached the
socket (ASGI's ``send`` returns once the server took the frame), so its deliveries are
counted written when uvicorn takes them, as the in-memory connection's are (docs/asgi.md).
The suite's tests of frames that waited in the transport are skipped (``edge_socket`` is
not provided), and so is the count of what a slow consumer's aborted connection had
written: what uvicorn's write buffer held at the abort was counted written.
"""

from __future__ import annotations

import pytest

from tests.wsbus_asgi.conftest import serve_asgi
from wsbus_testing.edge_conformance import EdgeConformance
from wsbus_testing.edges import ServeEdge

_NOT_AT_THE_ASGI_LAYER = {
    "test_a_slow_consumer_close_counts_written_only_what_reached_the_socket": (
        "ASGI does not say which frames reached the socket: what uvicorn buffered before "
        "the abort was counted written"
    ),
}


class TestAsgiEdge(EdgeConformance):
    @pytest.fixture
    def wsbus_serve_edge(self) -> ServeEdge:
        return serve_asgi

    @pytest.fixture(autouse=True)
    def _cases_below_the_asgi_layer(self, request: pytest.FixtureRequest) -> None:
        why = _NOT_AT_THE_ASGI_LAYER.get(request.node.originalname)
        if why is not None:
            pytest.skip(why)
