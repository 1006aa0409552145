"""The wsbus command line, run as a user runs it: the real script in a subprocess.

A mistake a user can fix gets one line on stderr naming what was wrong and what to do, exit
status 2 for a wrong argument or setting, 1 for a failure at run time, and no traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import wsbus
from wsbus_cli.cli import main
from wsbus_cli.supervisor import Child, free_port

# The installed console script: unlike `python -m`, it does not put the current directory on
# the import path, which is what --app-dir is about.
SCRIPT = Path(sys.executable).with_name("wsbus")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "wsbus_cli"]


def run(
    *args: str, cwd: Path | None = None, env: dict[str, str | None] | None = None
) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "WSBUS_SECRET"}
    for name, value in (env or {}).items():
        if value is None:
            environment.pop(name, None)
        else:
            environment[name] = value
    return subprocess.run(
        [*COMMAND, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=cwd,
        env=environment,
    )


def one_line(result: subprocess.CompletedProcess[str], status: int) -> str:
    """Assert the exit status and a one-line error without a traceback; return the line."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert result.returncode == status, result
    return lines[0]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"wsbus {wsbus.__version__}"


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["demo", "--frobnicate"], "wsbus demo: unrecognized arguments: --frobnicate"),
        (["serve", "--edge", "websockets", "-x"], "wsbus serve: unrecognized arguments: -x"),
        (["--frob"], "wsbus: unrecognized arguments: --frob"),
    ],
)
def test_an_unknown_option_sends_the_user_to_its_commands_help(
    argv: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    command = said.partition(":")[0]
    assert err == f"{said} (see `{command} --help`)", err


def test_console_script_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "wsbus_cli", "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0
    assert result.stdout.startswith("wsbus ")


# -- usage errors: status 2 ---------------------------------------------------------------

MISSPELLED = """
from wsbus import hookimpl

@hookimpl
def wsbus_authentcate(request):
    return None
"""

WRONG_ARGUMENT = """
from wsbus import hookimpl

class Shouty:
    @hookimpl
    def wsbus_authorize(self, client, msg):
        return None
"""

RAISES_ON_IMPORT = """
raise RuntimeError("the plugin's settings are missing")
"""


@pytest.fixture
def plugins(tmp_path: Path) -> Path:
    for name, text in [
        ("misspelled", MISSPELLED),
        ("wrongarg", WRONG_ARGUMENT),
        ("broken", RAISES_ON_IMPORT),
    ]:
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(text))
    return tmp_path


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["serve", "--plugin", "nosuch"], ["--plugin nosuch", "no module named 'nosuch'"]),
        (["serve", "--port", "70000"], ["--port", "70000", "0-65535"]),
        (["serve", "--port", "-1"], ["--port", "-1", "0-65535"]),
        (["demo", "--port", "65536"], ["--port", "65536", "0-65535"]),
        (["serve", "--node", "bad node!"], ["--node", "'bad node!'", "A-Z a-z 0-9 _ -"]),
        (["serve", "--rate", "fast"], ["--rate", "'fast'", "not a number"]),
        (["serve", "--rate", "0"], ["--rate", "must be more than 0"]),
        (["serve", "--static", "/no/such/dir"], ["static_dir", "/no/such/dir"]),
        (
            ["service", "wsbus_cli.demo_services:Nope"],
            ["wsbus_cli.demo_services:Nope", "has no 'Nope'", "Chat, Echo"],
        ),
        (["service", "wsbus_cli.demo_services:re"], ["re is a module", "not a wsbus.Service"]),
        (["service", "wsbus_cli.demo_services"], ["expected MODULE:CLASS"]),
        (["service", "nosuch.mod:Todo"], ["no module named 'nosuch'", "--app-dir"]),
        (["serve", "--service", "x:Y", "--bus", "pyro"], ["--service", 'bus = "memory"']),
        (["serve", "--plugin", "misspelled"], ["wsbus_authentcate", "wsbus_authenticate?"]),
        (["serve", "--plugin", "wrongarg:Shouty"], ["wsbus_authorize", "'msg'", "client, message"]),
        (["serve", "--plugin", "broken"], ["RuntimeError", "settings are missing", "--debug"]),
        (["config", "check", "missing.toml"], ["missing.toml", "no such file"]),
        (["nosuchcommand"], ["invalid choice"]),
    ],
)
def test_a_wrong_argument_is_one_line_and_status_2(
    plugins: Path, args: list[str], expected: list[str]
) -> None:
    line = one_line(run(*args, cwd=plugins), 2)
    for text in expected:
        assert text in line


def test_debug_shows_the_traceback(plugins: Path) -> None:
    result = run("--debug", "serve", "--plugin", "broken", cwd=plugins)
    assert result.returncode == 2
    assert "Traceback" in result.stderr
    assert "settings are missing" in result.stderr.strip().splitlines()[-1]


# -- --app-dir: services found where the user is --------------------------------------------

TODO = """
from wsbus import Service, handles

class Todo(Service):
    name = "todo"

    @handles("todo.add")
    async def add(self, message, ctx):
        ctx.reply({"added": message.content})
"""


@pytest.fixture
def app(tmp_path: Path) -> Path:
    package = tmp_path / "myapp"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "todo.py").write_text(textwrap.dedent(TODO))
    return tmp_path


