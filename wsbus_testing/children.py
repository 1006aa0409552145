"""Real ``python -m wsbus_cli`` child processes for tests (see :mod:`wsbus_cli.supervisor`)."""

from wsbus_cli.supervisor import Child, free_port

__all__ = ["Child", "free_port"]
