"""Where the Pyro path's one-way latency goes: ``python -m bench.trace_pyro [--rounds 300]``.

Runs the Pyro deployment of ``python -m bench pyro`` with every process instrumented
(``bench/_trace/sitecustomize.py``), sends ``bench.stamp`` requests one at a time, and
prints the median time, from the service's ``ctx.send``, at which a message passed each
point on its way to the client.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _report(directory: Path) -> None:
    passed: dict[str, dict[str, float]] = defaultdict(dict)
    for log in directory.glob("*.log"):
        for line in log.read_text().splitlines():
            label, stamp, key = line.rsplit(" ", 2)
            passed[key][label] = float(stamp)
    delays: dict[str, list[float]] = defaultdict(list)
    for key, points in passed.items():
        for label, at in points.items():
            delays[label].append((at - float(key)) * 1000)
    print("\nmedian ms after the service's ctx.send (one message at a time):")
    rows = sorted((statistics.median(v), label, len(v)) for label, v in delays.items())
    for median, label, count in rows:
        print(f"  {median:7.3f}  {label}  (n={count})")


async def main() -> None:
    """Run the traced deployment and print where the time goes."""
    parser = argparse.ArgumentParser(prog="python -m bench.trace_pyro")
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        os.environ["WSBUS_TRACE_DIR"] = directory
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [str(HERE / "_trace"), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        from bench import pyro

        _rate, p50, p99, *_ = await pyro.wsbus_pyro(2000, args.rounds)
        print(f"one-way p50 {p50:.3f} ms, p99 {p99:.3f} ms, measured at the client")
        _report(Path(directory))


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
