"""The websockets internals the edge relies on: one test that fails loudly when a
websockets release moves them (they are all in wsbus_websockets/_wsconn.py)."""

from __future__ import annotations

from importlib.metadata import version

from wsbus_websockets._wsconn import check_internals


def test_websockets_internals_we_rely_on_are_there() -> None:
    problems = check_internals()
    assert not problems, (
        f"websockets {version('websockets')} moved internals the wsbus edge relies on "
        "(wsbus_websockets/_wsconn.py); the edge would not bound or count what it must. "
        "Adapt _wsconn.py or pin websockets to a supported version (docs/websockets.md): "
        + "; ".join(problems)
    )
