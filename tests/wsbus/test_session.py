"""The sans-I/O session, driven with a fabricated clock: no event loop, no sleeps.

A Hypothesis state machine feeds one :class:`~wsbus.session.Session` frames, bus
outcomes, deliveries, writes and the passing of time, and checks after every step the
rate-limit episode (4429 exactly at its limit), the error budget (4400 on the first
client fault past it, never for a server fault), the slow-consumer policy (4507, or
drop and report), the order of what is queued, and the accounting identities of
:class:`wsbus.Stats`.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tests.conftest import assert_balanced
from wsbus import (
    BusUnavailable,
    ClientAddress,
    Codec,
    ConnId,
    Envelope,
    GatewayConfig,
    NoRoute,
    Verdict,
    hookimpl,
)
from wsbus.envelope import IdFactory
from wsbus.hooks import Hooks
from wsbus.registry import ClientRegistry
from wsbus.session import RATE_QUIET, CloseCode, Session
from wsbus.stats import Counters, Stats
from wsbus.wire import ErrorCode, WireLimits

CONN = ConnId("t.1")


class FakeDriver:
    """Records what the session asks of its driver; a writer is 'running' until emptied."""

    def __init__(self) -> None:
        self.writing = False
        self.closes = 0
        self.settles = 0

    def write(self) -> None:
        assert not self.writing, "write() asked for while a writer runs"
        self.writing = True

    def close(self) -> None:
        self.closes += 1

    def settle_soon(self) -> None:
        self.settles += 1


class FakeTransport:
    """A connection's non-waiting write: takes frames while it has room."""

    def __init__(self) -> None:
        self.room = True
        self.taken: list[bytes] = []

    def send_nowait(self, data: bytes) -> bool:
        if self.room:
            self.taken.append(data)
        return self.room


def make_session(
    config: GatewayConfig, *, send_nowait: bool = True, plugins: tuple[object, ...] = ()
) -> tuple[Session, Counters, FakeDriver, FakeTransport]:
    counters = Counters.zero()
    registry = ClientRegistry()
    registry.connect(CONN)
    driver = FakeDriver()
    transport = FakeTransport()
    session = Session(
        CONN,
        Codec.JSON,
        config,
        counters,
        Hooks(plugins, entry_points=False),
        registry.addresses,
        IdFactory("t").next,
        send_nowait=transport.send_nowait if send_nowait else None,
        driver=driver,
    )
    return session, counters, driver, transport


def snapshot(counters: Counters, session: Session) -> Stats:
    return counters.snapshot(connections=1, deliveries_pending=session.pending)


def frame(type: str = "chat.say", id: str | None = None) -> str:
    body: dict[str, Any] = {"type": type, "content": 1}
    if id is not None:
        body["id"] = id
    return msgspec.json.encode(body).decode()


def decoded(data: bytes) -> dict[str, Any]:
    result: dict[str, Any] = msgspec.json.decode(data)
    return result


# -- examples of each decision -------------------------------------------------------


def test_a_valid_frame_is_stamped_and_acked_once_published() -> None:
    session, counters, _, transport = make_session(GatewayConfig(node="t"))
    envelope = session.receive(frame(id="a"), 0.0, 1234.5)
    assert envelope is not None
    assert envelope.id == "a" and envelope.sender.conn_id == CONN  # type: ignore[union-attr]
    assert envelope.created == 1234.5
    assert session.frame_id == "a"
    session.published("a")
    assert decoded(transport.taken[-1])["type"] == "wsbus.ack"
    assert counters.frames_acked == 1


def test_the_21st_client_fault_closes_4400_and_flushes() -> None:
    session, counters, driver, _ = make_session(GatewayConfig(node="t"))
    codes = []
    for _ in range(21):
        session.receive("junk", 0.0, 0.0)
        codes.append(session.close_code)
    assert codes == [None] * 20 + [4400]
    assert (session.flushing, driver.closes) == (True, 1)
    assert counters.rejected_by_code == {"malformed": 21}


def test_faults_older_than_the_window_are_forgotten() -> None:
    session, _, _, _ = make_session(GatewayConfig(node="t", error_budget=2, error_window=10))
    for now in (0.0, 5.0, 10.0, 15.0, 20.0):
        session.receive("junk", now, 0.0)
    assert session.close_code is None


def test_server_faults_never_spend_the_budget() -> None:
    session, counters, _, _ = make_session(GatewayConfig(node="t", rate=1e9, burst=10**6))
    for i in range(200):
        envelope = session.receive(frame(id=str(i)), 0.0, 0.0)
        assert envelope is not None
        exc = NoRoute("x") if i % 2 else BusUnavailable("down")
        session.publish_failed(envelope, str(i), exc, 0.0)
    assert session.close_code is None
    assert counters.rejected_by_code == {"no_route": 100, "unavailable": 100}


