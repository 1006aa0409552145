"""Tracing (wsbus/tracing.py): spans made with the real OpenTelemetry SDK, in memory.

A client frame's W3C trace context travels through a real gateway and a service on the
in-memory bus; the spans are read back from the SDK's InMemorySpanExporter.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from wsbus import (
    ConnId,
    Context,
    Envelope,
    Gateway,
    GatewayConfig,
    MemoryBus,
    MissingExtra,
    Recipients,
    Service,
    handles,
)
from wsbus.edge import MemoryClient, memory_pair
from wsbus.service import ServiceRunner
from wsbus.wire import Codec, ErrorCode, Rejection, decode_client_frame, is_traceparent
from wsbus_testing import strategies as wst

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"

_EXPORTER = InMemorySpanExporter()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """The SDK, installed once per process as the global tracer provider; emptied per test."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


class Traced(Service):
    """Replies to ``ping``; sends ``note`` to its sender with ``link.send`` as well."""

    name = "traced"
    tracing = True

    @handles("ping")
    async def ping(self, message: Envelope, ctx: Context) -> None:
        """Reply with what was sent."""
        ctx.reply(message.content)

    @handles("ping.later")
    async def ping_later(self, message: Envelope, ctx: Context) -> None:
        """Reply after an await: the handler's span is still the current one."""
        await asyncio.sleep(0.01)
        ctx.reply(message.content)

    @handles("ping.sync")
    def ping_sync(self, message: Envelope, ctx: Context) -> None:
        """Reply from a worker thread."""
        ctx.reply(message.content)

    @handles("fail")
    async def fail(self, message: Envelope, ctx: Context) -> None:
        """Fail: the handle span says so."""
        raise RuntimeError("no")


class Seen(Service):
    """Keeps every envelope it handles (tracing off)."""

    name = "seen"

    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []

    @handles("seen")
    async def seen(self, message: Envelope, ctx: Context) -> None:
        """Keep it."""
        self.envelopes.append(message)


async def _client(gateway: Gateway, codec: Codec = Codec.JSON) -> tuple[MemoryClient, Any]:
    conn, client = memory_pair(codec, None)
    task = asyncio.create_task(gateway.serve(conn))
    welcome = await client.receive()
    assert welcome["type"] == "wsbus.welcome"
    client.conn_id = welcome["content"]["conn_id"]
    return client, task


def _by_name(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name]


def _one(spans: tuple[ReadableSpan, ...], name: str) -> ReadableSpan:
    found = _by_name(spans, name)
    assert len(found) == 1, [span.name for span in spans]
    return found[0]


def _parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def _id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.span_id)


def _trace(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.trace_id)


async def _wait_for(exporter: InMemorySpanExporter, name: str, count: int = 1) -> None:
    """Wait (bounded) until ``count`` spans named ``name`` have ended."""
    async with asyncio.timeout(5):
        while len(_by_name(exporter.get_finished_spans(), name)) < count:
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("codec", [Codec.JSON, Codec.MSGPACK])
@pytest.mark.parametrize("type_", ["ping", "ping.later", "ping.sync"])
async def test_a_client_traceparent_makes_one_trace_through_gateway_and_service(
    spans: InMemorySpanExporter, codec: Codec, type_: str
) -> None:
    async with Gateway(
        MemoryBus([Traced()]), config=GatewayConfig(node="gw", tracing=True), entry_points=False
    ) as gateway:
        client, task = await _client(gateway, codec)
        client.send(type_, {"n": 1}, id="f1", traceparent=TRACEPARENT, tracestate="ven=abc")
        frames = [await client.receive(), await client.receive()]
        assert {frame["type"] for frame in frames} == {"wsbus.ack", f"{type_}.reply"}
        await _wait_for(spans, "wsbus deliver")
        task.cancel()
    done = spans.get_finished_spans()
    receive = _one(done, "wsbus receive")
    publish = _one(done, "wsbus publish")
    handle = _one(done, "wsbus handle")
    deliver = _one(done, "wsbus deliver")
    # One trace: the client's.
    assert {_trace(s) for s in (receive, publish, handle, deliver)} == {int(TRACE_ID, 16)}
    assert _parent_of(receive) == int(PARENT_ID, 16)
    assert receive.parent is not None and receive.parent.is_remote
    assert _parent_of(publish) == _id(receive)
    assert _parent_of(handle) == _id(publish)
    assert _parent_of(deliver) == _id(handle)
    assert receive.kind is SpanKind.SERVER and publish.kind is SpanKind.PRODUCER
    assert handle.kind is SpanKind.CONSUMER and deliver.kind is SpanKind.CONSUMER
    assert receive.attributes is not None and receive.attributes["wsbus.conn_id"] == client.conn_id
    assert receive.attributes["messaging.destination.name"] == type_
    assert receive.attributes["messaging.message.id"] == "f1"
    assert receive.attributes["messaging.operation.name"] == "receive"
    assert publish.attributes is not None
    assert publish.attributes["messaging.operation.name"] == "publish"
    assert handle.attributes is not None and handle.attributes["wsbus.service"] == "traced"
    assert deliver.attributes is not None and deliver.attributes["wsbus.deliveries"] == 1
    assert deliver.attributes["messaging.destination.name"] == f"{type_}.reply"
    # The client's tracestate travels on with the trace.
    assert handle.context is not None
    assert handle.context.trace_state.get("ven") == "abc"
    assert publish.end_time is not None and receive.end_time is not None


