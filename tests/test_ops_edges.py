"""/healthz, /readyz and /metrics on each edge, over real sockets on 127.0.0.1.

The decisions are wsbus.http's and wsbus.ready's (tests/wsbus/test_ready.py,
tests/wsbus/test_metrics.py); here each edge answers them on a real port: the websockets
edge waits for a probe, the picows edge (whose upgrade hook cannot wait) answers with the
latest check and keeps checking in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from wsbus import Gateway, GatewayConfig
from wsbus.errors import ConfigError
from wsbus.memory import MemoryBus
from wsbus.wire import Codec
from wsbus_cli.demo_services import Echo
from wsbus_websockets import EdgeConfig, connect
from wsbus_websockets import serve as serve_websockets

pytestmark = pytest.mark.asyncio


async def _serve_picows(gateway: Gateway, config: EdgeConfig) -> Any:
    from tests.wsbus_picows.conftest import picows_config
    from wsbus_picows import serve

    return await serve(gateway, "127.0.0.1", 0, config=picows_config(config))


async def _serve_ws(gateway: Gateway, config: EdgeConfig) -> Any:
    return await serve_websockets(gateway, "127.0.0.1", 0, config=config)


async def _serve_asgi(gateway: Gateway, config: EdgeConfig) -> Any:
    # The ASGI application under a real uvicorn: the settings both configurations have.
    import msgspec

    from wsbus_asgi import AsgiConfig, serve

    fields = set(AsgiConfig.__struct_fields__)
    shared = {k: v for k, v in msgspec.structs.asdict(config).items() if k in fields}
    return await serve(gateway, "127.0.0.1", 0, config=AsgiConfig(**shared))


EDGES: dict[str, Callable[[Gateway, EdgeConfig], Awaitable[Any]]] = {
    "websockets": _serve_ws,
    "picows": _serve_picows,
    "asgi": _serve_asgi,
}


def _get(port: int, path: str, host: str = "127.0.0.1") -> tuple[int, str, str]:
    """GET ``path``: status, Content-Type, body (errors included)."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=10) as answer:
            return answer.status, answer.headers["Content-Type"], answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


@contextlib.asynccontextmanager
async def _edge(edge: str, bus: MemoryBus, **settings: Any) -> AsyncIterator[tuple[Gateway, Any]]:
    await bus.add_service(Echo())
    gateway = Gateway(bus, config=GatewayConfig(node="ops"), entry_points=False)
    await gateway.start()
    server = await EDGES[edge](gateway, EdgeConfig(**settings))
    try:
        yield gateway, server
    finally:
        await server.close()
        await gateway.close()


async def _ready_answer(port: int, want: bool, timeout: float = 30.0) -> dict[str, Any]:  # noqa: ASYNC109
    """Ask /readyz until its readiness is ``want`` (the picows edge answers from the latest
    check, which the first request starts)."""
    async with asyncio.timeout(timeout):
        while True:
            status, content_type, body = await asyncio.to_thread(_get, port, "/readyz")
            assert content_type == "application/json"
            report = json.loads(body)
            assert status == (200 if report["ready"] else 503), (status, report)
            if report["ready"] is want:
                return report  # type: ignore[no-any-return]
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("edge", sorted(EDGES))
async def test_readyz_reports_each_part_and_follows_the_bus(edge: str) -> None:
    bus = MemoryBus()
    async with _edge(edge, bus, ready_services=("echo",)) as (_, server):
        report = await _ready_answer(server.port, True)
        assert report["edge"] == {"status": "ok", "connections": 0}
        assert report["bus"]["status"] == "ok"
        assert report["services"] == {"echo": 1}
        assert report["missing"] == []
        bus.down = True
        report = await _ready_answer(server.port, False)
        assert report["bus"]["status"] == "unavailable"
        bus.down = False
        await _ready_answer(server.port, True)
        # /healthz stays the cheap answer: up, whatever the bus.
        status, _, body = await asyncio.to_thread(_get, server.port, "/healthz")
        assert status == 200 and json.loads(body)["status"] == "ok"


@pytest.mark.parametrize("edge", sorted(EDGES))
async def test_metrics_are_off_by_default_and_readyz_can_be_turned_off(edge: str) -> None:
    async with _edge(edge, MemoryBus(), ready_path="") as (_, server):
        for path in ("/metrics", "/readyz"):
            status, _, _ = await asyncio.to_thread(_get, server.port, path)
            assert status == 426, path  # a WebSocket endpoint, nothing else here


