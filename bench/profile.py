"""Where the gateway's time goes under ingest: ``python -m bench.profile ingest``.

    python -m bench.profile ingest [--clients 10] [--frames 20000] [--edge websockets]
                                   [--loop asyncio] [--top 25] [--stats PATH]

A wsbus gateway runs in this process, as ``python -m bench``'s wsbus server runs it (the
in-memory bus with a service that counts, at the default settings but the raised rate
limit: :func:`bench.servers.wsbus_settings`). The load runs in a child process (the bench's
minimal clients: every client sends its frames as fast as it can), so that what is profiled
is the gateway alone. The standard library's ``cProfile`` records this process's event loop
thread from the moment every client is connected until the service has counted the last
frame; the summary is printed as text:

- the functions with the most **self time** (time in the function's own code, not in what
  it calls), every library included: where the CPU goes;
- the functions with the most **cumulative time** (their own and what they call);
- wsbus's own functions by cumulative time: the ingest path, from the edge's reader to the
  service's handler.

Times are the profiler's: ``cProfile`` adds a cost to every call, so a function that makes
many small calls looks dearer than it is, and the total is several times what the same
load costs unprofiled (``python -m bench ingest`` measures that). Compare two profiles taken
the same way (before and after a change), not a profile with a benchmark. ``--stats PATH``
also writes the raw statistics (``pstats``) for other viewers.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import platform
import pstats
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WSBUS_PACKAGES = ("wsbus", "wsbus_websockets", "wsbus_picows", "wsbus_cli")
"""The packages whose functions make wsbus's own section of the summary."""

# A profile row, by (file, line, function): primitive calls, calls, self s, cumulative s,
# callers.
_Row = tuple[int, int, float, float, Any]


