"""Per-connection limits: a token bucket for the rate, a sliding window for the error budget.

Sans-I/O: each takes the current time as an argument, so tests drive the clock.
"""

from __future__ import annotations

from collections import deque

from .errors import ConfigError

__all__ = ["ErrorBudget", "TokenBucket"]


class TokenBucket:
    """Allows ``rate`` events a second on average, and bursts of up to ``burst``.

    Args:
        rate: tokens added per second.
        burst: the bucket's size; it starts full.
    """

    __slots__ = ("_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float) -> None:
        if rate <= 0 or burst < 1:
            raise ConfigError(f"a token bucket needs rate > 0 and burst >= 1, got {rate}, {burst}")
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._stamp = 0.0

    def take(self, now: float) -> bool:
        """Spend one token at time ``now``; return False when the bucket is empty."""
        tokens = self._tokens
        # A full bucket has nothing to add (it starts full, so the first take is one).
        if tokens < self.burst:
            tokens += (now - self._stamp) * self.rate
            if tokens > self.burst:
                tokens = self.burst
        self._stamp = now
        if tokens >= 1:
            self._tokens = tokens - 1
            return True
        self._tokens = tokens
        return False


class ErrorBudget:
    """Counts rejected frames in a sliding window; exhausted past ``limit`` in ``window`` s.

    Args:
        limit: how many rejections the window may hold.
        window: the window's length in seconds.
    """

    __slots__ = ("_stamps", "limit", "window")

    def __init__(self, limit: int, window: float = 60.0) -> None:
        if limit < 0 or window <= 0:
            raise ConfigError(
                f"an error budget needs limit >= 0 and window > 0, got {limit}, {window}"
            )
        self.limit = limit
        self.window = window
        # Made on the first rejection: most connections never spend, and an empty deque
        # is most of a kilobyte per connection.
        self._stamps: deque[float] | None = None

    def spend(self, now: float) -> bool:
        """Record one rejection at ``now``; return False once the budget is exhausted."""
        stamps = self._stamps
        if stamps is None:
            stamps = self._stamps = deque()
        while stamps and stamps[0] <= now - self.window:
            stamps.popleft()
        stamps.append(now)
        return len(stamps) <= self.limit
