"""The event loop ``wsbus serve`` and ``wsbus demo`` run on: asyncio's own, or uvloop.

uvloop (``pip install 'wsbus[uvloop]'``) is a drop-in event loop built on libuv; where it
helps and by how much is measured in docs/performance.md. It is chosen with ``--loop
uvloop`` or ``loop = "uvloop"`` in the ``[serve]`` table, and run through the standard
library's :class:`asyncio.Runner` with uvloop's documented ``uvloop.new_event_loop`` as the
loop factory: no event loop policy is installed, so nothing else in the process changes.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable, Coroutine
from typing import Any, Final, Literal, TypeVar, get_args

from wsbus.errors import ConfigError

__all__ = ["LOOPS", "LoopName", "check_loop", "loop_factory", "run"]

T = TypeVar("T")

LoopName = Literal["asyncio", "uvloop"]
"""The event loops wsbus can run on."""

LOOPS: Final[tuple[str, ...]] = get_args(LoopName)
"""Their names, for ``--loop``'s choices."""

_EXTRA: Final = "uvloop"


def _missing(setting: str) -> ConfigError:
    return ConfigError(
        f"{setting}: the uvloop event loop is not installed: pip install 'wsbus[{_EXTRA}]' "
        "(or choose asyncio, the default)"
    )


def check_loop(name: str, setting: str = "serve.loop") -> None:
    """Refuse an event loop that is not installed, without importing it.

    Args:
        name: ``asyncio`` or ``uvloop``.
        setting: how the user chose it (``--loop``, ``serve.loop (in wsbus.toml)``), named
            in the error.

    Raises:
        ConfigError: ``uvloop`` was chosen and is not installed (the message says what to
            install), or the name is not one of :data:`LOOPS`.
    """
    if name not in LOOPS:
        raise ConfigError(f"{setting} {name!r}: choose one of {', '.join(LOOPS)}")
    # find_spec is None, not an exception, for a module that is absent (or blocked with
    # sys.modules["uvloop"] = None).
    if name == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise _missing(setting)


def loop_factory(
    name: str, setting: str = "serve.loop"
) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """Return the loop factory for :class:`asyncio.Runner`: None for asyncio's own loop.

    Raises:
        ConfigError: as :func:`check_loop`.
    """
    check_loop(name, setting)
    if name == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        raise _missing(setting) from None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, T], loop: str, setting: str = "serve.loop") -> T:
    """Run ``main`` to its end on a new event loop of the kind named, as ``asyncio.run`` does.

    Args:
        main: the coroutine to run.
        loop: ``asyncio`` or ``uvloop``.
        setting: how the user chose the loop, for the error if it is not installed.

    Raises:
        ConfigError: as :func:`check_loop` (``main`` is closed unstarted).
    """
    try:
        factory = loop_factory(loop, setting)
    except ConfigError:
        main.close()  # never awaited: no "coroutine was never awaited" warning
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
