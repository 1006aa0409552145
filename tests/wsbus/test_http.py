"""wsbus.http: the plain-HTTP decisions every edge shares (the edges run them on real
sockets in tests/wsbus_websockets/test_server.py and tests/wsbus_picows)."""

from __future__ import annotations

import http

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsbus.http import HttpFront, cookie_value, split_target, static_parts


class _Settings(msgspec.Struct, frozen=True, kw_only=True):
    allowed_origins: tuple[str, ...] = ()
    allow_same_origin: bool = True
    allow_missing_origin: bool = True
    max_subprotocols: int = 16
    max_subprotocol_bytes: int = 4096
    health_path: str = "/healthz"
    static_dir: str | None = None
    token_query: str = "token"
    token_cookie: str = "wsbus_token"


@pytest.mark.parametrize(
    ("path", "parts"),
    [
        ("/", ["index.html"]),
        ("", ["index.html"]),
        ("/a/b.js", ["a", "b.js"]),
        ("//a//b.js", ["a", "b.js"]),
        ("/my%20page.html", ["my page.html"]),
        ("/caf%C3%A9", ["café"]),
        ("/.well-known/x", [".well-known", "x"]),
        ("/..", None),
        ("/a/.", None),
        ("/%2e%2e/x", None),
        ("/.%2E/x", None),
        ("/a%2fb", None),
        ("/a%5cb", None),
        ("/a\\b", None),
        ("/a%00", None),
        ("/a%0a", None),
        ("/a%7f", None),
        ("/%ff", None),
        ("/café", None),
        ("/" + "a" * 256, None),
    ],
)
def test_static_parts(path: str, parts: list[str] | None) -> None:
    assert static_parts(path) == parts


@given(st.text())
def test_static_parts_are_plain_names_or_refused(path: str) -> None:
    parts = static_parts(path)
    if parts is not None:
        for name in parts:
            assert name not in ("", ".", "..")
            assert not {"/", "\\", "\x00"} & set(name)


@pytest.mark.parametrize(
    ("target", "split"),
    [
        ("/a?b=1", ("/a", "b=1")),
        ("//evil.example/x?y", ("//evil.example/x", "y")),
        ("/a#f", ("/a", "")),
        ("http://host/p?q=1", ("/p", "q=1")),
    ],
)
def test_split_target(target: str, split: tuple[str, str]) -> None:
    assert split_target(target) == split


def test_plain_get_is_health_static_or_426() -> None:
    front = HttpFront(_Settings())
    reply = front.get("/healthz?x", closing=False, connections=3)
    assert reply.status == http.HTTPStatus.OK
    assert msgspec.json.decode(reply.body) == {"status": "ok", "connections": 3}
    assert front.get("/healthz", closing=True, connections=0).status == 503
    assert front.get("/", closing=False, connections=0).status == 426


def test_origins_on_loopback_and_elsewhere() -> None:
    front = HttpFront(_Settings(allowed_origins=("https://app.example",)))
    front.listening(8000, secure=False, loopback=True)
    host = "127.0.0.1:8000"
    assert front.origin_allowed([], host)
    assert front.origin_allowed(["https://app.example"], host)
    assert front.origin_allowed([f"http://{host}"], host)
    assert not front.origin_allowed([f"https://{host}"], host)
    assert not front.origin_allowed(["http://evil.example:8000"], "evil.example:8000")
    assert not front.origin_allowed(["null"], host)
    assert not front.origin_allowed([f"http://{host}", f"http://{host}"], host)
    front.listening(8000, secure=True, loopback=False)
    assert front.origin_allowed(["https://gw.example:8000"], "gw.example:8000")


def test_the_token_comes_from_header_subprotocol_query_cookie_in_that_order() -> None:
    front = HttpFront(_Settings())
    request = front.handshake_request(
        "/chat%20room?token=q&x=1",
        [
            ("Authorization", "Bearer h"),
            ("Sec-WebSocket-Protocol", "wsbus.v1.json, wsbus.token.s"),
            ("Cookie", "wsbus_token=c"),
        ],
        "127.0.0.1:1",
    )
    assert request.path == "/chat room" and request.query == {"token": "q", "x": "1"}
    assert request.subprotocols == ("wsbus.v1.json", "wsbus.token.s")
    assert request.token == "h"
    headers = {"cookie": "wsbus_token=c"}
    assert front.token(headers, ["wsbus.token.s"], {"token": "q"}) == "s"
    assert front.token(headers, [], {"token": "q"}) == "q"
    assert front.token(headers, [], {}) == "c"
    assert front.token({}, [], {}) is None
    assert cookie_value('a=1; wsbus_token="v"', "wsbus_token") == "v"
