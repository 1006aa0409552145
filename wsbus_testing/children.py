"""Real ``python -m wsbus`` child processes for tests (see :mod:`wsbus.processes`)."""

from wsbus.processes import Child, free_port

__all__ = ["Child", "free_port"]