async def test_a_frame_without_traceparent_starts_a_trace(spans: InMemorySpanExporter) -> None:
    async with Gateway(
        MemoryBus([Traced()]), config=GatewayConfig(node="gw", tracing=True), entry_points=False
    ) as gateway:
        client, task = await _client(gateway)
        client.send("ping", 1)
        assert (await client.receive())["type"] == "ping.reply"
        await _wait_for(spans, "wsbus deliver")
        task.cancel()
    done = spans.get_finished_spans()
    receive = _one(done, "wsbus receive")
    assert receive.parent is None
    assert {_trace(s) for s in done} == {_trace(receive)}
    assert _parent_of(_one(done, "wsbus deliver")) == _id(_one(done, "wsbus handle"))


async def test_the_trace_context_reaches_a_service_that_does_not_trace(
    spans: InMemorySpanExporter,
) -> None:
    """A gateway that traces puts its publish span's context in the envelope's headers."""
    seen = Seen()
    async with Gateway(
        MemoryBus([seen]), config=GatewayConfig(node="gw", tracing=True), entry_points=False
    ) as gateway:
        client, task = await _client(gateway)
        client.send("seen", None, id="a", traceparent=TRACEPARENT)
        assert (await client.receive())["type"] == "wsbus.ack"
        await _wait_for(spans, "wsbus publish")
        task.cancel()
    (envelope,) = seen.envelopes
    publish = _one(spans.get_finished_spans(), "wsbus publish")
    assert envelope.headers["traceparent"] == f"00-{TRACE_ID}-{_id(publish):016x}-01"
    assert _by_name(spans.get_finished_spans(), "wsbus handle") == []


async def test_a_service_send_carries_its_context_to_deliver(
    spans: InMemorySpanExporter,
) -> None:
    """A send outside any handler: the context the service put in its headers."""
    bus = MemoryBus([Seen()])
    async with Gateway(
        bus, config=GatewayConfig(node="gw", tracing=True), entry_points=False
    ) as gateway:
        client, task = await _client(gateway)
        tracer = trace.get_tracer("test")
        runner = ServiceRunner(Traced(), lambda envelope: gateway.deliver(envelope))
        to = Recipients(conn_ids=(ConnId(str(client.conn_id)),))
        with tracer.start_as_current_span("job") as job:
            runner.link.send(to, "news", 1)
        assert (await client.receive())["type"] == "news"
        # A traceparent the service sets itself is kept.
        runner.link.send(to, "news", 2, headers={"traceparent": TRACEPARENT})
        assert (await client.receive())["content"] == 2
        task.cancel()
    first, second = _by_name(spans.get_finished_spans(), "wsbus deliver")
    assert _parent_of(first) == job.get_span_context().span_id
    assert _trace(first) == job.get_span_context().trace_id
    assert _parent_of(second) == int(PARENT_ID, 16) and _trace(second) == int(TRACE_ID, 16)


async def test_a_failing_handler_marks_its_span_failed(spans: InMemorySpanExporter) -> None:
    async with Gateway(
        MemoryBus([Traced()]), config=GatewayConfig(node="gw", tracing=True), entry_points=False
    ) as gateway:
        client, task = await _client(gateway)
        client.send("fail", None, id="x", traceparent=TRACEPARENT)
        frames = {(await client.receive())["type"], (await client.receive())["type"]}
        assert frames == {"wsbus.ack", "wsbus.error"}
        await _wait_for(spans, "wsbus handle")
        task.cancel()
    handle = _one(spans.get_finished_spans(), "wsbus handle")
    assert not handle.status.is_ok
    assert handle.status.description is not None
    assert handle.status.description.startswith("RuntimeError")


async def test_a_publish_the_bus_refuses_marks_the_publish_span_failed(
    spans: InMemorySpanExporter,
) -> None:
    async with Gateway(
        MemoryBus(), config=GatewayConfig(node="gw", tracing=True), entry_points=False
    ) as gateway:
        client, task = await _client(gateway)
        client.send("nobody.handles", None, id="x")
        error = await client.receive()
        assert error["content"]["code"] == "no_route"
        await _wait_for(spans, "wsbus publish")
        task.cancel()
    publish = _one(spans.get_finished_spans(), "wsbus publish")
    assert publish.status.description == "NoRoute"
    assert _one(spans.get_finished_spans(), "wsbus receive").end_time is not None


