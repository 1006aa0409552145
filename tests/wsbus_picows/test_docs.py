"""docs/picows.md's example runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "picows.md"


def test_the_example_runs() -> None:
    [example] = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    result = subprocess.run(
        [sys.executable, "-c", example], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["hi"]