def test_rate_limited_for_too_long_closes_4429() -> None:
    """Moved here from tests/wsbus/test_gateway.py (it slept there; time is fabricated here)."""
    config = GatewayConfig(node="t", rate=1, burst=1, rate_limit_close_after=0.2)
    session, counters, _, _ = make_session(config)
    now = 0.0
    while session.close_code is None:
        if session.receive(frame(), now, 0.0) is not None:
            session.published(None)
        now += 0.05
    assert session.close_code == CloseCode.RATE_LIMITED and session.flushing
    # The first refusal at 0.05; the close on the first one past 0.25, never earlier.
    assert now - 0.05 == pytest.approx(0.30)
    assert_balanced(snapshot(counters, session))


def test_a_quiet_second_ends_the_episode() -> None:
    config = GatewayConfig(node="t", rate=1, burst=1, rate_limit_close_after=1.5)
    session, _, _, _ = make_session(config)
    now = 0.0
    for _ in range(20):
        session.receive(frame(), now, 0.0)  # one gets through, one is refused
        session.receive(frame(), now, 0.0)
        now += RATE_QUIET + 0.01
    assert session.close_code is None


class _Deny:
    @hookimpl
    def wsbus_authorize(self, client: ClientAddress, message: Envelope) -> Verdict | None:
        return Verdict(False, "not you", close=message.type == "chat.close")


class _Broken:
    @hookimpl
    def wsbus_transform_inbound(self, client: ClientAddress, message: Envelope) -> Envelope:
        raise RuntimeError("plugin bug")


def test_a_denied_frame_is_forbidden_and_may_close_4403() -> None:
    session, counters, _, transport = make_session(GatewayConfig(node="t"), plugins=(_Deny(),))
    assert session.receive(frame(id="a"), 0.0, 0.0) is None
    assert decoded(transport.taken[-1])["content"]["code"] == "forbidden"
    codes = [session.close_code]
    assert session.receive(frame("chat.close"), 0.0, 0.0) is None
    codes.append(session.close_code)
    assert codes == [None, CloseCode.FORBIDDEN] and session.flushing
    assert counters.rejected_by_code == {"forbidden": 2}


def test_a_failing_plugin_is_the_servers_fault() -> None:
    config = GatewayConfig(node="t", error_budget=0)
    session, counters, _, transport = make_session(config, plugins=(_Broken(),))
    for _ in range(5):
        assert session.receive(frame(id="b"), 0.0, 0.0) is None
    assert decoded(transport.taken[-1])["content"]["code"] == "unavailable"
    assert session.close_code is None  # a budget of 0, and still open: not the client's fault
    assert counters.rejected_by_code == {"unavailable": 5}


def test_a_wrong_frame_type_closes_1003_without_flushing() -> None:
    session, counters, driver, _ = make_session(GatewayConfig(node="t"))
    assert session.receive(b"{}", 0.0, 0.0) is None
    assert (session.close_code, session.flushing, driver.closes) == (1003, False, 1)
    assert counters.frames_lost == 1
    session.receive(frame(), 0.0, 0.0)
    assert counters.frames_lost == 2


def test_shutting_down_answers_every_frame() -> None:
    session, counters, _, transport = make_session(GatewayConfig(node="t"))
    session.shutting_down = True
    assert session.receive(frame(id="z"), 0.0, 0.0) is None
    error = decoded(transport.taken[-1])
    assert error["content"]["code"] == "shutting_down" and error["content"]["ref"] == "z"
    assert counters.rejected_by_code == {"shutting_down": 1}


def test_a_full_queue_closes_4507() -> None:
    session, counters, driver, transport = make_session(
        GatewayConfig(node="t", outbound_queue=2), send_nowait=True
    )
    transport.room = False
    assert session.queue(b"1", True) and session.queue(b"2", True)
    assert driver.writing
    assert not session.queue(b"3", True)
    assert session.close_code == CloseCode.SLOW_CONSUMER and not session.flushing
    assert counters.deliveries_dropped == 1
    session.ended(1006, "")
    session.discard()
    stats = snapshot(counters, session)
    assert stats.dropped_by_close_code == {4507: 3}
    assert_balanced(stats)


def test_a_full_queue_under_drop_refuses_and_stays_open() -> None:
    session, counters, _, transport = make_session(
        GatewayConfig(node="t", outbound_queue=1, slow_consumer="drop")
    )
    transport.room = False
    assert session.queue(b"1", True)
    assert not session.queue(b"2", True)
    assert session.close_code is None and counters.deliveries_refused == 1