BAD_TRACEPARENTS = [
    "",
    "00-" + "0" * 32 + "-" + PARENT_ID + "-01",  # an all-zero trace id
    "00-" + TRACE_ID + "-" + "0" * 16 + "-01",  # an all-zero parent id
    "ff-" + TRACE_ID + "-" + PARENT_ID + "-01",  # version ff
    TRACEPARENT.upper(),
    TRACEPARENT + "-",
    TRACEPARENT[:-1],
    "00-" + TRACE_ID + "-" + PARENT_ID + "-0\u0661",  # an Arabic-Indic digit
    "x" * 60_000,
]


@pytest.mark.parametrize("bad", [*BAD_TRACEPARENTS, 5, None, ["00"], {"a": 1}])
async def test_a_bad_traceparent_is_refused_without_a_span(
    spans: InMemorySpanExporter, caplog: pytest.LogCaptureFixture, bad: object
) -> None:
    caplog.set_level(logging.WARNING)
    seen = Seen()
    async with Gateway(
        MemoryBus([seen]), config=GatewayConfig(node="gw", tracing=True), entry_points=False
    ) as gateway:
        client, task = await _client(gateway)
        client.send_raw(json.dumps({"type": "seen", "id": "b", "traceparent": bad}))
        error = await client.receive()
        assert error["type"] == "wsbus.error"
        assert error["content"]["code"] == "invalid_message"
        assert error["content"]["ref"] == "b"
        assert "traceparent" in error["content"]["message"]
        # The connection goes on: a good frame after it is published.
        client.send("seen", None, id="c")
        assert (await client.receive())["content"] == {"ref": "c"}
        task.cancel()
    assert [envelope.id for envelope in seen.envelopes] == ["c"]
    assert len(_by_name(spans.get_finished_spans(), "wsbus receive")) == 1
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


@pytest.mark.parametrize(
    ("fields", "word"),
    [
        ({"tracestate": "a=b"}, "needs a `traceparent`"),
        ({"traceparent": TRACEPARENT, "tracestate": "A=b"}, "tracestate"),
        ({"traceparent": TRACEPARENT, "tracestate": "a=b,a=c"}, "tracestate"),
        ({"traceparent": TRACEPARENT, "tracestate": 7}, "tracestate"),
        ({"traceparent": TRACEPARENT, "tracestate": "k=" + "v" * 600}, "tracestate"),
        ({"traceparent": TRACEPARENT, "tracestate": ",".join(f"k{i}=v" for i in range(33))}, ""),
        ({"traceparent": TRACEPARENT, "sender": "x"}, "unknown field"),
    ],
)
@pytest.mark.parametrize("codec", [Codec.JSON, Codec.MSGPACK])
def test_bad_trace_fields_are_refused_by_the_wire(
    fields: dict[str, Any], word: str, codec: Codec
) -> None:
    frame = {"type": "a", "id": "r", **fields}
    result = decode_client_frame(_encode(frame, codec), codec)
    assert isinstance(result, Rejection)
    assert result.ref == "r"
    assert word in result.message
    assert result.code in (ErrorCode.INVALID_MESSAGE, ErrorCode.UNKNOWN_FIELD)


def _encode(frame: dict[str, Any], codec: Codec) -> str | bytes:
    return json.dumps(frame) if codec is Codec.JSON else msgspec.msgpack.encode(frame)


CODECS = st.sampled_from([Codec.JSON, Codec.MSGPACK])


@settings(max_examples=200, deadline=None)
@given(traceparent=wst.traceparents(), tracestate=st.none() | wst.tracestates(), codec=CODECS)
def test_a_w3c_trace_context_is_taken(
    traceparent: str, tracestate: str | None, codec: Codec
) -> None:
    frame: dict[str, Any] = {"type": "a", "traceparent": traceparent}
    if tracestate is not None:
        frame["tracestate"] = tracestate
    result = decode_client_frame(_encode(frame, codec), codec)
    assert not isinstance(result, Rejection), result
    assert (result.traceparent, result.tracestate) == (traceparent, tracestate)


@settings(max_examples=300, deadline=None)
@given(traceparent=wst.traceparents(valid=False), codec=CODECS)
def test_a_bad_traceparent_is_refused(traceparent: str, codec: Codec) -> None:
    frame = {"type": "a", "id": "r", "traceparent": traceparent}
    result = decode_client_frame(_encode(frame, codec), codec)
    assert isinstance(result, Rejection)
    # (A lone surrogate in JSON text is bad_value before any field is looked at.)
    assert result.code in (ErrorCode.INVALID_MESSAGE, ErrorCode.BAD_VALUE)
    assert result.ref == "r"