async def test_serve_finds_a_service_in_the_current_directory(app: Path) -> None:
    import asyncio

    from wsbus_websockets import connect

    port = free_port()
    child = Child(
        ["serve", "--service", "myapp.todo:Todo", "--port", str(port)],
        ready="listening on",
        cwd=app,
        command=COMMAND,
    )
    try:
        async with asyncio.timeout(30), connect(f"ws://127.0.0.1:{port}/") as client:
            reply = await client.request("todo.add", "milk")
            assert reply["content"] == {"added": "milk"}
    finally:
        assert child.stop() == 0, child.text


def test_app_dir_names_another_directory(
    app: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    # From elsewhere the module is not found, and the message says how to fix it...
    line = one_line(run("service", "myapp.todo:Todo", "--ns-port", "1", cwd=elsewhere), 2)
    assert "no module named 'myapp'" in line and "--app-dir" in line
    # ...and with --app-dir it is: the next problem is the missing name server (status 1).
    result = run(
        "service", "myapp.todo:Todo", "--app-dir", str(app), "--ns-port", "1", cwd=elsewhere
    )
    assert "name server" in one_line(result, 1)


# -- run-time failures: status 1, and three different messages -------------------------------


class Deployment:
    def __init__(self, ns_port: int, secret: str) -> None:
        self.ns_port = ns_port
        self.secret = secret
        self.children: list[Child] = []


@pytest.fixture(scope="module")
def deployment() -> Iterator[Deployment]:
    ns_port = free_port()
    deployment = Deployment(ns_port, "the-deployment-secret")
    env: dict[str, str | None] = {"WSBUS_SECRET": deployment.secret}
    try:
        deployment.children.append(Child(["nameserver", "--ns-port", str(ns_port)], env=env))
        yield deployment
    finally:
        for child in reversed(deployment.children):
            child.stop()


def test_no_name_server_no_bus_and_a_wrong_secret_are_three_messages(
    deployment: Deployment, app: Path
) -> None:
    nowhere = str(free_port())
    no_ns = one_line(run("service", "myapp.todo:Todo", "--ns-port", nowhere, cwd=app), 1)
    assert "no Pyro name server" in no_ns and nowhere in no_ns and "wsbus nameserver" in no_ns

    ns_port = str(deployment.ns_port)
    shared: dict[str, str | None] = {"WSBUS_SECRET": deployment.secret}
    no_bus = one_line(
        run("service", "myapp.todo:Todo", "--ns-port", ns_port, cwd=app, env=shared), 1
    )
    assert "knows no message bus" in no_bus and "wsbus bus" in no_bus

    deployment.children.append(
        Child(["bus", "--ns-port", ns_port], env={"WSBUS_SECRET": deployment.secret})
    )
    for secret in (None, "a-wrong-secret"):
        result = run(
            "service",
            "myapp.todo:Todo",
            "--ns-port",
            ns_port,
            cwd=app,
            env={"WSBUS_SECRET": secret},
        )
        wrong = one_line(result, 1)
        assert "do not share a secret" in wrong and "WSBUS_SECRET" in wrong
        assert deployment.secret not in wrong and "a-wrong-secret" not in wrong
    gateway = one_line(run("serve", "--bus", "pyro", "--ns-port", ns_port, "--port", "0"), 1)
    assert "do not share a secret" in gateway

    # With the right secret, `wsbus service` from the directory holding myapp/ works.
    service = Child(
        ["service", "myapp.todo:Todo", "--ns-port", ns_port],
        env={"WSBUS_SECRET": deployment.secret},
        cwd=app,
        command=COMMAND,
    )
    assert service.stop() == 0, service.text


def test_a_port_in_use_is_one_line_and_status_1() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        line = one_line(run("serve", "--port", port), 1)
    assert f"127.0.0.1:{port}" in line and "--port" in line


def test_flag_settings_are_the_parsed_commands_own() -> None:
    # serve lays its own flags and the adapters' dotted ones over the settings file; demo
    # has --ns-port too, but not as a setting (its dest is not dotted).
    from wsbus_cli.cli import build_parser, flag_settings

    parser = build_parser()
    serve = flag_settings(parser.parse_args(["serve"]))
    assert serve["pyro.ns_port"] == ("pyro.ns_port", "--ns-port")
    assert serve["websockets.allowed_origins"] == ("websockets.allowed_origins", "--origin")
    assert serve["allow_anonymous"] == ("gateway.allow_anonymous", "--no-anonymous")
    demo = flag_settings(parser.parse_args(["demo"]))
    assert set(demo) == {"bus", "host", "port", "loop"}


def test_an_adapter_option_its_section_does_not_name_still_sets_its_setting() -> None:
    # A third-party adapter's dotted dest is a setting even when its section names no flag:
    # errors then call it by the setting.
    import argparse

    from wsbus_cli.cli import flag_settings

    args = argparse.Namespace(**{"thirdparty.level": 3, "pyro.ns_port": None, "verbose": 0})
    assert flag_settings(args) == {
        "thirdparty.level": ("thirdparty.level", "thirdparty.level"),
        "pyro.ns_port": ("pyro.ns_port", "--ns-port"),
    }
