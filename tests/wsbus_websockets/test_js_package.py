"""The JavaScript client's npm package (wsbus_websockets/js), from the README's test command.

Its own tests run with Node's test runner against real gateways (``python -m wsbus_cli
serve`` processes, with this Python), and its TypeScript declarations check with ``tsc
--noEmit``. ``npm ci`` installs the package's dev dependencies first, unless the
``node_modules`` installed from the same lock file is there already. Skipped only where
Node or npm is missing.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

import wsbus
from wsbus_cli.demo import static_dir

ROOT = Path(__file__).parents[2]
JS = ROOT / "wsbus_websockets" / "js"
NEEDS = (
    "the JavaScript client's package tests need Node 18 or later and npm on PATH "
    "(Debian: apt-get install nodejs npm)"
)


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.skip(NEEDS)
    return found


def _run(command: list[str], timeout: float, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``command`` in the package folder; on timeout, end its process group by its id.

    Node's test runner starts a process per test file, and those start gateways: the whole
    group goes, not only the first process.
    """
    proc = subprocess.Popen(
        command,
        cwd=JS,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the group this test started, by its id
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(command)} took over {timeout} s:\n{out[-6000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, out, None)


def _installed() -> bool:
    """True when node_modules holds what package-lock.json names (npm's own record of it)."""
    record = JS / "node_modules" / ".package-lock.json"
    if not record.exists():
        return False
    wanted = json.loads((JS / "package-lock.json").read_text())["packages"]
    have = json.loads(record.read_text())["packages"]
    return all(
        have.get(path, {}).get("version") == entry.get("version")
        for path, entry in wanted.items()
        if path  # "" is the package itself
    )


@pytest.fixture(scope="module")
def node_modules() -> Iterator[Path]:
    """The package's dev dependencies (ws, typescript, types), installed by ``npm ci``."""
    npm = _tool("npm")
    _tool("node")
    # One install at a time: the suite runs on two workers, each may come here.
    key = hashlib.sha256(str(JS).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"wsbus-npm-ci-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _installed():
            done = _run([npm, "ci", "--no-audit", "--no-fund"], timeout=600)
            assert done.returncode == 0, f"npm ci failed in {JS}:\n{done.stdout[-6000:]}"
        yield JS / "node_modules"


def test_node_tests_pass_against_real_gateways(node_modules: Path) -> None:
    node = _tool("node")
    done = _run([node, "--test", "--test-reporter=tap"], timeout=600, WSBUS_PYTHON=sys.executable)
    report = done.stdout
    assert done.returncode == 0, report[-8000:]
    counts = dict(re.findall(r"^# (pass|fail|cancelled) (\d+)$", report, re.MULTILINE))
    written = sum(
        len(re.findall(r"^test\(", path.read_text(), re.MULTILINE))
        for path in (JS / "test").glob("*.test.js")
    )
    assert written >= 10
    assert counts.get("fail") == "0" and counts.get("cancelled") == "0", report[-8000:]
    # Each test passed (Node 18 and 20 also count each file as one).
    assert int(counts["pass"]) >= written, report[-8000:]


def test_typescript_declarations_check_and_catch_wrong_uses(node_modules: Path) -> None:
    # tsc fails on an unused @ts-expect-error too: each wrong use in the files is an error.
    npm = _tool("npm")
    done = _run([npm, "run", "--silent", "typecheck"], timeout=300)
    assert done.returncode == 0, done.stdout[-8000:]


def _semver(version: str) -> str:
    """wsbus's PEP 440 version as npm writes it: 0.1.0.dev0 -> 0.1.0-dev.0."""
    match = re.fullmatch(r"(\d+\.\d+\.\d+)(?:\.dev(\d+))?", version)
    assert match, f"no npm form known for {version}"
    release, dev = match.groups()
    return release if dev is None else f"{release}-dev.{dev}"


def test_the_npm_package_and_the_wheel_ship_the_same_client() -> None:
    package = json.loads((JS / "package.json").read_text())
    assert package["name"] == "wsbus-client"
    assert package["version"] == _semver(wsbus.__version__)
    assert package["type"] == "module"
    assert package["exports"]["."] == {"types": "./wsbus.d.ts", "default": "./wsbus.js"}
    assert package["engines"] == {"node": ">=18"}
    assert package["license"] == "MIT"
    # The wheel ships what npm publishes (package.json and README.md npm adds by itself),
    # and nothing of node_modules or the tests.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    shipped = pyproject["tool"]["setuptools"]["package-data"]["wsbus_websockets.js"]
    assert sorted(shipped) == sorted({*package["files"], "package.json", "README.md"})
    for name in shipped:
        assert (JS / name).is_file(), name
    # The demo page loads the same file the package exports.
    with static_dir() as served:
        assert (served / "wsbus.js").read_bytes() == (JS / "wsbus.js").read_bytes()