@settings(max_examples=200, deadline=None)
@given(tracestate=wst.tracestates(valid=False), codec=CODECS)
def test_a_bad_tracestate_is_refused(tracestate: str, codec: Codec) -> None:
    frame = {"type": "a", "id": "r", "traceparent": TRACEPARENT, "tracestate": tracestate}
    result = decode_client_frame(_encode(frame, codec), codec)
    assert isinstance(result, Rejection)
    assert result.code is ErrorCode.INVALID_MESSAGE and "tracestate" in result.message


@settings(max_examples=100, deadline=None)
@given(key=wst.spoof_keys(), codec=CODECS)
def test_no_other_key_rides_along_with_a_trace_context(key: str, codec: Codec) -> None:
    frame = {"type": "a", "id": "r", "traceparent": TRACEPARENT, key: "x"}
    result = decode_client_frame(_encode(frame, codec), codec)
    assert isinstance(result, Rejection)
    assert result.code is ErrorCode.UNKNOWN_FIELD and result.ref == "r"


def _oracle(value: str) -> bool:
    """W3C's rule for a version-00-form traceparent, written out another way."""
    parts = value.split("-")
    return (
        [len(part) for part in parts] == [2, 32, 16, 2]
        and all(c in "0123456789abcdef" for c in "".join(parts))
        and parts[0] != "ff"
        and set(parts[1]) != {"0"}
        and set(parts[2]) != {"0"}
    )


@settings(max_examples=300, deadline=None)
@given(value=wst.traceparents() | wst.traceparents(valid=False))
def test_the_traceparent_check_agrees_with_w3c(value: str) -> None:
    assert is_traceparent(value) is _oracle(value)


async def test_tracing_off_makes_no_span_and_still_carries_the_context(
    spans: InMemorySpanExporter,
) -> None:
    seen = Seen()
    async with Gateway(MemoryBus([seen]), config=GatewayConfig(node="gw")) as gateway:
        client, task = await _client(gateway)
        client.send("seen", None, id="a", traceparent=TRACEPARENT, tracestate="v=1")
        assert (await client.receive())["type"] == "wsbus.ack"
        task.cancel()
    assert seen.envelopes[0].headers == {"traceparent": TRACEPARENT, "tracestate": "v=1"}
    assert spans.get_finished_spans() == ()


async def test_a_tracing_service_behind_a_gateway_that_does_not_continues_the_client_trace(
    spans: InMemorySpanExporter,
) -> None:
    async with Gateway(MemoryBus([Traced()]), config=GatewayConfig(node="gw")) as gateway:
        client, task = await _client(gateway)
        client.send("ping", None, traceparent=TRACEPARENT)
        assert (await client.receive())["type"] == "ping.reply"
        task.cancel()
    (handle,) = spans.get_finished_spans()
    assert handle.name == "wsbus handle"
    assert _parent_of(handle) == int(PARENT_ID, 16) and _trace(handle) == int(TRACE_ID, 16)


def test_tracing_off_never_imports_opentelemetry() -> None:
    """A gateway and a service, tracing off, in a fresh interpreter."""
    code = textwrap.dedent(
        """
        import asyncio, sys
        from wsbus import Gateway, GatewayConfig, MemoryBus, Service, handles
        from wsbus.edge import memory_pair
        from wsbus.wire import Codec

        class S(Service):
            @handles("s")
            async def s(self, message, ctx):
                ctx.reply(message.headers)

        async def main():
            async with Gateway(MemoryBus([S()]), config=GatewayConfig()) as gateway:
                conn, client = memory_pair(Codec.JSON, None)
                task = asyncio.create_task(gateway.serve(conn))
                await client.receive()
                client.send("s", None, traceparent=sys.argv[1])
                reply = await client.receive()
                task.cancel()
            print(reply["content"]["traceparent"][3:35])
            print(sorted(m for m in sys.modules if m.startswith(("opentelemetry", "wsbus.tr"))))

        asyncio.run(main())
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code, TRACEPARENT],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.split("\n")[:2] == [TRACE_ID, "[]"], result.stderr


async def test_tracing_without_the_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # As if OpenTelemetry were not installed: importing it raises ImportError.
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    monkeypatch.delitem(sys.modules, "wsbus.tracing", raising=False)
    with pytest.raises(MissingExtra) as info:
        Gateway(MemoryBus(), config=GatewayConfig(tracing=True), entry_points=False)
    assert "pip install 'wsbus[otel]'" in str(info.value)
    with pytest.raises(MissingExtra):
        ServiceRunner(Traced(), lambda envelope: None)
    # Off, nothing needs it.
    ServiceRunner(Traced(), lambda envelope: None, tracing=False)
    Gateway(MemoryBus(), config=GatewayConfig(), entry_points=False)
