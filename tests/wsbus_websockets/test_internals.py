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


def test_rewrite_request_line_passes_get_turns_head_into_get_and_refuses_other_methods() -> None:
    from wsbus_websockets._wsconn import rewrite_request_line

    get = b"GET / HTTP/1.1\r\nHost: x\r\n"
    assert rewrite_request_line(get, get.index(b"\r\n")) == (get, False)
    head = b"HEAD /x HTTP/1.1\r\n"
    assert rewrite_request_line(head, head.index(b"\r\n")) == (b"GET /x HTTP/1.1\r\n", True)
    post = b"POST / HTTP/1.1\r\n"
    assert rewrite_request_line(post, post.index(b"\r\n")) is None
    # Not HTTP: passed on, for websockets to refuse.
    junk = b"\x16\x03\x01 hello\r\n"
    assert rewrite_request_line(junk, junk.index(b"\r\n")) == (junk, False)
