"""The event loop of ``wsbus serve`` and ``wsbus demo``: wsbus_cli/loops.py, and the CLI using it.

A real ``wsbus serve`` process on uvloop serves a real WebSocket client on 127.0.0.1 (skipped
when uvloop is not installed); without uvloop, choosing it is one line naming the setting
and the extra to install. "Not installed" is made with ``sys.modules["uvloop"] = None``,
Python's own way of blocking an import.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest

from wsbus.errors import ConfigError
from wsbus_cli.cli import main
from wsbus_cli.config import load_settings
from wsbus_cli.loops import LOOPS, check_loop, loop_factory
from wsbus_cli.supervisor import Child, free_port

SCRIPT = Path(sys.executable).with_name("wsbus")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "wsbus_cli"]
HAS_UVLOOP = importlib.util.find_spec("uvloop") is not None
EXTRA = "pip install 'wsbus[uvloop]'"

# A service that tells which event loop runs it: the proof, from the client's side, that
# the gateway's process runs on the loop chosen.
WHICH = """
import asyncio

from wsbus import Service, handles

class Which(Service):
    name = "which"

    @handles("loop.which")
    async def which(self, message, ctx):
        ctx.reply(type(asyncio.get_running_loop()).__module__.partition(".")[0])
"""


@pytest.fixture
def app(tmp_path: Path) -> Path:
    (tmp_path / "loopapp.py").write_text(textwrap.dedent(WHICH))
    return tmp_path


@pytest.fixture
def without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules: `import uvloop` raises ImportError, find_spec returns None.
    monkeypatch.setitem(sys.modules, "uvloop", None)


@pytest.mark.parametrize(
    ("flags", "table", "expected"),
    [
        pytest.param([], "", "asyncio", id="default"),
        pytest.param(["--loop", "uvloop"], "", "uvloop", id="flag"),
        pytest.param([], 'loop = "uvloop"', "uvloop", id="file"),
        pytest.param(["--loop", "asyncio"], 'loop = "uvloop"', "asyncio", id="flag-over-file"),
        pytest.param(["--edge", "picows", "--loop", "uvloop"], "", "uvloop", id="picows"),
    ],
)
async def test_serve_runs_on_the_loop_chosen(
    app: Path, flags: list[str], table: str, expected: str
) -> None:
    if expected == "uvloop" and not HAS_UVLOOP:
        pytest.skip("uvloop is not installed (pip install 'wsbus[uvloop]')")
    if "picows" in flags and importlib.util.find_spec("picows") is None:
        pytest.skip("the picows extra is not installed")
    from wsbus_websockets import connect

    settings = app / "wsbus.toml"
    settings.write_text(f'[serve]\nservices = ["loopapp:Which"]\n{table}\n')
    port = free_port()
    child = Child(
        ["serve", "--config", str(settings), "--port", str(port), *flags],
        ready="listening on",
        cwd=app,
        command=COMMAND,
    )
    try:
        async with asyncio.timeout(30), connect(f"ws://127.0.0.1:{port}/") as client:
            reply = await client.request("loop.which", None)
            assert reply["content"] == expected
            # More than one frame each way: the loop carries a conversation, not a greeting.
            for i in range(20):
                assert (await client.request("loop.which", i))["content"] == expected
    finally:
        assert child.stop() == 0, child.text
    # The websockets edge cannot put its doorman in front of uvloop's accepts: it says so.
    warned = "runs without its doorman" in child.text
    assert warned == (expected == "uvloop" and "picows" not in flags), child.text


def test_choosing_uvloop_without_it_names_the_flag_and_the_extra(
    without_uvloop: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--loop", "uvloop", "--port", "0"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("wsbus serve: --loop: ") and EXTRA in line, line


def test_choosing_uvloop_in_a_file_without_it_names_the_setting_and_the_file(
    without_uvloop: None, tmp_path: Path
) -> None:
    path = tmp_path / "wsbus.toml"
    path.write_text('[serve]\nloop = "uvloop"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ={})
    assert str(info.value).startswith(f"serve.loop (in {path}): ")
    assert EXTRA in str(info.value)


def test_the_demo_without_uvloop_names_its_flag(
    without_uvloop: None, capsys: pytest.CaptureFixture[str]
) -> None:
    # Refused before anything starts: no bus, no port, no browser.
    assert main(["demo", "--bus", "memory", "--loop", "uvloop", "--no-browser"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("wsbus demo: --loop: ") and EXTRA in line, line


def test_a_loop_wsbus_does_not_know_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "wsbus.toml"
    path.write_text('[serve]\nloop = "trio"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ={})
    assert "serve.loop" in str(info.value) and '"asyncio", "uvloop"' in str(info.value)
    with pytest.raises(ConfigError, match="choose one of asyncio, uvloop"):
        check_loop("trio", "--loop")


def test_the_loop_factories() -> None:
    assert LOOPS == ("asyncio", "uvloop")
    assert loop_factory("asyncio") is None  # asyncio.Runner's own default
    if HAS_UVLOOP:
        import uvloop

        assert loop_factory("uvloop") is uvloop.new_event_loop
