"""The websockets edge's second-review tests (tests/wsbus_websockets/test_review.py) that
apply to the picows edge, against it: the settling of deliveries that waited in the
transport, and the accounting after a TCP reset. (The others are about how websockets
parses headers and feeds its parser: this edge's own tests cover those in
test_hardening.py.)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests.wsbus_websockets.test_review import (
    test_deliveries_that_waited_in_the_transport_are_counted_written_once_sent,
    test_frames_in_the_transport_at_a_reset_are_counted_dropped_not_written,
)
from wsbus_picows.server import _Connection

__all__ = [
    "test_deliveries_that_waited_in_the_transport_are_counted_written_once_sent",
    "test_frames_in_the_transport_at_a_reset_are_counted_dropped_not_written",
]


@pytest.fixture(autouse=True)
def _socket_as_the_websockets_edge_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # Those tests reach the socket through the websockets edge's ``conn._ws.transport``.
    monkeypatch.setattr(
        _Connection,
        "_ws",
        property(lambda self: SimpleNamespace(transport=self._raw)),
        raising=False,
    )
