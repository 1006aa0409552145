"""Tracing across processes: `wsbus serve --tracing` and `wsbus service --tracing`.

A real gateway process on the Pyro or NATS bus, a real service process, a WebSocket client:
the spans each process exports (with the real OpenTelemetry SDK, set up by a module the
processes import) form one trace, the client's. And the same with the service in the
gateway's process (`wsbus serve --service-tracing --service ...`).
"""

from __future__ import annotations

import asyncio
import json
import textwrap
from pathlib import Path
from typing import Any

from wsbus_cli.supervisor import Child, free_port
from wsbus_nats.servers import NatsServer
from wsbus_pyro import PyroConfig

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"

# Imported by the gateway (as a --plugin) and by the service (its module): the SDK, with an
# exporter that writes each ended span as a line of JSON to a file per process.
SETUP = textwrap.dedent(
    """
    import json, os
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    from wsbus_cli.demo_services import Echo

    class ToFile(SpanExporter):
        def export(self, spans):
            path = os.path.join(os.environ["SPANS_DIR"], f"{os.getpid()}.jsonl")
            with open(path, "a", encoding="utf-8") as out:
                for span in spans:
                    parent = span.parent.span_id if span.parent is not None else None
                    out.write(json.dumps({
                        "name": span.name,
                        "trace": span.context.trace_id,
                        "id": span.context.span_id,
                        "parent": parent,
                    }) + "\\n")
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(ToFile()))
    trace.set_tracer_provider(provider)
    """
)


def _spans(directory: Path) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for path in directory.glob("*.jsonl"):
        for line in path.read_text(encoding="utf-8").splitlines():
            span = json.loads(line)
            found[span["name"]] = span
    return found


async def _traced_echo(port: int, spans_dir: Path) -> dict[str, dict[str, Any]]:
    """Send an echo with a traceparent; wait (bounded) for the four spans."""
    from wsbus_websockets import connect

    async with asyncio.timeout(30):
        async with connect(f"ws://127.0.0.1:{port}/", reconnect=False) as client:
            frame = {
                "type": "echo",
                "content": "hi",
                "id": "t1",
                "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01",
            }
            await client.send_raw(json.dumps(frame))
            while (await client.receive())["type"] != "echo.reply":
                pass
        names = {"wsbus receive", "wsbus publish", "wsbus handle", "wsbus deliver"}
        while not names <= _spans(spans_dir).keys():
            await asyncio.sleep(0.05)
    return _spans(spans_dir)


def _assert_one_trace(spans: dict[str, dict[str, Any]]) -> None:
    receive, publish = spans["wsbus receive"], spans["wsbus publish"]
    handle, deliver = spans["wsbus handle"], spans["wsbus deliver"]
    assert {s["trace"] for s in (receive, publish, handle, deliver)} == {int(TRACE_ID, 16)}
    assert receive["parent"] == int(PARENT_ID, 16)
    assert publish["parent"] == receive["id"]
    assert handle["parent"] == publish["id"]
    assert deliver["parent"] == handle["id"]


async def _gateway_and_service(
    tmp_path: Path, bus: list[str], env: dict[str, str | None]
) -> dict[str, dict[str, Any]]:
    """Run `wsbus service --tracing` and `wsbus serve --tracing` on ``bus``; trace an echo."""
    (tmp_path / "otel_setup.py").write_text(SETUP, encoding="utf-8")
    spans_dir = tmp_path / "spans"
    spans_dir.mkdir()
    env = {**env, "SPANS_DIR": str(spans_dir)}
    app_dir = ["--app-dir", str(tmp_path)]
    service = Child(["service", "otel_setup:Echo", "--tracing", *app_dir, *bus], env=env)
    try:
        port = free_port()
        serve = ["serve", "--port", str(port), "--tracing", "--plugin", "otel_setup"]
        gateway = Child([*serve, *app_dir, *bus], ready="listening on", env=env)
        try:
            spans = await _traced_echo(port, spans_dir)
        finally:
            assert gateway.stop() == 0, gateway.text
    finally:
        service.stop()
    # Each side exported its own spans: the gateway's three and the service's one.
    assert len(list(spans_dir.glob("*.jsonl"))) == 2
    return spans


async def test_one_trace_through_a_gateway_and_a_service_process_on_pyro(
    tmp_path: Path, wsbus_message_bus: Child, wsbus_pyro_config: PyroConfig
) -> None:
    ns = ["--ns-host", wsbus_pyro_config.ns_host, "--ns-port", str(wsbus_pyro_config.ns_port)]
    spans = await _gateway_and_service(tmp_path, ["--bus", "pyro", *ns], {"WSBUS_SECRET": None})
    _assert_one_trace(spans)


async def test_one_trace_through_a_gateway_and_a_service_process_on_nats(
    tmp_path: Path, wsbus_nats_server: NatsServer
) -> None:
    bus = ["--bus", "nats", "--nats-url", wsbus_nats_server.url]
    spans = await _gateway_and_service(tmp_path, bus, {})
    _assert_one_trace(spans)


async def test_one_trace_through_wsbus_serve_with_an_in_process_service(tmp_path: Path) -> None:
    (tmp_path / "otel_setup.py").write_text(SETUP, encoding="utf-8")
    spans_dir = tmp_path / "spans"
    spans_dir.mkdir()
    port = free_port()
    gateway = Child(
        [
            "serve",
            "--port",
            str(port),
            "--tracing",
            "--service-tracing",
            "--service",
            "otel_setup:Echo",
            "--plugin",
            "otel_setup",
            "--app-dir",
            str(tmp_path),
        ],
        ready="listening on",
        env={"SPANS_DIR": str(spans_dir)},
    )
    try:
        spans = await _traced_echo(port, spans_dir)
    finally:
        assert gateway.stop() == 0, gateway.text
    _assert_one_trace(spans)
