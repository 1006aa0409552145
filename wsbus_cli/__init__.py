"""The ``wsbus`` command: the composition root that puts the core and its adapters together.

Nothing in :mod:`wsbus` (the core) imports this package; it imports the core's public API and
finds the buses and edges through entry points (see :mod:`wsbus_cli.adapters`).

- :mod:`wsbus_cli.cli`: the command line (``wsbus`` or ``python -m wsbus_cli``).
- :mod:`wsbus_cli.config`: the settings file (``wsbus.toml``), its sections and flags.
- :mod:`wsbus_cli.demo`, :mod:`wsbus_cli.demo_services`: ``wsbus demo``, its services and page.
- :mod:`wsbus_cli.supervisor`: child processes (name server, bus, services), started and ended
  by their own process ids.
"""