def test_the_byte_bound_comes_first_with_large_frames() -> None:
    wire = WireLimits(max_frame_bytes=100)
    session, _, _, transport = make_session(GatewayConfig(node="t", wire=wire, outbound_bytes=150))
    transport.room = False
    assert session.queue(b"x" * 100, True)
    assert not session.queue(b"y" * 51, True)
    assert session.close_code == 4507


def test_taken_frames_wait_for_the_socket_when_the_adapter_can_tell() -> None:
    counters = Counters.zero()
    registry = ClientRegistry()
    registry.connect(CONN)
    driver = FakeDriver()
    unsent = [0]
    session = Session(
        CONN,
        Codec.JSON,
        GatewayConfig(node="t"),
        counters,
        Hooks(entry_points=False),
        registry.addresses,
        IdFactory("t").next,
        send_nowait=lambda data: True,
        unsent=lambda: unsent[0],
        driver=driver,
    )
    unsent[0] = 1
    session.queue(b"a", True)
    assert (session.pending, driver.settles) == (1, 1)
    unsent[0] = 2
    session.queue(b"b", True)
    unsent[0] = 0
    session.settle()
    assert (session.pending, counters.deliveries_written, session.unconfirmed) == (0, 2, None)


# -- the state machine ---------------------------------------------------------------

CLOSE_AFTER = 2.0
WINDOW = 5.0
BUDGET = 4


# Preconditions are named functions, not lambdas: hypothesis 6.100 (the declared minimum)
# describes a lambda precondition by parsing its source on every check (seconds an example).


def _not_started(self: SessionMachine) -> bool:
    return self.session is None


def _started(self: SessionMachine) -> bool:
    return self.session is not None


def _writing(self: SessionMachine) -> bool:
    return self.session is not None and self.driver.writing


def _open(self: SessionMachine) -> bool:
    return self.session is not None and not self.ended


