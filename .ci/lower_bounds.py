"""Print a pip constraints file that pins every direct dependency at its declared minimum.

CI installs the project with it to prove that the lower bounds in pyproject.toml really
work. Every requirement must declare a lower bound (``name>=X``): one without is an error,
since nothing would say which oldest release we promise to support.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(.*)$")
_LOWER = re.compile(r">=\s*([0-9][^,;\s]*)")


def main() -> int:
    """Write the constraints to stdout; exit 1 naming any requirement without a lower bound."""
    pyproject = tomllib.loads(Path(__file__).parent.parent.joinpath("pyproject.toml").read_text())
    project = pyproject["project"]
    requirements = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        requirements.extend(extra)
    pins: dict[str, str] = {}
    missing: list[str] = []
    for requirement in requirements:
        match = _REQUIREMENT.match(requirement)
        if match is None:
            missing.append(requirement)
            continue
        name, rest = match.group(1), match.group(2)
        if name.lower() == project["name"].lower():
            continue  # an extra that gathers others
        lower = _LOWER.search(rest)
        if lower is None:
            missing.append(requirement)
            continue
        pins[name.lower()] = lower.group(1)
    if missing:
        print("requirements without a lower bound: " + ", ".join(missing), file=sys.stderr)
        return 1
    for name, version in sorted(pins.items()):
        print(f"{name}=={version}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
