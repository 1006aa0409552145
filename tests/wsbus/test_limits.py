"""TokenBucket and ErrorBudget: pure, driven by an explicit clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsbus import ConfigError
from wsbus.limits import ErrorBudget, TokenBucket


def test_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=10, burst=3)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0.05) is False
    assert bucket.take(0.1) is True


@given(
    st.floats(0.5, 1000), st.integers(1, 100), st.lists(st.floats(0, 0.1), min_size=1, max_size=300)
)
def test_bucket_never_allows_more_than_burst_plus_rate_times_time(
    rate: float, burst: int, gaps: list[float]
) -> None:
    bucket = TokenBucket(rate, burst)
    now = 0.0
    allowed = 0
    for gap in gaps:
        now += gap
        allowed += bucket.take(now)
    assert allowed <= burst + rate * now + 1e-6


def test_budget_is_exhausted_past_its_limit_in_the_window() -> None:
    budget = ErrorBudget(limit=3, window=60)
    assert [budget.spend(t) for t in (0, 1, 2)] == [True, True, True]
    assert budget.spend(3) is False
    # A minute later the old rejections have left the window.
    assert budget.spend(70) is True


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (1, 0), (-1, 5)])
def test_bad_bucket_settings(rate: float, burst: float) -> None:
    with pytest.raises(ConfigError):
        TokenBucket(rate, burst)


def test_bad_budget_settings() -> None:
    with pytest.raises(ConfigError):
        ErrorBudget(-1)
    with pytest.raises(ConfigError):
        ErrorBudget(1, window=0)
