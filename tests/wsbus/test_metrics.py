"""wsbus.metrics: every counter of Stats as a Prometheus metric, read at scrape time."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from wsbus import Gateway, GatewayConfig
from wsbus.edge import memory_pair
from wsbus.errors import ConfigError
from wsbus.http import Networks
from wsbus.memory import MemoryBus
from wsbus.metrics import GAUGE_FIELDS, GatewayMetrics, close_reason, metric_name
from wsbus.stats import Counters
from wsbus_cli.demo_services import Echo


def _scrape(
    metrics: GatewayMetrics,
) -> dict[str, tuple[str, dict[tuple[tuple[str, str], ...], float]]]:
    """Parse a scrape: each family's type and its samples by sorted labels."""
    families: dict[str, tuple[str, dict[tuple[tuple[str, str], ...], float]]] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        samples = {
            (sample.name, *sorted(sample.labels.items())): sample.value for sample in family.samples
        }
        families[family.name] = (family.type, samples)  # type: ignore[assignment]
    return families


def _value(families: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    """One sample's value, by its name and labels, whichever family holds it."""
    sample = (name, *sorted(labels.items()))
    for _, samples in families.values():
        if sample in samples:
            return samples[sample]  # type: ignore[no-any-return]
    raise KeyError(sample)


@pytest.mark.asyncio
async def test_every_counter_is_exported_and_moves_with_the_traffic() -> None:
    bus = MemoryBus()
    await bus.add_service(Echo())
    gateway = Gateway(bus, config=GatewayConfig(node="m1"), entry_points=False)
    await gateway.start()
    metrics = GatewayMetrics(gateway, "memory")
    try:
        families = _scrape(metrics)
        for field in msgspec.structs.fields(Counters):
            name = metric_name(field.name)
            if field.name in ("connections",):
                assert families[name][0] == "gauge"
            elif field.type is int:
                kind = "gauge" if field.name in GAUGE_FIELDS else "counter"
                assert families[name][0] == kind, field.name
        assert _value(families, "wsbus_frames_received_total") == 0
        assert _value(families, "wsbus_connections", codec="wsbus.v1.json", edge="memory") == 0

        conn, client = memory_pair()
        task = asyncio.create_task(gateway.serve(conn))
        assert (await client.receive())["type"] == "wsbus.welcome"
        for n in range(3):
            client.send("echo", {"n": n}, id=f"e{n}")
        for _ in range(3):
            await client.receive_until("echo.reply")
        families = _scrape(metrics)
        assert _value(families, "wsbus_frames_received_total") == 3
        assert _value(families, "wsbus_frames_published_total") == 3
        assert _value(families, "wsbus_connections_accepted_total") == 1
        assert _value(families, "wsbus_connections", codec="wsbus.v1.json", edge="memory") == 1
        assert _value(families, "wsbus_bus_available") == 1

        await conn.close(1000, "bye")
        await asyncio.wait_for(task, 10)
        families = _scrape(metrics)
        closes = gateway.stats().closes_by_code
        assert closes
        for code, count in closes.items():
            assert (
                _value(
                    families,
                    "wsbus_connection_closes_total",
                    code=str(code),
                    reason=close_reason(code),
                )
                == count
            )
        assert _value(families, "wsbus_connections", codec="wsbus.v1.json", edge="memory") == 0

        metrics.observe(0.0002, 0.0009)
        families = _scrape(metrics)
        assert _value(families, "wsbus_bus_one_way_latency_seconds_count") == 1
        assert _value(families, "wsbus_bus_publish_latency_seconds_bucket", le="0.0005") == 1
    finally:
        await gateway.close()


@pytest.mark.asyncio
async def test_two_gateways_in_one_process_keep_their_figures_apart() -> None:
    gateways = [
        Gateway(MemoryBus(), config=GatewayConfig(node=f"g{n}"), entry_points=False)
        for n in range(2)
    ]
    for gateway in gateways:
        await gateway.start()
    try:
        first, second = (GatewayMetrics(g, "memory", process=False) for g in gateways)
        conn, client = memory_pair()
        task = asyncio.create_task(gateways[0].serve(conn))
        await client.receive()
        assert _value(_scrape(first), "wsbus_connections_accepted_total") == 1
        assert _value(_scrape(second), "wsbus_connections_accepted_total") == 0
        await conn.close(1000)
        await asyncio.wait_for(task, 10)
    finally:
        for gateway in gateways:
            await gateway.close()


def test_close_codes_have_readable_reasons() -> None:
    assert close_reason(4429) == "rate_limited"
    assert close_reason(4507) == "slow_consumer"
    assert close_reason(1001) == "going_away"
    assert close_reason(3999) == "other"


@pytest.mark.parametrize(
    ("peer", "allowed"),
    [
        ("127.0.0.1:5000", True),
        ("127.8.9.1:1", True),
        ("[::1]:5000", True),
        ("::1:5000", True),
        ("::1", True),
        ("::ffff:127.0.0.1:80", True),
        ("10.0.0.1:5000", False),
        ("[2001:db8::1]:5000", False),
        ("localhost:80", False),
        ("", False),
        ("not an address", False),
    ],
)
def test_metrics_from_decides_by_network(peer: str, allowed: bool) -> None:
    assert Networks(("127.0.0.0/8", "::1/128")).allows(peer) is allowed


def test_metrics_from_names_the_setting_when_a_network_is_wrong() -> None:
    with pytest.raises(ConfigError, match=r"metrics_from.*10\.0\.0\.0/33"):
        Networks(("10.0.0.0/33",))


@given(st.text(max_size=60))
def test_any_peer_text_is_answered_without_raising(peer: str) -> None:
    assert Networks(("0.0.0.0/0",)).allows(peer) in (True, False)


def test_a_metrics_port_that_cannot_be_listened_on_names_the_flag() -> None:
    import socket

    from wsbus.metrics import serve_metrics

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"--metrics 127.0.0.1:{port}: cannot listen"):
            serve_metrics(f"127.0.0.1:{port}", list, "test")
    with pytest.raises(ConfigError, match="--metrics 'x:y'"):
        serve_metrics("x:y", list, "test")