class SessionMachine(RuleBasedStateMachine):
    """One session, its fake transport and writer, and a model of what it must decide."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.session: Session | None = None

    @rule(
        drop=st.booleans(),
        queue=st.integers(1, 6),
        nowait=st.booleans(),
    )
    @precondition(_not_started)
    def start(self, drop: bool, queue: int, nowait: bool) -> None:
        self.config = GatewayConfig(
            node="t",
            rate=2.0,
            burst=3,
            rate_limit_close_after=CLOSE_AFTER,
            error_budget=BUDGET,
            error_window=WINDOW,
            outbound_queue=queue,
            outbound_bytes=512,
            wire=WireLimits(max_frame_bytes=256),
            slow_consumer="drop" if drop else "close",
        )
        self.session, self.counters, self.driver, self.transport = make_session(
            self.config, send_nowait=nowait
        )
        self.accepted: list[bytes] = []  # deliveries the session took, in order
        self.faults: deque[float] = deque()  # model of the error budget's window
        self.episode: tuple[float, float] | None = None  # (since, last) of rate refusals
        self.serial = 0
        self.ended = False

    # -- time and frames ---------------------------------------------------------------

    @rule(dt=st.sampled_from([0.0, 0.01, 0.3, 0.6, 1.2, 3.0, 6.0]))
    def advance(self, dt: float) -> None:
        self.now += dt

    def _receive(self, data: str | bytes) -> Any:
        assert self.session is not None
        before = dict(self.counters.rejected_by_code)
        was_open = self.session.close_code is None
        envelope = self.session.receive(data, self.now, 1.0)
        if was_open:
            self._check_rate_episode(before)
            self._check_budget(before)
        return envelope

    def _check_rate_episode(self, before: dict[str, int]) -> None:
        assert self.session is not None
        refused = self.counters.rejected_by_code.get("rate_limited", 0) > before.get(
            "rate_limited", 0
        )
        closed_4429 = self.session.close_code == CloseCode.RATE_LIMITED
        if not (refused or closed_4429):
            return
        now = self.now
        if self.episode is None or now - self.episode[1] > RATE_QUIET:
            self.episode = (now, now)
        self.episode = (self.episode[0], now)
        # Closed on the first refusal past the limit, never earlier.
        assert closed_4429 == (now - self.episode[0] > CLOSE_AFTER)

    def _check_budget(self, before: dict[str, int]) -> None:
        assert self.session is not None
        faults = sum(
            n - before.get(code, 0)
            for code, n in self.counters.rejected_by_code.items()
            if ErrorCode(code).client_fault
        )
        for _ in range(faults):
            while self.faults and self.faults[0] <= self.now - WINDOW:
                self.faults.popleft()
            self.faults.append(self.now)
        # Closed on the first client fault past the budget in the window, never earlier.
        over = faults > 0 and len(self.faults) > BUDGET
        if self.session.close_code != CloseCode.SLOW_CONSUMER:  # the answer found it full
            assert (self.session.close_code == CloseCode.ERROR_BUDGET) == over

    @precondition(_started)
    @rule(with_id=st.booleans(), outcome=st.sampled_from(["ok", "no_route", "down", "one_down"]))
    def good_frame(self, with_id: bool, outcome: str) -> None:
        assert self.session is not None
        self.serial += 1
        frame_id = f"f{self.serial}" if with_id else None
        envelope = self._receive(frame(id=frame_id))
        if envelope is None:
            return
        assert envelope.sender.conn_id == CONN
        assert self.session.frame_id == frame_id
        if outcome == "ok":
            self.session.published(self.session.frame_id)
            return
        exc = {
            "no_route": NoRoute("chat.say"),
            "down": BusUnavailable("down"),
            "one_down": BusUnavailable("one", whole_bus=False),
        }[outcome]
        whole = self.session.publish_failed(envelope, self.session.frame_id, exc, self.now)
        assert whole == (outcome == "down")
        # A server's fault (or a message nothing handles) never closes the connection;
        # its answer may find the outbox full (4507), as any frame may.
        assert self.session.close_code in (None, CloseCode.SLOW_CONSUMER)

    @precondition(_started)
    @rule(kind=st.sampled_from(["junk", '{"type": "wsbus.x"}', '{"type": "a", "x": 1}']))
    def bad_frame(self, kind: str) -> None:
        self._receive(kind)

    @precondition(_started)
    @rule()
    def wrong_frame_type(self) -> None:
        assert self.session is not None
        was_open = self.session.close_code is None
        self._receive(b'{"type": "a"}')
        if was_open:
            assert self.session.close_code == CloseCode.UNSUPPORTED_DATA

    # -- deliveries and writing --------------------------------------------------------

    @precondition(_started)
    @rule(size=st.integers(10, 200))
    def deliver(self, size: int) -> None:
        session = self.session
        assert session is not None
        self.serial += 1
        data = f"D{self.serial}:".encode().ljust(size, b".")
        outbox = session.outbox or ()
        full = len(outbox) >= self.config.outbound_queue or (
            session.outbox_bytes + len(data) > self.config.outbound_bytes
        )
        was_open = session.close_code is None
        refused_before = self.counters.deliveries_refused
        taken = session.queue(data, True)
        if taken:
            self.accepted.append(data)
        if not was_open:
            assert not taken
        elif full and self.config.slow_consumer == "drop":
            assert not taken and session.close_code is None
            assert self.counters.deliveries_refused == refused_before + 1
            self.counters.reports += 1  # what Outbound does with a refusal: report it
        elif full:
            assert not taken and session.close_code == CloseCode.SLOW_CONSUMER
        else:
            assert taken

    @precondition(_started)
    @rule(room=st.booleans())
    def transport_room(self, room: bool) -> None:
        self.transport.room = room

    @precondition(_writing)
    @rule()
    def write_one(self) -> None:
        session = self.session
        assert session is not None
        if session.close_code is not None and not session.flushing:
            self.driver.writing = False  # the writer stops: the rest goes with the close
            return
        assert session.outbox
        # The writer's frames go down the same stream as those taken at once.
        self.transport.taken.append(session.outbox[0][0])
        session.written()
        if not session.outbox:
            self.driver.writing = False

    @precondition(_open)
    @rule()
    def connection_ends(self) -> None:
        session = self.session
        assert session is not None
        session.ended(1006, "gone")
        self.driver.writing = False
        session.discard()
        self.ended = True
        assert session.pending == 0 and session.outbox is None

    # -- after every step --------------------------------------------------------------

    @invariant()
    def counters_balance(self) -> None:
        if self.session is not None:
            assert_balanced(snapshot(self.counters, self.session))

    @invariant()
    def deliveries_keep_their_order(self) -> None:
        session = self.session
        if session is None or self.ended:
            return
        # Whatever path each took (taken at once, or queued and written later), the
        # client sees the deliveries in the order the session took them.
        seen = [*self.transport.taken, *(d for d, _ in session.outbox or ())]
        assert [d for d in seen if d.startswith(b"D")] == self.accepted

    @invariant()
    def a_waiting_outbox_has_a_writer(self) -> None:
        session = self.session
        if session is None or self.ended or session.close_code is not None:
            return
        if session.outbox:
            assert self.driver.writing

    @invariant()
    def the_driver_hears_of_a_close_once(self) -> None:
        session = self.session
        if session is None or self.ended:
            return
        assert self.driver.closes == (session.close_code is not None)


SessionMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_session_machine = SessionMachine.TestCase