@pytest.mark.parametrize("edge", sorted(EDGES))
async def test_metrics_move_with_the_traffic_of_a_real_client(edge: str) -> None:
    async with _edge(edge, MemoryBus(), metrics_path="/metrics") as (_, server):
        port = server.port

        def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
            status, content_type, body = _get(port, "/metrics")
            assert status == 200 and content_type.startswith("text/plain"), (status, body)
            return {
                (sample.name, tuple(sorted(sample.labels.items()))): sample.value
                for family in text_string_to_metric_families(body)
                for sample in family.samples
            }

        before = await asyncio.to_thread(scrape)
        assert before[("wsbus_frames_received_total", ())] == 0
        async with connect(f"ws://127.0.0.1:{port}/", codec=Codec.MSGPACK) as client:
            for n in range(5):
                await client.request("echo", {"n": n})
            during = await asyncio.to_thread(scrape)
        assert during[("wsbus_frames_received_total", ())] == 5
        assert during[("wsbus_connections", (("codec", "wsbus.v1.msgpack"), ("edge", edge)))] == 1
        assert during[("wsbus_gateway_info", (("edge", edge), ("node", "ops")))] == 1
        # Scraping keeps probes going: they feed the latency histograms.
        async with asyncio.timeout(30):
            while (await asyncio.to_thread(scrape)).get(
                ("wsbus_bus_one_way_latency_seconds_count", ()), 0
            ) < 1:
                await asyncio.sleep(0.05)


@pytest.mark.parametrize("edge", sorted(EDGES))
async def test_metrics_are_refused_to_a_network_not_listed(edge: str) -> None:
    async with _edge(edge, MemoryBus(), metrics_path="/metrics", metrics_from=("10.0.0.0/8",)) as (
        _,
        server,
    ):
        status, _, body = await asyncio.to_thread(_get, server.port, "/metrics")
        assert status == 403
        assert "metrics_from" in body
        assert "wsbus_" not in body


async def test_a_flood_of_readyz_requests_costs_one_probe_at_a_time() -> None:
    probes = 0

    class CountingBus(MemoryBus):
        async def probe(self, envelope: Any) -> None:
            nonlocal probes
            probes += 1
            await super().probe(envelope)

    async with _edge("websockets", CountingBus()) as (_, server):
        loop = asyncio.get_running_loop()
        start = loop.time()
        answers = await asyncio.gather(
            *(asyncio.to_thread(_get, server.port, "/readyz") for _ in range(40))
        )
        elapsed = loop.time() - start
        assert all(status == 200 for status, _, _ in answers)
        # One probe at a time, a report reused for a second: however many ask, at most
        # one probe per second that passed (and one to begin with).
        assert probes <= 2 + int(elapsed), (probes, elapsed)


def _get_with(port: int, path: str, headers: dict[str, str]) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.parametrize("edge", sorted(EDGES))
async def test_a_request_through_a_proxy_gets_no_metrics_and_no_details(edge: str) -> None:
    # Behind a proxy on this host every client comes from 127.0.0.1: a request a proxy
    # forwarded is never taken for an operator's.
    bus = MemoryBus()
    async with _edge(edge, bus, metrics_path="/metrics") as (_, server):
        await _ready_answer(server.port, True)
        status, body = await asyncio.to_thread(_get_with, server.port, "/readyz", {})
        assert status == 200 and json.loads(body)["services"] == {"echo": 1}
        for header in ("X-Forwarded-For", "Forwarded", "X-Real-IP", "Via"):
            proxied = {header: "203.0.113.9"}
            status, body = await asyncio.to_thread(_get_with, server.port, "/metrics", proxied)
            assert status == 403 and "wsbus_" not in body, header
            status, body = await asyncio.to_thread(_get_with, server.port, "/readyz", proxied)
            report = json.loads(body)
            assert status == 200 and report["ready"] is True
            assert report["services"] is None and "detail" not in report["bus"], header


async def test_readiness_settings_that_cannot_work_are_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="metrics_from"):
        EdgeConfig(metrics_from=("not a network",))
    with pytest.raises(ConfigError, match="metrics_path"):
        EdgeConfig(metrics_path="metrics")


async def test_readiness_answers_within_a_short_open_timeout_even_with_the_bus_deaf() -> None:
    # The probe's deadline is cut to a third of open_timeout: /readyz answers (not ready)
    # before the edge gives up on the request.
    class DeafBus(MemoryBus):
        async def probe(self, envelope: Any) -> None:
            return None  # taken, never delivered back

    async with _edge("websockets", DeafBus(), open_timeout=1.5, ready_timeout=5.0) as (_, server):
        status, body = await asyncio.to_thread(_get_with, server.port, "/readyz", {})
        assert status == 503 and json.loads(body)["bus"]["status"] == "timeout"
