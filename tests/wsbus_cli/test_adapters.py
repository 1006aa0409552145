"""Adapters found by entry point (wsbus_cli/adapters.py): a bus from another distribution.

The third-party bus here is a real distribution: a package and its ``*.dist-info`` (METADATA
and entry_points.txt) in a directory put on the PYTHONPATH of a real ``wsbus`` process, as
``pip install`` would leave them. Nothing in wsbus names it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from wsbus_cli.adapters import BusAdapter, EdgeAdapter, installed
from wsbus_cli.supervisor import Child, free_port

SCRIPT = Path(sys.executable).with_name("wsbus")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "wsbus_cli"]

ADAPTER = '''
"""An echo bus: the in-memory bus with an echo service, as a third party would ship it."""

import argparse
import contextlib

from wsbus import MemoryBus
from wsbus.service import Service, handles
from wsbus_cli.adapters import hookimpl


class Shout(Service):
    name = "shout"

    def __init__(self, suffix: str) -> None:
        super().__init__()
        self.suffix = suffix

    @handles("shout")
    async def shout(self, message, ctx):
        ctx.reply({"loud": str(message.content).upper() + self.suffix})


class EchoBus:
    name = "echobus"
    description = "an echo bus from the echobus distribution"
    section = None
    runs_services = False

    @contextlib.asynccontextmanager
    async def open(self, config, services):
        yield MemoryBus([Shout("!")])

    @contextlib.asynccontextmanager
    async def demo(self, options, services):
        yield MemoryBus([Shout(options.shout_suffix)])

    @hookimpl
    def wsbus_cli_options(self, command, parser):
        if command == "demo":
            parser.add_argument("--shout-suffix", default="!", help="what a shout ends with")

    @hookimpl
    def wsbus_cli_commands(self, commands):
        commands.add("echobus-hello", help="say hello from echobus", run=hello)


def hello(args: argparse.Namespace) -> int:
    print("hello from echobus")
    return 3


adapter = EchoBus()
'''


def _distribution(site: Path, name: str, entry_points: str, modules: dict[str, str]) -> None:
    for module, text in modules.items():
        (site / f"{module}.py").write_text(textwrap.dedent(text))
    info = site / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A directory holding the echobus distribution and a broken one."""
    site = tmp_path / "site"
    site.mkdir()
    _distribution(
        site,
        "echobus",
        "[wsbus.buses]\nechobus = echobus_adapter:adapter\n",
        {"echobus_adapter": ADAPTER},
    )
    _distribution(
        site,
        "brokenbus",
        "[wsbus.buses]\nbroken = brokenbus_adapter:adapter\nnotone = brokenbus_plain:adapter\n",
        {
            "brokenbus_adapter": "import no_such_module_for_wsbus\n",
            "brokenbus_plain": "adapter = object()\n",
        },
    )
    return site


def _env(site: Path) -> dict[str, str | None]:
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": f"{site}{os.pathsep}{path}" if path else str(site), "WSBUS_SECRET": None}


def _run(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "WSBUS_SECRET"}
    env["PYTHONPATH"] = str(_env(site)["PYTHONPATH"])
    return subprocess.run(
        [*COMMAND, *args], capture_output=True, text=True, timeout=60, check=False, env=env
    )


def _one_line(result: subprocess.CompletedProcess[str], status: int) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert result.returncode == status, result
    return lines[0]


def test_the_installed_adapters_are_found() -> None:
    found = installed()
    assert {"memory", "pyro"} <= set(found.buses)
    assert "websockets" in found.edges
    for name, bus in found.buses.items():
        assert isinstance(bus, BusAdapter) and bus.name == name and bus.description
    for name, edge in found.edges.items():
        assert isinstance(edge, EdgeAdapter) and edge.name == name and edge.description


