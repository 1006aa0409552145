"""Outbound, sans-I/O: what an envelope from the bus becomes, with no event loop."""

from __future__ import annotations

from typing import Any

import msgspec

from tests.conftest import assert_balanced
from tests.wsbus.test_session import FakeDriver
from wsbus import Codec, ConnId, Envelope, GatewayConfig, Recipients, ServiceAddress, control
from wsbus.bus import SHARED_HEADER
from wsbus.envelope import EnvelopeId, IdFactory, NodeId
from wsbus.hooks import Hooks
from wsbus.outbound import Outbound
from wsbus.registry import ClientRegistry
from wsbus.router import Router
from wsbus.session import Session
from wsbus.stats import Counters

SERVICE = ServiceAddress("svc")


class Setup:
    def __init__(self, *conn_ids: str) -> None:
        self.registry = ClientRegistry()
        self.counters = Counters.zero()
        self.hooks = Hooks(entry_points=False)
        self.sessions: dict[ConnId, Session] = {}
        self.taken: dict[ConnId, list[bytes]] = {}
        ids = IdFactory("n")
        for raw in conn_ids:
            conn_id = ConnId(raw)
            self.registry.connect(conn_id)
            taken: list[bytes] = self.taken.setdefault(conn_id, [])

            def send_nowait(data: bytes, taken: list[bytes] = taken) -> bool:
                taken.append(data)
                return True

            self.sessions[conn_id] = Session(
                conn_id,
                Codec.JSON,
                GatewayConfig(node="n"),
                self.counters,
                self.hooks,
                self.registry.addresses,
                ids.next,
                send_nowait=send_nowait,
                driver=FakeDriver(),
            )
        self.outbound = Outbound(
            NodeId("n"),
            self.sessions,
            self.registry,
            Router(self.registry),
            self.hooks,
            self.counters,
            ids,
        )

    def deliver(self, type: str, content: Any = None, **fields: Any) -> None:
        envelope = Envelope(
            id=EnvelopeId(f"e{len(self.outbound.to_bus)}"),
            type=type,
            sender=SERVICE,
            content=content,
            **fields,
        )
        self.outbound.deliver(envelope, 100.0)

    def balanced(self) -> None:
        pending = sum(s.pending for s in self.sessions.values())
        assert_balanced(
            self.counters.snapshot(connections=len(self.registry), deliveries_pending=pending)
        )


def test_a_message_is_encoded_once_and_queued_on_each_target_in_order() -> None:
    setup = Setup("n.1", "n.2")
    for i in range(3):
        setup.deliver("chat.say", i, recipients=Recipients(everyone=True))
    for conn_id in ("n.1", "n.2"):
        frames = [msgspec.json.decode(d) for d in setup.taken[ConnId(conn_id)]]
        assert [f["content"] for f in frames] == [0, 1, 2]
        assert frames[0]["from"] == "svc"
    assert setup.counters.messages_routed == 3 and setup.counters.deliveries_written == 6
    assert not setup.outbound.to_bus
    setup.balanced()


def test_unmatched_recipients_are_reported_to_the_service() -> None:
    setup = Setup("n.1")
    setup.deliver("chat.say", 1, recipients=Recipients(conn_ids=(ConnId("n.1"), ConnId("n.9"))))
    [report] = setup.outbound.to_bus
    assert report.type == control.UNDELIVERABLE and report.to == SERVICE
    assert report.created == 100.0  # the time is the caller's
    assert report.content["recipients"] == {"conn_ids": ("n.9",)}
    assert setup.counters.messages_partial == 1
    setup.balanced()


def test_a_shared_message_for_other_gateways_is_elsewhere_not_reported() -> None:
    setup = Setup("n.1")
    setup.deliver(
        "chat.say",
        1,
        recipients=Recipients(conn_ids=(ConnId("other.1"),)),
        headers={SHARED_HEADER: "1"},
    )
    assert not setup.outbound.to_bus and setup.counters.messages_elsewhere == 1
    setup.balanced()


def test_control_requests_are_answered_and_an_alias_is_seen_at_once() -> None:
    setup = Setup("n.1")
    setup.deliver(control.ALIAS_SET, {"conn_id": "n.1", "alias": "ann"})
    [answer] = setup.outbound.to_bus
    assert answer.type == control.RESULT and answer.content["ok"] is True
    # The session reads its stamped address from the registry: nothing to keep in sync.
    session = setup.sessions[ConnId("n.1")]
    envelope = session.receive('{"type": "chat.say"}', 0.0, 0.0)
    assert envelope is not None and envelope.sender.public_name == "ann"
    session.published(None)
    setup.balanced()


