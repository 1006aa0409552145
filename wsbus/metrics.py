"""Prometheus metrics for a gateway (and helpers for the bus and service processes).

Needs the ``metrics`` extra (``pip install 'wsbus[metrics]'``, which brings
``prometheus_client``). Nothing here runs per message: the gateway already counts
everything in :class:`~wsbus.stats.Counters`, and :class:`GatewayCollector` reads a
snapshot of them when Prometheus scrapes (:meth:`wsbus.Gateway.stats`). The two latency
histograms are fed by the gateway's probes round the bus (:class:`wsbus.ready.Readiness`):
one a second while someone scrapes or asks ``/readyz``, never one per message.

Names follow Prometheus conventions: ``wsbus_`` first, counters end in ``_total``, times are
in seconds. docs/operations.md lists every metric; docs/grafana-dashboard.json is a
dashboard built on them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from .errors import ConfigError, MissingExtra
from .session import CloseCode
from .stats import Counters, Stats
from .wire import Codec

try:
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        CollectorRegistry,
        Histogram,
        ProcessCollector,
        generate_latest,
        start_http_server,
    )
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        InfoMetricFamily,
        Metric,
    )
    from prometheus_client.registry import Collector
except ImportError as exc:  # the extra is not installed
    raise MissingExtra("metrics") from exc

if TYPE_CHECKING:
    from .gateway import Gateway

__all__ = [
    "CONTENT_TYPE",
    "GAUGE_FIELDS",
    "LATENCY_BUCKETS",
    "FunctionCollector",
    "GatewayCollector",
    "GatewayMetrics",
    "close_reason",
    "family",
    "metric_name",
    "render",
    "serve_metrics",
    "service_metrics",
]

log = logging.getLogger("wsbus.metrics")

CONTENT_TYPE: Final = CONTENT_TYPE_LATEST
"""The ``Content-Type`` of a scrape's body (Prometheus text format)."""

GAUGE_FIELDS: Final = frozenset(
    {
        "connections",
        "frames_in_flight",
        "deliveries_pending",
        "presence_events_queued",
        "receipts_pending",
        "unacked",
        "sessions_saving",
    }
)
"""Fields of :class:`~wsbus.stats.Stats` that are a value now (gauges), not a count."""

_RENAMED: Final = {
    # ``wsbus_connections`` is the gauge of open connections; its counter is named apart.
    "connections_total": "wsbus_connections_accepted",
}

_BY_KEY: Final = {
    # A figure kept by key: (metric name, label, help).
    "rejected_by_code": (
        "wsbus_frames_rejected_by_code",
        "code",
        "client frames answered with wsbus.error, by error code",
    ),
    "dropped_by_close_code": (
        "wsbus_deliveries_dropped_by_close_code",
        "code",
        "deliveries dropped because their connection closed, by the close code",
    ),
    "closes_by_code": (
        "wsbus_connection_closes",
        "code",
        "connections closed, by WebSocket close code (reason names it: rate_limited, "
        "slow_consumer, ...)",
    ),
}

LATENCY_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
"""Seconds: the buckets of the latency histograms (a loopback bus takes about 0.1-1 ms)."""

_CLOSE_REASONS: Final = {
    value: name.lower()
    for name, value in vars(CloseCode).items()
    if name.isupper() and isinstance(value, int)
}


def close_reason(code: int) -> str:
    """The name of a WebSocket close code for a label (``rate_limited`` for 4429)."""
    return _CLOSE_REASONS.get(code, "other")


def metric_name(field: str) -> str:
    """The metric a :class:`~wsbus.stats.Stats` field is exported as, without ``_total``."""
    return _RENAMED.get(field, f"wsbus_{field}")


def _help(field: str) -> str:
    """A field's description in :class:`Stats`'s docstring, on one line."""
    found = re.search(rf"^ {{8}}{field}: (.*?)(?=^ {{8}}\S|\Z)", Stats.__doc__ or "", re.M | re.S)
    if found is None:
        return field.replace("_", " ")
    return " ".join(found.group(1).replace("``", "").split())


_HELP: Final = {name: _help(name) for name in Counters.__struct_fields__}


class GatewayCollector(Collector):
    """Reads a gateway's counters when Prometheus scrapes; costs nothing between scrapes.

    Args:
        gateway: the gateway.
        edge: the edge's name, a label of the connection gauge (``websockets``).
    """

    def __init__(self, gateway: Gateway, edge: str) -> None:
        self.gateway = gateway
        self.edge = edge

    def collect(self) -> Iterator[Metric]:
        """Yield every metric, from one snapshot of the counters."""
        gateway = self.gateway
        stats = gateway.stats()
        info = InfoMetricFamily("wsbus_gateway", "this gateway: its node id and edge")
        info.add_metric([], {"node": str(gateway.node), "edge": self.edge})
        yield info
        connections = GaugeMetricFamily(
            "wsbus_connections",
            "open connections now, by codec and edge",
            labels=("codec", "edge"),
        )
        counts = gateway.connections_by_codec()
        for codec in Codec:
            connections.add_metric([str(codec), self.edge], counts.get(str(codec), 0))
        yield connections
        for field in Counters.__struct_fields__:
            if field == "connections":
                continue
            value = getattr(stats, field)
            if isinstance(value, dict):
                yield self._by_key(field, value)
            elif field in GAUGE_FIELDS:
                yield GaugeMetricFamily(metric_name(field), _HELP[field], value=value)
            else:
                yield CounterMetricFamily(metric_name(field), _HELP[field], value=value)
        available = gateway.bus_available
        if available is not None:
            yield GaugeMetricFamily(
                "wsbus_bus_available",
                "1 while the bus says it can take envelopes, else 0",
                value=1 if available else 0,
            )
        reconnects = gateway.bus_reconnects
        if reconnects is not None:
            yield CounterMetricFamily(
                "wsbus_bus_reconnects", "times the bus's link reconnected", value=reconnects
            )

    def _by_key(self, field: str, counts: Mapping[Any, int]) -> Metric:
        name, label, text = _BY_KEY[field]
        if field == "rejected_by_code":
            family = CounterMetricFamily(name, text, labels=(label,))
            for key, count in sorted(counts.items()):
                family.add_metric([str(key)], count)
            return family
        family = CounterMetricFamily(name, text, labels=(label, "reason"))
        for code, count in sorted(counts.items()):
            family.add_metric([str(code), close_reason(int(code))], count)
        return family


