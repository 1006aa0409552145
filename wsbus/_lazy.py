"""Lazy exports for the adapter packages: their transport is imported on first use."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from .errors import MissingExtra


def lazy_exports(
    package: str, where: Mapping[str, str], requires: str, extra: str
) -> Callable[[str], Any]:
    """Return a module ``__getattr__`` that imports ``package.<where[name]>`` on first use.

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
