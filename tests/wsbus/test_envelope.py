"""Envelopes, addresses and recipients: the bus's data model and its MessagePack codec."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsbus.envelope import (
    Address,
    ClientAddress,
    ConnId,
    Envelope,
    EnvelopeId,
    GatewayAddress,
    IdFactory,
    NodeId,
    Recipients,
    ServiceAddress,
    decode_envelope,
    encode_envelope,
    node_of,
)
from wsbus_testing import strategies as wst


@settings(max_examples=200)
@given(envelope=wst.envelopes())
def test_envelopes_round_trip(envelope: Envelope) -> None:
    decoded = decode_envelope(encode_envelope(envelope))
    assert decoded == envelope
    assert type(decoded.sender) is type(envelope.sender)
    assert type(decoded.recipients) is type(envelope.recipients)
    assert type(decoded.to) is type(envelope.to)


@pytest.mark.parametrize(
    ("sender", "tag"),
    [
        (ClientAddress(ConnId("n1.1f"), alias="ann", user="u1"), "client"),
        (ClientAddress(ConnId("n1.2")), "client"),
        (ServiceAddress("chat"), "service"),
        (GatewayAddress(NodeId("n1")), "gateway"),
    ],
)
def test_sender_union_decodes_to_the_right_class(sender: Address, tag: str) -> None:
    envelope = Envelope(EnvelopeId("e-1"), "chat.say", sender, content={"text": "hi"})
    data = encode_envelope(envelope)
    assert msgspec.msgpack.decode(data)["sender"]["type"] == tag
    decoded = decode_envelope(data)
    assert type(decoded.sender) is type(sender)
    assert decoded.sender == sender
    assert decoded == envelope


@pytest.mark.parametrize(
    "to", [ServiceAddress("auth"), GatewayAddress(NodeId("n2")), None], ids=str
)
def test_to_union_decodes_to_the_right_class(to: ServiceAddress | GatewayAddress | None) -> None:
    envelope = Envelope(
        EnvelopeId("e-2"), "wsbus.join", GatewayAddress(NodeId("n1")), reply_to="e-1", to=to
    )
    decoded = decode_envelope(encode_envelope(envelope))
    assert type(decoded.to) is type(to)
    assert decoded == envelope


def test_a_client_address_is_not_a_valid_to() -> None:
    envelope = Envelope(EnvelopeId("e"), "t", ServiceAddress("s"))
    raw = msgspec.msgpack.decode(encode_envelope(envelope))
    raw["to"] = {"type": "client", "conn_id": "n.1"}
    with pytest.raises(msgspec.ValidationError):
        decode_envelope(msgspec.msgpack.encode(raw))


def test_defaults_are_omitted_on_the_wire() -> None:
    envelope = Envelope(EnvelopeId("e"), "t", ServiceAddress("s"))
    assert set(msgspec.msgpack.decode(encode_envelope(envelope))) == {"id", "type", "sender"}
    with_recipients = Envelope(
        EnvelopeId("e"), "t", ServiceAddress("s"), recipients=Recipients(groups=("g",))
    )
    assert msgspec.msgpack.decode(encode_envelope(with_recipients))["recipients"] == {
        "groups": ["g"]
    }


def test_garbage_is_a_decode_error() -> None:
    with pytest.raises(msgspec.DecodeError):
        decode_envelope(b"\xc1")
    with pytest.raises(msgspec.ValidationError):
        decode_envelope(msgspec.msgpack.encode({"id": "e", "type": "t"}))


def test_public_names() -> None:
    assert ClientAddress(ConnId("n.1"), alias="ann").public_name == "ann"
    assert ClientAddress(ConnId("n.1"), user="u").public_name is None
    assert ServiceAddress("chat").public_name == "chat"
    assert GatewayAddress(NodeId("n")).public_name == "gateway"


@pytest.mark.parametrize(
    ("conn_id", "node"),
    [("abc.1f", "abc"), ("node.1", "node"), ("a.b.c.7", "a.b.c"), (".1", "")],
)
def test_node_of(conn_id: str, node: str) -> None:
    assert node_of(conn_id) == node


@given(node=st.text("abcdef0123456789.", min_size=1, max_size=12), serial=st.integers(1, 2**64))
def test_node_of_inverts_a_conn_id(node: str, serial: int) -> None:
    assert node_of(f"{node}.{serial:x}") == node


def test_id_factory_ids_are_unique() -> None:
    make = IdFactory()
    made = [make() for _ in range(10_000)]
    assert len(set(made)) == 10_000
    assert all(made_id.startswith(make.prefix + "-") for made_id in made)
    other = IdFactory()
    assert other.prefix != make.prefix
    assert set(made).isdisjoint(other() for _ in range(100))


def test_id_factory_with_a_prefix_counts_in_hex() -> None:
    make = IdFactory("p")
    assert [make() for _ in range(17)][-2:] == ["p-0x10", "p-0x11"]
    assert IdFactory("{p}")() == "{p}-0x1"  # a prefix is taken as it is


def test_id_factory_knows_its_own_ids() -> None:
    make = IdFactory("gw")
    assert all(make.made(make()) for _ in range(300))
    for other in (
        "gw-",
        "gw-0x",
        "gw-1f",
        "gw-0x1F",
        "gw-0x1g",
        "gw2-0x1",
        "xgw-0x1",
        "gw-0x1-0x2",
    ):
        assert not make.made(other), other


@pytest.mark.parametrize("field", Envelope.__struct_fields__)
def test_envelope_is_frozen(field: str) -> None:
    envelope = Envelope(EnvelopeId("e"), "t", ServiceAddress("s"), content={"k": 1})
    with pytest.raises(AttributeError):
        setattr(envelope, field, None)
    assert envelope == Envelope(EnvelopeId("e"), "t", ServiceAddress("s"), content={"k": 1})


@pytest.mark.parametrize(
    "value",
    [
        ClientAddress(ConnId("n.1")),
        ServiceAddress("s"),
        GatewayAddress(NodeId("n")),
        Recipients(groups=("g",)),
    ],
    ids=lambda value: type(value).__name__,
)
def test_addresses_and_recipients_are_frozen_and_hashable(value: object) -> None:
    field = value.__struct_fields__[0]  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        setattr(value, field, None)
    assert hash(value) == hash(msgspec.structs.replace(value))  # type: ignore[type-var]


@pytest.mark.parametrize(
    ("recipients", "empty"),
    [
        (Recipients(), True),
        (Recipients(exclude=(ConnId("n.1"),)), True),
        (Recipients(conn_ids=(ConnId("n.1"),)), False),
        (Recipients(aliases=("ann",)), False),
        (Recipients(users=("u",)), False),
        (Recipients(groups=("g",)), False),
        (Recipients(everyone=True), False),
        (Recipients(everyone=True, exclude=(ConnId("n.1"),)), False),
    ],
)
def test_recipients_is_empty(recipients: Recipients, empty: bool) -> None:
    assert recipients.is_empty() is empty


@given(recipients=wst.recipients())
def test_recipients_is_empty_iff_nobody_is_named(recipients: Recipients) -> None:
    named = (
        *recipients.conn_ids,
        *recipients.aliases,
        *recipients.users,
        *recipients.groups,
    )
    assert recipients.is_empty() is (not named and not recipients.everyone)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(recipients), type=Recipients) == (
        recipients
    )
