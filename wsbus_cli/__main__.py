"""Run the command line with ``python -m wsbus``."""

from .cli import main

raise SystemExit(main())
