"""Running a coroutine from a synchronous test (a Hypothesis test, say)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run_in_own_loop(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` to its end on a loop of its own, closed here; return its result.

    Not ``asyncio.run()``: it clears the thread's current loop, and some pytest-asyncio
    releases (0.24, the declared minimum, among them) leave an unclosed loop there after
    an async test; dropping it raises a ResourceWarning (unclosed socket) that then fails
    whichever test the garbage collector happens to run in (pytest-asyncio issue #724).
    This loop never becomes the current one.
    """
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coroutine)
    finally:
        loop.close()
