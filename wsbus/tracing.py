"""OpenTelemetry spans for the gateway and the service runtime (the ``otel`` extra).

Imported only when tracing is on (``GatewayConfig.tracing``, ``Service.tracing``): a
gateway or a service with tracing off never imports OpenTelemetry and pays nothing per
message. Turned on, each part chooses its traced functions once (a connection's reader, the
gateway's ``deliver``, a service's handlers) instead of testing a setting per message.

The spans (docs/tracing.md), all from the tracer named ``wsbus``:

- ``wsbus receive`` (SERVER), in the gateway, for each client frame that became a message:
  a child of the frame's ``traceparent``, or the root of a new trace;
- ``wsbus publish`` (PRODUCER), its child, while the bus takes the message; its context is
  what the envelope carries on, in the ``traceparent`` and ``tracestate`` headers;
- ``wsbus handle`` (CONSUMER), in a service, for each message a handler takes: a child of
  the envelope's context; what the handler sends carries the handle span's context on;
- ``wsbus deliver`` (CONSUMER), in the gateway, for each envelope from the bus (a message
  for clients, or a request), a child of the envelope's context.

The context travels as W3C Trace Context (``TraceContextTextMapPropagator``), in envelope
headers: any bus carries it. Only ``traceparent`` and ``tracestate``: baggage is not
propagated, so that nothing else a client sends ends up in headers.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

import msgspec

from ._version import __version__
from .envelope import ClientAddress, Envelope, ServiceAddress
from .errors import MissingExtra

try:
    from opentelemetry import trace
    from opentelemetry.context import Context as OtelContext
    from opentelemetry.trace import SpanKind, Status, StatusCode
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError as exc:
    raise MissingExtra("otel") from exc

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from .stats import Counters

__all__ = ["TRACE_HEADERS", "GatewayTracing", "ServiceTracing"]

TRACEPARENT: Final = "traceparent"
TRACESTATE: Final = "tracestate"
TRACE_HEADERS: Final = frozenset({TRACEPARENT, TRACESTATE})
"""The envelope headers that carry a trace context."""

TRACER_NAME: Final = "wsbus"
"""The instrumentation scope of every wsbus span."""

SYSTEM: Final = "wsbus"
"""``messaging.system`` of every wsbus span."""

# A message without a trace context starts a new trace, whatever span the reader's task
# may have current (an instrumented ASGI server's connection span would otherwise become
# the parent of every frame of a long-lived connection).
_ROOT: Final = OtelContext()

_PROPAGATOR: Final = TraceContextTextMapPropagator()


def _sender(envelope: Envelope) -> str:
    """Name an envelope's sender for a span attribute: a connection or a service."""
    sender = envelope.sender
    if type(sender) is ClientAddress:
        return f"client:{sender.conn_id}"
    if type(sender) is ServiceAddress:
        return f"service:{sender.name}"
    return f"gateway:{sender.node}"  # type: ignore[union-attr]


def _parent(headers: Mapping[str, str]) -> OtelContext:
    """Return the context an envelope's headers carry, or the root for none."""
    if TRACEPARENT in headers:
        return _PROPAGATOR.extract(headers)
    return _ROOT


def _failed(span: Span, exc: BaseException) -> None:
    """Mark a span failed with ``exc``: its class, not its text, names the failure."""
    span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, type(exc).__name__))