class GatewayMetrics:
    """A gateway's metrics: its own registry (never the process-wide one), and histograms.

    Each gateway gets a registry of its own, so two gateways in one process (tests, an
    application running several) never mix their figures.

    Args:
        gateway: the gateway.
        edge: the edge's name (a label).
        process: add the process's CPU, memory and file descriptors
            (``process_*``, where the platform has them).
    """

    def __init__(self, gateway: Gateway, edge: str, *, process: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(GatewayCollector(gateway, edge))
        if process:
            ProcessCollector(registry=self.registry)
        self.publish_latency = Histogram(
            "wsbus_bus_publish_latency_seconds",
            "seconds until the bus took a probe (sampled by the gateway's probes, not per message)",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.one_way_latency = Histogram(
            "wsbus_bus_one_way_latency_seconds",
            "seconds from publishing a probe to its arrival back at the gateway: one trip "
            "through the bus (sampled by the gateway's probes, not per message)",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def observe(self, published: float, round_trip: float) -> None:
        """Record one probe's times (:class:`~wsbus.ready.Readiness` calls this)."""
        self.publish_latency.observe(published)
        self.one_way_latency.observe(round_trip)

    def render(self) -> bytes:
        """The body of a scrape."""
        return render(self.registry)


def render(registry: CollectorRegistry) -> bytes:
    """Return the Prometheus text exposition of ``registry``."""
    return generate_latest(registry)


def family(
    name: str, text: str, values: Iterable[tuple[Sequence[str], float]], labels: Sequence[str]
) -> Metric:
    """A gauge family from ``(label values, value)`` pairs (the bus and service processes)."""
    gauge = GaugeMetricFamily(name, text, labels=labels)
    for label_values, value in values:
        gauge.add_metric(list(label_values), value)
    return gauge


class FunctionCollector(Collector):
    """A collector that yields what a function returns at each scrape.

    Args:
        collect: returns the metrics; called on the scraping thread.
    """

    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterator[Metric]:
        """Yield the function's metrics."""
        yield from self._collect()


def serve_metrics(
    address: str, collect: Callable[[], Iterable[Metric]], what: str
) -> Callable[[], None]:
    """Serve ``collect``'s metrics (and the process's) over HTTP at ``address``, on a thread.

    For the processes that have no HTTP port of their own: the Pyro message bus and the
    service processes (``--metrics``). Only who can reach ``address`` can read them: bind
    it to loopback (the default when only a port is given) or to a private network.

    Args:
        address: ``PORT`` (on 127.0.0.1), or ``HOST:PORT``.
        collect: returns the metrics at each scrape.
        what: the process, for the line printed on stdout (``message bus``).

    Returns:
        A function that stops the server.

    Raises:
        ConfigError: ``address`` is not ``[HOST:]PORT``, or cannot be listened on (the
            ``--metrics`` flag is named).
    """
    host, _, port_text = address.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if port_text.isdigit() and not 0 < int(port_text) < 65536:
        raise ConfigError(f"--metrics {address!r}: the port must be from 1 to 65535")
    if not port_text.isdigit():
        raise ConfigError(
            f"--metrics {address!r}: write PORT or HOST:PORT, as 9101 or 0.0.0.0:9101"
        )
    registry = CollectorRegistry(auto_describe=True)
    registry.register(FunctionCollector(collect))
    ProcessCollector(registry=registry)
    try:
        server, thread = start_http_server(int(port_text), host, registry)
    except OSError as exc:
        raise ConfigError(
            f"--metrics {address}: cannot listen there ({exc.strerror or exc}); "
            "choose another port, or an address of this machine"
        ) from None
    print(f"{what}: metrics at http://{host}:{port_text}/metrics", flush=True)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)

    return stop


def service_metrics(hosts: Iterable[tuple[str, Mapping[str, int]]]) -> Iterator[Metric]:
    """Metrics of service hosts from their figures (:func:`wsbus.service.hosted_figures`).

    A figure ``x_total`` becomes the counter ``wsbus_service_x_total``, any other the gauge
    ``wsbus_service_x``; each labelled with the service.
    """
    families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
    for service, figures in hosts:
        for key, value in figures.items():
            name = f"wsbus_service_{key}"
            family = families.get(name)
            if family is None:
                text = f"{key.replace('_', ' ')} (wsbus service --metrics)"
                family = families[name] = (
                    CounterMetricFamily(name.removesuffix("_total"), text, labels=("service",))
                    if key.endswith("_total")
                    else GaugeMetricFamily(name, text, labels=("service",))
                )
            assert family is not None
            family.add_metric([service], value)
    yield from families.values()