def test_the_adapters_entry_point_modules_import_no_transport() -> None:
    code = (
        "import sys; from wsbus_cli.adapters import installed; found = installed();"
        "assert not found.broken, found.broken;"
        "loaded = {m.partition('.')[0] for m in sys.modules};"
        "assert not loaded & {'websockets', 'Pyro5'}, sorted(loaded)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_third_party_bus_is_in_the_help(site: Path) -> None:
    result = _run(site, "--help")
    assert result.returncode == 0, result.stderr
    assert (
        "echobus" in result.stdout and "an echo bus from the echobus distribution" in result.stdout
    )
    assert "echobus-hello" in result.stdout
    # Its own subcommand runs, with its exit status.
    hello = _run(site, "echobus-hello")
    assert hello.returncode == 3 and "hello from echobus" in hello.stdout
    demo_help = _run(site, "demo", "--help")
    assert "--shout-suffix" in demo_help.stdout


async def test_wsbus_serve_runs_a_third_party_bus(site: Path) -> None:
    from wsbus_websockets import connect

    port = free_port()
    child = Child(
        ["serve", "--bus", "echobus", "--port", str(port)],
        ready="listening on",
        env=_env(site),
        command=COMMAND,
    )
    try:
        async with asyncio.timeout(30), connect(f"ws://127.0.0.1:{port}/") as client:
            reply = await client.request("shout", "hi")
            assert reply["content"] == {"loud": "HI!"}
    finally:
        assert child.stop() == 0, child.text


async def test_wsbus_demo_runs_a_third_party_bus(site: Path) -> None:
    from wsbus_websockets import connect

    port = free_port()
    child = Child(
        ["demo", "--bus", "echobus", "--no-browser", "--port", str(port), "--shout-suffix", "?"],
        ready="running at",
        env=_env(site),
        command=COMMAND,
        timeout=30,
    )
    try:
        assert "bus: echobus" in child.text
        async with asyncio.timeout(30), connect(f"ws://127.0.0.1:{port}/") as client:
            reply = await client.request("shout", "hi")
            assert reply["content"] == {"loud": "HI?"}
    finally:
        assert child.stop() == 0, child.text


@pytest.mark.parametrize("command", ["serve", "demo"])
def test_an_unknown_bus_lists_the_installed_ones(site: Path, command: str) -> None:
    line = _one_line(_run(site, command, "--bus", "nosuch", "--port", "0"), 2)
    assert "'nosuch'" in line and "no such bus" in line
    assert "memory" in line and "pyro" in line and "echobus" in line


def test_an_unknown_bus_in_the_settings_file_names_the_file(site: Path, tmp_path: Path) -> None:
    path = tmp_path / "wsbus.toml"
    path.write_text('[serve]\nbus = "nosuch"\n')
    line = _one_line(_run(site, "config", "check", str(path)), 2)
    assert "serve.bus" in line and str(path) in line and "installed: " in line


def test_a_broken_entry_point_names_its_distribution_and_what_to_do(site: Path) -> None:
    line = _one_line(_run(site, "serve", "--bus", "broken", "--port", "0"), 2)
    assert "brokenbus 1.0" in line and "no_such_module_for_wsbus" in line
    assert "pip uninstall brokenbus" in line
    line = _one_line(_run(site, "serve", "--bus", "notone", "--port", "0"), 2)
    assert "brokenbus 1.0" in line and "not a BusAdapter" in line
    # The others still work, and the help says which are broken.
    result = _run(site, "--help")
    assert result.returncode == 0 and "Traceback" not in result.stderr
    assert "broken adapters" in result.stdout and "brokenbus" in result.stdout


def _without(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the command line in a process where ``module`` cannot be imported (not installed)."""
    code = (
        f"import sys; sys.modules[{module!r}] = None; from wsbus_cli.cli import main; "
        f"raise SystemExit(main({list(args)!r}))"
    )
    env = {k: v for k, v in os.environ.items() if k != "WSBUS_SECRET"}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )


def test_a_missing_extra_costs_nothing_until_used_then_says_what_to_install(
    tmp_path: Path,
) -> None:
    # Without Pyro5: the help still lists the Pyro bus and its commands...
    result = _without("Pyro5", "--help")
    assert result.returncode == 0, result.stderr
    assert "pyro" in result.stdout and "nameserver" in result.stdout
    # ... a memory-bus settings file checks fine...
    path = tmp_path / "wsbus.toml"
    path.write_text('[serve]\nbus = "memory"\n')
    assert _without("Pyro5", "config", "check", str(path)).returncode == 0
    # ... and using the Pyro bus says what to install, on one line.
    for args in (["serve", "--bus", "pyro", "--port", "0"], ["bus"], ["nameserver"]):
        line = _one_line(_without("Pyro5", *args), 2)
        assert "pip install 'wsbus[pyro]'" in line, args
    # Without websockets, the WebSocket edge says the same of its extra.
    line = _one_line(_without("websockets", "serve", "--port", "0"), 2)
    assert "pip install 'wsbus[websockets]'" in line


FAULTY = '''
"""Adapters with a mistake in their hooks, as a third party might ship them."""

import contextlib

from wsbus import MemoryBus
from wsbus_cli.adapters import hookimpl


class Bus:
    description = "a bus whose hooks are wrong"
    section = None
    runs_services = False

    def __init__(self, name):
        self.name = name

    @contextlib.asynccontextmanager
    async def open(self, config, services):
        yield MemoryBus([])

    @contextlib.asynccontextmanager
    async def demo(self, options, services):
        yield MemoryBus([])


class TakesNode(Bus):
    @hookimpl
    def wsbus_cli_options(self, command, parser):
        # Its own option first: the parser it was added to is dropped with the adapter.
        parser.add_argument("--takesnode-level", default=1)
        if command == "serve":
            parser.add_argument("--node", help="wsbus serve has this one already")


class BadSignature(Bus):
    @hookimpl
    def wsbus_cli_options(self, command, parser, colour):
        parser.add_argument("--badsig-colour")


takes_node = TakesNode("takesnode")
bad_signature = BadSignature("badsig")
'''


@pytest.fixture
def faulty_site(site: Path) -> Path:
    """The ``site`` distributions, a faulty one, and echobus's adapter named twice."""
    _distribution(
        site,
        "faultybus",
        "[wsbus.buses]\ntakesnode = faulty_adapter:takes_node\n"
        "badsig = faulty_adapter:bad_signature\n",
        {"faulty_adapter": FAULTY},
    )
    # The same object under a second name: registered (so its hooks called) once.
    _distribution(site, "echoalias", "[wsbus.buses]\necho2 = echobus_adapter:adapter\n", {})
    return site


def test_an_adapter_whose_hooks_fail_is_set_aside_and_the_command_works(
    faulty_site: Path,
) -> None:
    result = _run(faulty_site, "--help")
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 0, result.stderr
    broken = result.stdout.partition("broken adapters")[2]
    for name, what in (("'takesnode'", "--node"), ("'badsig'", "colour")):
        line = next(line for line in broken.splitlines() if name in line)
        assert "faultybus 1.0" in line and what in line, line
        assert "pip uninstall faultybus" in line and "report it to its authors" in line, line
    # The other adapters keep working: their buses, options and subcommands are there.
    assert "echobus" in result.stdout and "echobus-hello" in result.stdout
    for args in (["serve", "--help"], ["demo", "--help"]):
        help_ = _run(faulty_site, *args)
        assert help_.returncode == 0 and "Traceback" not in help_.stderr, help_.stderr
        assert "--node" in help_.stdout or args[0] == "demo"
        assert "--takesnode-level" not in help_.stdout and "--badsig" not in help_.stdout
    assert "--shout-suffix" in help_.stdout  # demo's, once though two names load echobus
    # Using a set-aside adapter says what is wrong with it, on one line.
    line = _one_line(_run(faulty_site, "serve", "--bus", "takesnode", "--port", "0"), 2)
    assert "faultybus 1.0" in line and "--node" in line


async def test_wsbus_serve_runs_beside_an_adapter_whose_hooks_fail(faulty_site: Path) -> None:
    from wsbus_websockets import connect

    port = free_port()
    child = Child(
        ["serve", "--bus", "memory", "--node", "n1", "--port", str(port)],
        ready="listening on",
        env=_env(faulty_site),
        command=COMMAND,
    )
    try:
        async with asyncio.timeout(30), connect(f"ws://127.0.0.1:{port}/") as client:
            assert client.conn_id is not None and client.conn_id.startswith("n1")
    finally:
        assert child.stop() == 0, child.text
        assert "Traceback" not in child.text, child.text
