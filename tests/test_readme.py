"""The README's example runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def test_readme_example_runs() -> None:
    [example] = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    result = subprocess.run(
        [sys.executable, "-c", example], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "'type': 'wsbus.welcome'" in lines[0]
    assert "'type': 'wsbus.ack'" in lines[1]
    assert "'content': {'hello': 'world'}" in lines[2] and "'reply_to': '1'" in lines[2]
