"""docs/operations.md lists every metric wsbus exports; the Grafana dashboard uses only those."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from wsbus import Gateway, GatewayConfig
from wsbus.memory import MemoryBus
from wsbus.metrics import GatewayMetrics
from wsbus.stats import Counters

DOCS = Path(__file__).parent.parent / "docs"
OPERATIONS = (DOCS / "operations.md").read_text(encoding="utf-8")
DASHBOARD = json.loads((DOCS / "grafana-dashboard.json").read_text(encoding="utf-8"))
_SUFFIXES = ("_bucket", "_count", "_sum", "_created")


def _documented(name: str) -> bool:
    return f"`{name}`" in OPERATIONS


@pytest.mark.asyncio
async def test_every_gateway_metric_is_documented() -> None:
    gateway = Gateway(MemoryBus(), config=GatewayConfig(node="docs"), entry_points=False)
    await gateway.start()
    try:
        body = GatewayMetrics(gateway, "memory", process=False).render().decode()
    finally:
        await gateway.close()
    names = {line.split()[2] for line in body.splitlines() if line.startswith("# TYPE")}
    exported = set()
    for line in body.splitlines():
        if line.startswith("# TYPE"):
            _, _, name, kind = line.split()
            exported.add(
                f"{name}_total" if kind == "counter" and not name.endswith("_total") else name
            )
    assert len(names) > len(Counters.__struct_fields__)
    missing = sorted(
        name for name in exported if not name.endswith("_created") and not _documented(name)
    )
    assert not missing, f"docs/operations.md does not list {missing}"


def test_every_process_figure_is_documented() -> None:
    from wsbus_nats.link import LinkCounters

    keys = ["inbox", "inbox_size", "waiting_senders", "failures_total", "bus_available"]
    keys += ["send_queue", "send_calls_total"]
    keys += [f"nats_{name}_total" for name in LinkCounters().as_dict()]
    missing = [key for key in keys if not _documented(f"wsbus_service_{key}")]
    assert not missing, f"docs/operations.md does not list wsbus_service_{missing}"


def test_the_dashboard_uses_only_documented_metrics() -> None:
    exprs = [target["expr"] for panel in DASHBOARD["panels"] for target in panel["targets"]]
    assert len(exprs) >= 20
    used = set()
    for expr in exprs:
        for name in re.findall(r"\b(wsbus_[a-z_]+)", expr):
            for suffix in _SUFFIXES:
                if name.endswith(suffix) and name.endswith("seconds" + suffix):
                    name = name.removesuffix(suffix)
            used.add(name)
    missing = sorted(name for name in used if not _documented(name))
    assert not missing, f"the dashboard uses metrics docs/operations.md does not list: {missing}"
    # The panels the issue asks for are there.
    titles = " | ".join(panel["title"] for panel in DASHBOARD["panels"]).lower()
    for topic in (
        "connections",
        "rate-limited",
        "slow-consumer",
        "queue",
        "availability",
        "reconnects",
        "latency",
    ):
        assert topic in titles, topic
