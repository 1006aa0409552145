"""The counters: declared once, counted in slots, snapshot as a frozen Stats."""

from __future__ import annotations

import msgspec
import pytest

from wsbus import Stats
from wsbus.stats import GAUGES, Counters


def test_stats_has_the_counters_fields_in_their_order() -> None:
    names = [f.name for f in msgspec.structs.fields(Stats)]
    assert names == list(Counters.__struct_fields__)
    assert set(names) > GAUGES


def test_zero_counters_are_zero_and_the_snapshot_is_a_copy() -> None:
    counters = Counters.zero()
    counters.frames_received += 2
    counters.rejected_by_code["malformed"] = 1
    stats = counters.snapshot(connections=3, deliveries_pending=4)
    assert (stats.frames_received, stats.connections, stats.deliveries_pending) == (2, 3, 4)
    assert stats.frames_published == 0 and stats.closes_by_code == {}
    counters.frames_received += 1
    counters.rejected_by_code["malformed"] = 9
    assert stats.frames_received == 2 and stats.rejected_by_code == {"malformed": 1}


def test_a_snapshot_is_frozen() -> None:
    stats = Counters.zero().snapshot(connections=0, deliveries_pending=0)
    with pytest.raises(AttributeError):
        stats.frames_received = 1  # type: ignore[misc]


def test_the_identities_are_in_the_docstring() -> None:
    assert Stats.__doc__ is not None
    assert "frames_received == frames_published + frames_rejected" in Stats.__doc__
