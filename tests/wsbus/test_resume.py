"""wsbus.resume: tokens and the session store (pure); the gateway's resume flow.

The flow runs a real Gateway on a MemoryBus with in-memory connections (wsbus.edge).
"""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsbus.envelope import ConnId
from wsbus.errors import ConfigError
from wsbus.resume import MemorySessions, ResumeTokens, SessionRecord, new_sid

SECRET = bytes(range(32))
users = st.one_of(st.none(), st.text(string.ascii_letters + "._@-", min_size=0, max_size=20))
sids = st.from_regex(r"[A-Za-z0-9_-]{22,64}", fullmatch=True)


# -- tokens ------------------------------------------------------------------------------


def test_a_token_names_its_session() -> None:
    tokens = ResumeTokens(SECRET)
    sid = new_sid()
    assert len(sid) >= 22
    token = tokens.issue(sid, "bob")
    assert token.startswith("v1.")
    assert tokens.verify(token, "bob") == sid
    assert tokens.verify(token, "eve") is None
    assert tokens.verify(token, None) is None
    assert ResumeTokens(bytes(32)).verify(token, "bob") is None  # another secret


@settings(max_examples=300)
@given(sids, sids, users, users)
def test_a_token_is_never_good_for_another_session_or_user(
    sid: str, other_sid: str, user: str | None, other_user: str | None
) -> None:
    tokens = ResumeTokens(SECRET)
    token = tokens.issue(sid, user)
    assert tokens.verify(token, user) == sid
    if other_user != user:
        assert tokens.verify(token, other_user) is None
    if other_sid != sid:
        # The MAC of one session pasted onto another's id.
        mac = token.rsplit(".", 1)[1]
        assert tokens.verify(f"v1.{other_sid}.{mac}", user) is None


@settings(max_examples=300)
@given(sids, users, st.data())
def test_any_change_to_a_token_breaks_it(sid: str, user: str | None, data: st.DataObject) -> None:
    tokens = ResumeTokens(SECRET)
    token = tokens.issue(sid, user)
    i = data.draw(st.integers(0, len(token) - 1))
    replacement = data.draw(st.characters(codec="utf-8").filter(lambda c: c != token[i]))
    forged = token[:i] + replacement + token[i + 1 :]
    assert tokens.verify(forged, user) is None
    assert tokens.verify(token[:i], user) is None
    assert tokens.verify(token + "A", user) is None


@given(st.one_of(st.text(max_size=300), st.binary(max_size=50), st.integers(), st.none()), users)
def test_verifying_client_input_never_raises(token: object, user: str | None) -> None:
    assert ResumeTokens(SECRET).verify(token, user) is None


def test_a_short_secret_is_refused() -> None:
    with pytest.raises(ConfigError):
        ResumeTokens(b"short")
    assert "secret=***" in repr(ResumeTokens(SECRET))


# -- the session store ---------------------------------------------------------------------


def record(sid: str, user: str | None = None) -> SessionRecord:
    return SessionRecord(
        sid=sid,
        user=user,
        alias=None,
        groups=("room.1",),
        conn_ids=(ConnId("n.1"),),
        closed=0.0,
        code=1006,
    )


def test_a_record_is_taken_once_and_only_in_time() -> None:
    sessions = MemorySessions()
    sessions.save(record("a"), 10.0, now=0.0)
    sessions.save(record("b"), 10.0, now=0.0)
    assert sessions.take("a", now=9.0) == record("a")
    assert sessions.take("a", now=9.0) is None
    assert sessions.take("b", now=10.0) is None  # expired
    assert sessions.take("never", now=0.0) is None


@settings(max_examples=300)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["save", "take"]),
            st.sampled_from("abcdef"),
            st.floats(0.0, 3.0),
            st.sampled_from([1.0, 5.0]),
        ),
        max_size=50,
    ),
    st.integers(1, 4),
)
def test_the_store_keeps_records_for_their_ttl_once_and_bounded(
    steps: list[tuple[str, str, float, float]], bound: int
) -> None:
    """Never a record taken twice, expired or unsaved; never more than the bound kept; and
    while the bound has not made it drop one early, every record saved is there in time."""
    sessions = MemorySessions(max_records=bound)
    model: dict[str, float] = {}  # sid -> expiry
    now = 0.0
    for op, sid, passing, ttl in steps:
        now += passing
        if op == "save":
            sessions.save(record(sid), ttl, now)
            model[sid] = now + ttl
        else:
            got = sessions.take(sid, now)
            expected = sid in model and model.pop(sid) > now
            assert got is None or (expected and got.sid == sid)
            if sessions.dropped == 0:
                assert (got is not None) == expected
        assert len(sessions) <= bound