def _options(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.profile", description=__doc__.split("\n")[0]
    )
    parser.add_argument("which", choices=("ingest",), help="the load to profile")
    parser.add_argument("--clients", type=int, default=10, help="connections sending (10)")
    parser.add_argument("--frames", type=int, default=20_000, help="frames in all (20000)")
    parser.add_argument(
        "--edge", choices=("websockets", "picows"), default="websockets", help="(websockets)"
    )
    parser.add_argument(
        "--loop", choices=("asyncio", "uvloop"), default="asyncio", help="the event loop (asyncio)"
    )
    parser.add_argument("--top", type=int, default=25, help="rows in each table (25)")
    parser.add_argument(
        "--stats", metavar="PATH", default=None, help="also write the raw pstats data here"
    )
    parser.add_argument("--load", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# -- the load: a child process ------------------------------------------------------------


async def _load(port: int, clients: int, frames: int) -> None:
    """Connect ``clients``, say so, wait for ``go``, send ``frames`` each, wait for done."""
    from bench.__main__ import _connect, _message, frame, send_frames

    conns = [await _connect("wsbus", port) for _ in range(clients)]
    print("connected", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    payload = frame(_message("wsbus", "bench.ingest", {"i": 1, "text": "the quick brown fox"}))
    done = [asyncio.create_task(c.until(b"bench.done")) for c in conns]

    async with asyncio.timeout(600):
        await asyncio.gather(*(send_frames(c, payload, frames) for c in conns))
        await asyncio.gather(*done)
    for conn in conns:
        conn.close()


# -- the gateway: this process ------------------------------------------------------------


async def _profile(options: argparse.Namespace) -> tuple[cProfile.Profile, dict[str, Any]]:
    from bench.servers import start_wsbus
    from wsbus_cli.supervisor import free_port

    port = free_port()
    gateway, service = await start_wsbus(port, edge=options.edge)
    each = max(1, options.frames // options.clients)
    service.target = each * options.clients
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.profile",
        "ingest",
        "--load",
        str(port),
        "--clients",
        str(options.clients),
        "--frames",
        str(each),
        "--loop",
        options.loop,
        cwd=Path.cwd(),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdin is not None and child.stdout is not None
    # cProfile's own clock (the wall clock, read cheaply): a CPU-time clock
    # (time.thread_time) would leave out the time other processes had the core, but here
    # each reading of it is a system call, which tripled the profiled process's CPU time
    # and charged it to the functions that make the most calls.
    profiler = cProfile.Profile()
    try:
        async with asyncio.timeout(120):
            line = await child.stdout.readline()
        if line.strip() != b"connected":
            raise SystemExit(f"the load generator did not connect: {line!r}")
        cpu = time.process_time()
        started = time.perf_counter()
        profiler.enable()
        child.stdin.write(b"go\n")
        async with asyncio.timeout(600):
            await service.reached.wait()
        profiler.disable()
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu
        async with asyncio.timeout(60):
            await child.wait()
    finally:
        profiler.disable()
        if child.returncode is None:
            child.kill()
            await child.wait()
        await gateway.close()
    run = {
        "frames": service.target,
        "clients": options.clients,
        "counted": service.count,
        "elapsed": elapsed,
        "cpu": cpu,
    }
    return profiler, run


def _where(path: str) -> str:
    """A function's file, short: relative to the repository or to site-packages."""
    if path.startswith("~") or path.startswith("<"):
        return path
    # The longest base first: site-packages lies inside the repository's .venv.
    for base in sorted({str(ROOT), *sys.path[1:]}, key=len, reverse=True):
        if base and path.startswith(base + os.sep):
            return path[len(base) + 1 :]
    return path


def _name(key: tuple[str, int, str]) -> str:
    path, line, function = key
    if path == "~":
        return function  # a built-in: {method 'write' of ...}
    return f"{_where(path)}:{line} {function}"


def _ours(key: tuple[str, int, str]) -> bool:
    where = _where(key[0])
    return where.split(os.sep, 1)[0] in WSBUS_PACKAGES or where.startswith("bench" + os.sep)


def _table(title: str, rows: list[tuple[tuple[str, int, str], _Row]], total: float) -> str:
    lines = [
        title,
        f"  {'calls':>10} {'self s':>8} {'self %':>7} {'cum s':>8} {'cum %':>7}  function",
    ]
    for key, (_, calls, tt, ct, _callers) in rows:
        lines.append(
            f"  {calls:>10,} {tt:8.3f} {100 * tt / total:6.1f}% {ct:8.3f} "
            f"{100 * ct / total:6.1f}%  {_name(key)}"
        )
    return "\n".join(lines)


def summary(profiler: cProfile.Profile, run: dict[str, Any], options: argparse.Namespace) -> str:
    """The profile as text: what ran, then the top frames by self and by cumulative time."""
    stats = pstats.Stats(profiler)
    rows: dict[tuple[str, int, str], _Row] = stats.stats  # type: ignore[attr-defined]
    total = sum(row[2] for row in rows.values()) or 1e-9
    frames = run["frames"]
    try:
        version = metadata.version("wsbus")
    except metadata.PackageNotFoundError:
        version = "?"
    import wsbus

    head = [
        f"python -m bench.profile {options.which}: {run['clients']} clients x "
        f"{frames // run['clients']} frames ({frames:,} frames), edge {options.edge}, "
        f"loop {options.loop}",
        f"wsbus {version} from {Path(wsbus.__file__).parent.parent}; "
        f"{platform.python_implementation()} {platform.python_version()}, "
        f"{os.cpu_count()} cores, load {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"profiled stretch: {run['elapsed']:.2f} s, gateway process CPU {run['cpu']:.2f} s "
        f"({run['cpu'] / frames * 1e6:.1f} us per frame under the profiler), "
        f"{total:.2f} s in profiled functions; {run['counted']:,} frames counted",
        "times are cProfile's (it slows every call): compare profiles, not benchmarks",
    ]
    by_self = sorted(rows.items(), key=lambda item: item[1][2], reverse=True)
    by_cumulative = sorted(rows.items(), key=lambda item: item[1][3], reverse=True)
    ours = [item for item in by_cumulative if _ours(item[0])]
    top = options.top
    return "\n\n".join(
        [
            "\n".join(head),
            _table(f"top {top} by self time (% of {total:.2f} s)", by_self[:top], total),
            _table(f"top {top} by cumulative time", by_cumulative[:top], total),
            _table(f"wsbus's own functions, top {top} by cumulative time", ours[:top], total),
        ]
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Profile the load named on the command line and print the summary."""
    options = _options(argv)
    loop_factory = None
    if options.loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            raise SystemExit("--loop uvloop needs uvloop: pip install 'wsbus[uvloop]'") from None
        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        if options.load is not None:
            runner.run(_load(options.load, options.clients, options.frames))
            return
        profiler, run = runner.run(_profile(options))
    if options.stats:
        profiler.dump_stats(options.stats)
    print(summary(profiler, run, options))


if __name__ == "__main__":
    main()