class GatewayTracing:
    """The gateway's spans: receive and publish per client frame, deliver per envelope.

    Args:
        node: the gateway's node id (the ``wsbus.node`` attribute).
        counters: the gateway's counters (a deliver span counts what it queued).
    """

    def __init__(self, node: str, counters: Counters) -> None:
        self._tracer = trace.get_tracer(TRACER_NAME, __version__)
        self._node = node
        self._counters = counters

    def reader(
        self,
        conn_id: str,
        take: Callable[[str | bytes, float, float], Envelope | None],
        publish_nowait: Callable[[Envelope], bool] | None,
        publish: Callable[[Envelope], Awaitable[None]],
    ) -> tuple[
        Callable[[str | bytes, float, float], Envelope | None],
        Callable[[Envelope], bool] | None,
        Callable[[Envelope], Awaitable[None]],
    ]:
        """Return traced versions of a connection's ``take`` and the bus's publishes.

        ``take`` (the session's ``receive``) starts the receive span and its publish child
        for each envelope it returns, and puts the publish span's context in its headers;
        whichever publish then takes the envelope ends both. A connection's reader takes
        and publishes one frame at a time, so one slot holds the spans in flight.
        """
        tracer = self._tracer
        node = self._node
        inject = _PROPAGATOR.inject
        set_span = trace.set_span_in_context
        receive_kind = SpanKind.SERVER
        publish_kind = SpanKind.PRODUCER
        # (receive span, publish span) of the envelope being published, if any.
        pending: list[Span] = []

        def _end(exc: BaseException | None = None) -> None:
            # Ends the spans of the envelope being published: publish first, then receive.
            if not pending:
                return
            receive, published = pending
            pending.clear()
            if exc is not None:
                _failed(published, exc)
            published.end()
            receive.end()

        def traced_take(data: str | bytes, now: float, wall: float) -> Envelope | None:
            start = time.time_ns()
            envelope = take(data, now, wall)
            if envelope is None:
                # Refused (answered with wsbus.error) or closing: the counters say which.
                return None
            headers = envelope.headers
            attributes = {
                "messaging.system": SYSTEM,
                "messaging.operation.name": "receive",
                "messaging.destination.name": envelope.type,
                "messaging.message.id": envelope.id,
                "wsbus.conn_id": conn_id,
                "wsbus.node": node,
            }
            receive = tracer.start_span(
                "wsbus receive", _parent(headers), receive_kind, attributes, start_time=start
            )
            # A copy: a tracer implementation may keep the dict it was given.
            attributes = attributes.copy()
            attributes["messaging.operation.name"] = "publish"
            published = tracer.start_span(
                "wsbus publish", set_span(receive), publish_kind, attributes
            )
            carrier = {k: v for k, v in headers.items() if k not in TRACE_HEADERS}
            inject(carrier, set_span(published))
            if pending:
                # The last envelope's publish never ended (cannot happen: the reader
                # publishes each before it takes the next); end its spans rather than leak.
                _end()
            pending.extend((receive, published))
            return msgspec.structs.replace(envelope, headers=carrier)

        traced_nowait: Callable[[Envelope], bool] | None = None
        if publish_nowait is not None:
            publish_now = publish_nowait

            def traced_nowait(envelope: Envelope) -> bool:
                try:
                    taken = publish_now(envelope)
                except Exception as exc:
                    _end(exc)
                    raise
                if taken is not False:
                    _end()
                # False: the bus is full; the reader waits with the publish below, which
                # ends the spans.
                return taken

        async def traced_publish(envelope: Envelope) -> None:
            try:
                await publish(envelope)
            except BaseException as exc:
                _end(exc)
                raise
            _end()

        return traced_take, traced_nowait, traced_publish

    def deliverer(self, deliver: Callable[[Envelope], None]) -> Callable[[Envelope], None]:
        """Return a traced version of the gateway's ``deliver`` (one span per envelope)."""
        start_span = self._tracer.start_as_current_span
        counters = self._counters
        node = self._node
        kind = SpanKind.CONSUMER

        def traced_deliver(envelope: Envelope) -> None:
            with start_span(
                "wsbus deliver",
                _parent(envelope.headers),
                kind,
                {
                    "messaging.system": SYSTEM,
                    "messaging.operation.name": "deliver",
                    "messaging.destination.name": envelope.type,
                    "messaging.message.id": envelope.id,
                    "wsbus.sender": _sender(envelope),
                    "wsbus.node": node,
                },
            ) as span:
                before = counters.deliveries_queued
                deliver(envelope)
                # Frames queued (or written at once) for clients by this envelope.
                span.set_attribute("wsbus.deliveries", counters.deliveries_queued - before)

        return traced_deliver


class ServiceTracing:
    """A service's spans: one per handled message, the context carried on in what it sends.

    Args:
        service: the service's name (the ``wsbus.service`` attribute).
    """

    def __init__(self, service: str) -> None:
        self._tracer = trace.get_tracer(TRACER_NAME, __version__)
        self._service = service

    def _span_args(self, envelope: Envelope) -> tuple[OtelContext, dict[str, Any]]:
        return _parent(envelope.headers), {
            "messaging.system": SYSTEM,
            "messaging.operation.name": "process",
            "messaging.destination.name": envelope.type,
            "messaging.message.id": envelope.id,
            "wsbus.sender": _sender(envelope),
            "wsbus.service": self._service,
        }

    def handler(self, method: Callable[..., Any], is_async: bool) -> Callable[..., Any]:
        """Return ``method`` (a handler) wrapped in a handle span, current while it runs.

        The wrapper is a coroutine function when ``method`` is one, a plain function
        otherwise, so that the runner calls it as it would have called ``method``. A
        handler that raises marks its span failed (the runner logs it, as without tracing).
        """
        start_span = self._tracer.start_as_current_span
        span_args = self._span_args
        kind = SpanKind.CONSUMER
        if is_async:

            async def traced_async(envelope: Envelope, ctx: Any) -> Any:
                parent, attributes = span_args(envelope)
                with start_span("wsbus handle", parent, kind, attributes):
                    return await method(envelope, ctx)

            return traced_async

        def traced_sync(envelope: Envelope, ctx: Any) -> Any:
            parent, attributes = span_args(envelope)
            with start_span("wsbus handle", parent, kind, attributes):
                return method(envelope, ctx)

        return traced_sync

    @staticmethod
    def inject(headers: dict[str, str]) -> dict[str, str]:
        """Return ``headers`` with the current span's context added, for a message sent.

        A ``traceparent`` the caller put in ``headers`` itself is kept. Without a current
        span (a send outside any handler) nothing is added. ``headers`` is not changed.
        """
        if TRACEPARENT in headers:
            return headers
        carrier = dict(headers)
        _PROPAGATOR.inject(carrier)
        return carrier
