"""Run the command line with ``python -m wsbus_cli``."""

from .cli import main

raise SystemExit(main())
