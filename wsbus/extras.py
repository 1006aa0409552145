"""Optional extras: an adapter package whose transport is imported on first use.

An adapter package (``wsbus_websockets``, ``wsbus_pyro``, or one in another distribution)
puts ``__getattr__ = lazy_exports(...)`` in its ``__init__``: importing the package then costs
nothing, and the first use of a name imports its module, or fails with
:class:`~wsbus.errors.MissingExtra` (``pip install 'wsbus[pyro]'``) when the transport is not
installed.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from .errors import MissingExtra

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, where: Mapping[str, str], requires: str, extra: str
) -> Callable[[str], Any]:
    """Return a module ``__getattr__`` that imports ``package.<where[name]>`` on first use.

    For example, in an adapter package's ``__init__``::

        __getattr__ = lazy_exports(__name__, {"PyroBus": "bus"}, "Pyro5", "pyro")

    Args:
        package: the adapter package's name.
        where: each exported name and the submodule that defines it.
        requires: the third-party module the extra provides (``websockets``, ``Pyro5``).
        extra: the extra to name in the error when it is missing.
    """

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        try:
            importlib.import_module(requires)
        except ImportError as exc:
            raise MissingExtra(extra) from exc
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    return __getattr__
