"""A run's JSON record as Markdown tables: ``python -m bench.report bench/results/RUN.json``.

One row per benchmark, one column per server (the figure, and the server's CPU per
message in microseconds), then SPEC section 6's bars as measured, met or not. This is
what docs/performance.md shows.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

COLUMNS = ("raw", "raw-count", "wsbus", "wsbus-picows", "socketio")
HEADINGS = {
    "raw": "raw `websockets` (parses)",
    "raw-count": "raw `websockets` (counts)",
    "wsbus": "wsbus, `websockets` edge",
    "wsbus-picows": "wsbus, picows edge",
    "socketio": "python-socketio",
}


def _heading(kind: str) -> str:
    base, _, loop = kind.partition("~")
    return HEADINGS.get(base, base) + (f" on {loop}" if loop else "")


def _cell(table: dict[str, Any], kind: str) -> str:
    value = table["values"].get(kind)
    if value is None:
        return ""
    text = f"{value:,.3f}" if table["unit"] == "ms" else f"{value:,.0f}"
    if table["unit"] == "KiB per connection":
        text = f"{value:,.1f}"
    cpu = table["server_cpu_us_per_message"].get(kind)
    return f"{text} ({cpu:.1f} us)" if cpu is not None else text


def _pyro(f: dict[str, Any]) -> str:
    cpu = ", ".join(f"{k} {v:.1f}" for k, v in f.get("wsbus_cpu_us_per_message", {}).items())
    return (
        f"- Pyro path: wsbus {f['wsbus_msgs_per_s']:,.0f} msgs/s (CPU per message, us: {cpu}) "
        f"against plain synchronous Pyro5 calls {f['plain_calls_per_s']:,.0f}/s (server CPU "
        f"{f.get('plain_server_cpu_us_per_call', float('nan')):.1f} us per call). One-way "
        f"p50 {f['wsbus_one_way_p50_ms']:.3f} ms, p99 {f['wsbus_one_way_p99_ms']:.3f} ms, "
        f"against a bare Pyro call one at a time {f['plain_rtt_one_at_a_time_ms']:.3f} ms + a "
        f"bare WebSocket send {f['websocket_send_ms']:.3f} ms. Echo round trip p50 "
        f"{f['wsbus_rtt_p50_ms']:.3f} ms."
    )


def _nats(f: dict[str, Any]) -> str:
    wsbus, anchor, alone = f["wsbus"], f["anchor"], f["nats_alone"]

    def cpu(kind: dict[str, Any]) -> str:
        return ", ".join(f"{k} {v:.1f}" for k, v in kind["cpu_us_per_message"].items())

    return (
        f"- NATS path: wsbus {wsbus['msgs_per_s']:,.0f} msgs/s (CPU per message, us: "
        f"{cpu(wsbus)}) against the anchor {anchor['msgs_per_s']:,.0f} msgs/s ({cpu(anchor)}); "
        f"nats-py alone {alone['msgs_per_s']:,.0f} msgs/s. One-way p50 "
        f"{wsbus['one_way_p50_ms']:.3f} ms against {anchor['one_way_p50_ms']:.3f} ms; p99 "
        f"{wsbus['one_way_p99_ms']:.3f} against {anchor['one_way_p99_ms']:.3f} ms."
    )


def render(record: dict[str, Any]) -> str:
    """The Markdown for one run's record."""
    machine = record["machine"]
    load, after = machine["load"], machine.get("load_after")
    # Records from before --loop ran every server on asyncio's event loop.
    loops = str(record.get("settings", {}).get("loop", "asyncio")).split(",")
    lines = [
        f"`{record['command']}`, {record['started']} to {record['finished']}; "
        f"servers on the {' and the '.join(loops)} event loop; "
        f"{machine['cores']} cores ({machine['processor']}), {machine['python']}; load "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} before"
        + (f", {after[0]:.2f} {after[1]:.2f} {after[2]:.2f} after" if after else "")
        + ".",
        "",
        "Versions: "
        + ", ".join(f"{name} {version}" for name, version in record["versions"].items() if version)
        + ".",
        "",
    ]
    tables = record["tables"]
    present = {k for t in tables.values() for k in t["values"]}
    # A server on a second event loop (wsbus~uvloop) stands beside itself on the first.
    kinds = [
        kind
        for base in COLUMNS
        for kind in (base, *sorted(k for k in present if k.partition("~")[0] == base and "~" in k))
        if kind in present
    ]
    if tables:
        lines.append("| benchmark | unit | " + " | ".join(_heading(k) for k in kinds) + " |")
        lines.append("|---|---|" + "---|" * len(kinds))
        for title, table in tables.items():
            cells = " | ".join(_cell(table, k) for k in kinds)
            lines.append(f"| {title} | {table['unit']} | {cells} |")
        lines.append("")
    pairs = [
        (title, name, each)
        for title, table in tables.items()
        for name, each in table.get("loop_ratios", {}).items()
    ]
    if pairs:
        lines += [
            f"Each server on {loops[-1]} against itself on {loops[0]} (medians of each "
            "repetition's own ratio; for ms, lower is better):",
            "",
            "| benchmark | server | figure | server CPU per message |",
            "|---|---|---|---|",
        ]
        for title, name, each in pairs:
            value, cpu = each["value"], each["server_cpu"]
            lines.append(
                f"| {title} | {_heading(name.partition(' / ')[2])} | "
                f"{'' if value is None else f'{value:.2f}x'} | "
                f"{'' if cpu is None else f'{cpu:.2f}x'} |"
            )
        lines.append("")
    if "pyro" in record:
        lines += [_pyro(record["pyro"]), ""]
    if "nats" in record:
        lines += [_nats(record["nats"]), ""]
    if record["bars"]:
        lines += ["| SPEC section 6 bar | measured | bar | met |", "|---|---|---|---|"]
        for bar in record["bars"]:
            word = "at least" if bar["at_least"] else "at most"
            unit = bar["unit"]
            if unit == "x":
                measured, limit = f"{bar['measured']:.2f}x", f"{bar['limit']:.2f}x"
            elif unit == "us":
                measured, limit = f"{bar['measured']:+.2f} us", f"{bar['limit']:+.2f} us"
            else:
                measured, limit = f"{bar['measured']:,.0f} {unit}", f"{bar['limit']:,.0f} {unit}"
            met = "yes" if bar["met"] else "**no**"
            lines.append(f"| {bar['name']} | {measured} | {word} {limit} | {met} |")
    return "\n".join(lines)


def main() -> None:
    """Print the Markdown for the record named on the command line."""
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m bench.report bench/results/RUN.json")
    print(render(json.loads(Path(sys.argv[1]).read_text())))


if __name__ == "__main__":
    main()