def test_a_disconnect_request_closes_the_session_with_a_flush() -> None:
    setup = Setup("n.1")
    setup.deliver(control.DISCONNECT, {"conn_id": "n.1", "code": 4000, "reason": "bye"})
    session = setup.sessions[ConnId("n.1")]
    assert (session.close_code, session.close_reason, session.flushing) == (4000, "bye", True)
    setup.deliver(control.DISCONNECT, {"conn_id": "n.1", "code": 1006})
    assert setup.outbound.to_bus[-1].content["code"] == "invalid_request"
    setup.balanced()


# -- wsbus.gap: the bus says deliveries may have been lost ----------------------------------


def _frames(setup: Setup, conn_id: str) -> list[dict[str, Any]]:
    return [msgspec.json.decode(d) for d in setup.taken[ConnId(conn_id)]]


def test_a_gap_goes_to_every_open_connection_after_what_was_queued() -> None:
    setup = Setup("n.1", "n.2", "n.3")
    setup.deliver("chat.say", 0, recipients=Recipients(everyone=True))
    setup.sessions[ConnId("n.3")].close(4000, "bye")  # closing: its close tells it
    setup.registry.connect(ConnId("n.4"))
    del setup.sessions[ConnId("n.2")]  # gone; n.4 is registered with no session yet
    assert setup.outbound.gap("bus_disconnected") == 1
    [message, gap] = _frames(setup, "n.1")
    assert message["content"] == 0 and "from" not in gap
    assert gap["type"] == "wsbus.gap" and gap["content"]["reason"] == "bus_disconnected"
    assert "lost" in gap["content"]["message"] and isinstance(gap["id"], str)
    assert [f["type"] for f in _frames(setup, "n.3")] == ["chat.say"]
    assert (setup.counters.gaps_heard, setup.counters.gap_notices) == (1, 1)
    assert not setup.outbound.to_bus
    setup.balanced()


def test_a_connection_still_authenticating_gets_no_gap() -> None:
    setup = Setup("n.1")
    setup.registry.disconnect(ConnId("n.1"))  # a session not (yet, or no longer) registered
    assert setup.outbound.gap("slow_consumer") == 0
    assert setup.taken[ConnId("n.1")] == []


def test_gaps_with_nothing_between_them_are_one_notice() -> None:
    setup = Setup("n.1")
    assert setup.outbound.gap("bus_disconnected") == 1
    assert setup.outbound.gap("bus_disconnected") == 0  # the notice queued says it already
    assert setup.outbound.gap("slow_consumer") == 0
    setup.deliver("chat.say", 1, recipients=Recipients(everyone=True))
    assert setup.outbound.gap("slow_consumer") == 1
    setup.counters.connections_total += 1  # someone connected: they have heard nothing
    assert setup.outbound.gap("slow_consumer") == 1
    types = [f["type"] for f in _frames(setup, "n.1")]
    assert types == ["wsbus.gap", "chat.say", "wsbus.gap", "wsbus.gap"]
    assert (setup.counters.gaps_heard, setup.counters.gap_notices) == (5, 3)
    setup.balanced()


def test_a_reason_clients_do_not_know_is_unknown_and_the_bus_words_stay_out() -> None:
    setup = Setup("n.1")
    setup.outbound.gap("nats: connection to 10.0.0.7:4222 reset")
    [gap] = _frames(setup, "n.1")
    assert gap["content"]["reason"] == "unknown" and "10.0.0.7" not in gap["content"]["message"]


# -- alias requests on a bus that claims aliases ------------------------------------------------


def test_with_claims_alias_requests_are_checked_then_left_for_the_gateway() -> None:
    setup = Setup("n.1")
    setup.outbound.claims = True
    setup.deliver(control.ALIAS_SET, {"conn_id": "n.1", "alias": "ann"})
    setup.deliver(control.ALIAS_CLEAR, {"conn_id": "n.1"})
    setup.deliver(control.JOIN, {"conn_id": "n.1", "group": "g"})  # answered at once
    setup.deliver(control.ALIAS_SET, {"conn_id": "n.1", "alias": "not valid"})
    setup.deliver(control.ALIAS_SET, {"conn_id": "n.9", "alias": "bob"})
    assert [(c.conn_id, c.alias) for c in setup.outbound.alias_requests] == [
        ("n.1", "ann"),
        ("n.1", None),
    ]
    assert setup.registry.info(ConnId("n.1")).alias is None  # nothing set before the claim
    # The join's presence event goes on the bus too: only the answers here.
    results = [e for e in setup.outbound.to_bus if e.type == control.RESULT]
    answers = [(e.content["ok"], e.content.get("code")) for e in results]
    assert answers == [(True, None), (False, "invalid_name"), (False, "unknown_connection")]
    first = setup.outbound.alias_requests[0]
    setup.outbound.answer(first.request, control.Result(True, "ann"), 101.0)
    answer = setup.outbound.to_bus[-1]
    assert answer.reply_to == first.request.id and answer.created == 101.0
    assert setup.counters.control_requests == 5
    setup.balanced()
