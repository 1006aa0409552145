"""The wsbus command line."""

from __future__ import annotations

import subprocess
import sys

import pytest

import wsbus
from wsbus.cli import main


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"wsbus {wsbus.__version__}"


def test_console_script_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "wsbus", "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0
    assert result.stdout.startswith("wsbus ")
