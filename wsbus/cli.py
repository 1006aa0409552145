"""The ``wsbus`` command line.

This release has ``wsbus --version``; ``demo``, ``serve``, ``bus`` and ``service`` arrive
with the WebSocket and Pyro adapters.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ._version import __version__

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser for ``wsbus``."""
    parser = argparse.ArgumentParser(
        prog="wsbus",
        description=(
            "A WebSocket gateway between clients and internal services over a message bus."
        ),
    )
    parser.add_argument("--version", action="version", version=f"wsbus {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    parser.parse_args(argv)
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
