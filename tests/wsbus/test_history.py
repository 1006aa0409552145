"""wsbus.history: positions, what enters history, MemoryHistory and the GroupOrder stage.

All pure: time is a number the tests choose. The gateway's use of them is tested in
tests/wsbus/test_resume.py and tests/wsbus/test_history_stateful.py.
"""

from __future__ import annotations

import fnmatch
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsbus.envelope import ClientAddress, ConnId, Envelope, EnvelopeId, Recipients, ServiceAddress
from wsbus.errors import ConfigError
from wsbus.history import (
    GROUP_HEADER,
    POSITION_HEADER,
    Fetch,
    GroupGap,
    GroupOrder,
    HistoryConfig,
    MemoryHistory,
    Position,
    history_group,
    position_of,
    stamp,
)

SERVICE = ServiceAddress("chat")


def message(n: int, group: str = "room.1", **recipients: object) -> Envelope:
    return Envelope(
        id=EnvelopeId(f"m{n}"),
        type="chat.say",
        sender=SERVICE,
        content=n,
        recipients=Recipients(groups=(group,), **recipients),  # type: ignore[arg-type]
    )


# -- positions -------------------------------------------------------------------------


@given(st.from_regex(r"[A-Za-z0-9_-]{1,40}", fullmatch=True), st.integers(1, 10**17))
def test_a_position_reads_back_what_it_writes(epoch: str, offset: int) -> None:
    position = Position(epoch, offset)
    assert Position.parse(position.encode()) == position


@given(st.one_of(st.text(max_size=80), st.integers(), st.none(), st.binary(max_size=20)))
def test_parsing_client_input_never_raises(text: object) -> None:
    position = Position.parse(text)
    assert position is None or (position.offset >= 1 and position.encode() == text)


@pytest.mark.parametrize(
    "text",
    ["e:0", "e:-1", "e:+1", "e: 1", " e:1", "e:1 ", "e:1_0", ":1", "e:", "e", "e:1:2",
     "é:1", "e.x:1", "e:" + "9" * 19, "x" * 41 + ":1", "e:0x10", "e:\u0661"],
)  # fmt: skip
def test_malformed_positions_are_refused(text: str) -> None:
    assert Position.parse(text) is None


# -- what enters history ------------------------------------------------------------------

KEEPS = HistoryConfig(groups=("room.*",))


def test_a_service_message_to_one_kept_group_enters_history() -> None:
    assert history_group(message(1), KEEPS) == "room.1"
    assert history_group(message(1, exclude=(ConnId("n.1"),)), KEEPS) == "room.1"


@pytest.mark.parametrize(
    "envelope",
    [
        message(1, group="lobby"),  # not a kept group
        message(1, users=("bob",)),  # more than the one group
        message(1, conn_ids=(ConnId("n.1"),)),
        message(1, aliases=("bob",)),
        message(1, everyone=True),
        Envelope(EnvelopeId("x"), "t", SERVICE, recipients=Recipients(groups=("room.1", "room.2"))),
        Envelope(EnvelopeId("x"), "t", SERVICE),  # to services
        Envelope(
            EnvelopeId("x"),
            "t",
            ClientAddress(ConnId("n.1")),
            recipients=Recipients(groups=("room.1",)),
        ),  # a client's
        stamp(message(1), "room.1", Position("e", 4)),  # stamped already
    ],
)
def test_anything_else_does_not(envelope: Envelope) -> None:
    assert history_group(envelope, KEEPS) is None


names = st.text("ab.*?[]!-", max_size=6)


@given(st.lists(names, max_size=3), names)
def test_keeps_is_fnmatchcase_over_the_patterns(patterns: list[str], group: str) -> None:
    expected = any(fnmatch.fnmatchcase(group, p) for p in patterns)
    assert HistoryConfig(groups=tuple(patterns)).keeps(group) is expected


def test_no_pattern_keeps_nothing() -> None:
    assert history_group(message(1), HistoryConfig()) is None


def test_stamp_and_position_of() -> None:
    original = message(1)
    stamped = stamp(original, "room.1", Position("e", 7))
    assert stamped.headers == {GROUP_HEADER: "room.1", POSITION_HEADER: "e:7"}
    assert original.headers == {}
    assert position_of(stamped) == ("room.1", Position("e", 7))
    assert position_of(original) is None
    forged = Envelope(EnvelopeId("x"), "t", SERVICE, headers={POSITION_HEADER: "e:0"})
    assert position_of(forged) is None


@pytest.mark.parametrize("kwargs", [{"size": 0}, {"age": 0.0}, {"age": -1.0}, {"age": math.nan}])
def test_history_config_bounds(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        HistoryConfig(**kwargs)  # type: ignore[arg-type]


# -- MemoryHistory --------------------------------------------------------------------------


def test_history_counts_from_one_and_reads_what_follows() -> None:
    history = MemoryHistory(HistoryConfig(groups=("*",), size=3), epoch="e1")
    assert history.last("g") is None
    assert history.read("g", Position("e1", 0), 0.0, 10) is None
    stamped = [history.append("g", message(n, "g"), float(n)) for n in range(1, 6)]
    assert [position_of(s) for s in stamped] == [("g", Position("e1", n)) for n in range(1, 6)]
    assert history.last("g") == Position("e1", 5)
    assert history.read("g", Position("e1", 5), 6.0, 10) == []
    assert history.read("g", Position("e1", 2), 6.0, 10) == stamped[2:]
    assert history.read("g", Position("e1", 2), 6.0, 1) == stamped[2:3]
    assert history.read("g", Position("e1", 1), 6.0, 10) is None  # 2 was trimmed
    assert history.read("g", Position("e1", 6), 6.0, 10) is None  # beyond the last
    assert history.read("g", Position("e0", 4), 6.0, 10) is None  # another epoch
    assert history.read("other", Position("e1", 4), 6.0, 10) is None


def test_history_ages_out() -> None:
    history = MemoryHistory(HistoryConfig(groups=("*",), age=10.0), epoch="e1")
    history.append("g", message(1, "g"), 0.0)
    second = history.append("g", message(2, "g"), 5.0)
    assert history.read("g", Position("e1", 0), 9.0, 10) is not None
    assert history.read("g", Position("e1", 1), 12.0, 10) == [second]
    assert history.read("g", Position("e1", 0), 12.0, 10) is None
    assert history.read("g", Position("e1", 1), 16.0, 10) is None
    assert history.read("g", Position("e1", 2), 16.0, 10) == []  # nothing missed
    assert history.last("g") == Position("e1", 2)


def test_a_new_store_has_a_new_epoch() -> None:
    config = HistoryConfig(groups=("*",))
    assert MemoryHistory(config).epoch != MemoryHistory(config).epoch
    with pytest.raises(ConfigError):
        MemoryHistory(config, epoch="a:b")


class _Model:
    """What MemoryHistory must hold, written plainly: every entry ever appended."""

    def __init__(self, size: int, age: float) -> None:
        self.size = size
        self.age = age
        self.entries: dict[str, list[tuple[float, Envelope]]] = {}

    def expected(self, group: str, after: int, wall: float, limit: int) -> list[Envelope] | None:
        entries = self.entries.get(group)
        if entries is None:
            return None
        last = len(entries)
        if after > last:
            return None
        if after == last:
            return []
        kept = [
            offset
            for offset, (at, _) in enumerate(entries, 1)
            if offset > last - self.size and at >= wall - self.age
        ]
        first = kept[0] if kept else last + 1
        if after + 1 < first:
            return None
        return [envelope for _, envelope in entries[after : after + limit]]


operations = st.lists(
    st.tuples(
        st.sampled_from(["append", "read"]),
        st.sampled_from(["a", "b", "c"]),
        st.floats(0.0, 4.0),  # time passing
        st.integers(0, 12),  # read: after
        st.integers(0, 6),  # read: limit
    ),
    max_size=60,
)


@settings(max_examples=300)
@given(operations, st.integers(1, 5), st.sampled_from([1.0, 3.0, 100.0]))
def test_history_reads_everything_after_or_nothing(
    steps: list[tuple[str, str, float, int, int]], size: int, age: float
) -> None:
    history = MemoryHistory(HistoryConfig(groups=("*",), size=size, age=age), epoch="e")
    model = _Model(size, age)
    wall = 0.0
    for n, (op, group, passing, after, limit) in enumerate(steps):
        wall += passing
        if op == "append":
            stamped = history.append(group, message(n, group), wall)
            model.entries.setdefault(group, []).append((wall, stamped))
            assert position_of(stamped) == (group, Position("e", len(model.entries[group])))
        else:
            got = history.read(group, Position("e", after), wall, limit)
            assert got == model.expected(group, after, wall, limit)


# -- GroupOrder ------------------------------------------------------------------------------


def positioned(group: str, offset: int, epoch: str = "e") -> Envelope:
    return stamp(message(offset, group), group, Position(epoch, offset))


def offsets(out: list[Envelope | GroupGap]) -> list[int | str]:
    result: list[int | str] = []
    for item in out:
        if isinstance(item, GroupGap):
            result.append("gap")
        else:
            found = position_of(item)
            assert found is not None
            result.append(found[1].offset)
    return result


def offer(
    order: GroupOrder, group: str, offset: int, now: float, epoch: str = "e"
) -> list[int | str]:
    return offsets(
        order.offer(group, Position(epoch, offset), positioned(group, offset, epoch), now)
    )


def test_in_order_passes_straight_through() -> None:
    order = GroupOrder()
    assert [offer(order, "g", n, 0.0) for n in (5, 6, 7)] == [[5], [6], [7]]
    assert order.deadline() is None and order.due(100.0) == []


def test_an_early_message_waits_then_the_hole_is_fetched() -> None:
    order = GroupOrder(wait=0.2)
    offer(order, "g", 1, 0.0)
    assert offer(order, "g", 3, 1.0) == []
    assert offer(order, "g", 4, 1.1) == []
    assert order.deadline() == pytest.approx(1.2)
    assert order.due(1.1) == []
    assert order.due(1.2) == [Fetch("g", Position("e", 1), 1)]
    assert order.due(5.0) == []  # under way
    assert offsets(order.fill("g", "e", [positioned("g", 2)], 1.3)) == [2, 3, 4]
    assert order.parked == 0 and order.deadline() is None


def test_the_missing_one_arriving_late_needs_no_fetch() -> None:
    order = GroupOrder()
    offer(order, "g", 1, 0.0)
    assert offer(order, "g", 3, 0.0) == []
    assert offer(order, "g", 2, 0.1) == [2, 3]
    assert order.due(10.0) == []


def test_what_history_cannot_give_becomes_a_gap_in_its_place() -> None:
    order = GroupOrder()
    offer(order, "g", 1, 0.0)
    offer(order, "g", 4, 0.0)
    (fetch,) = order.due(1.0)
    assert fetch == Fetch("g", Position("e", 1), 2)
    assert offsets(order.fill("g", "e", None, 1.0)) == ["gap", 4]
    offer(order, "g", 7, 2.0)
    order.due(3.0)
    # Part of the hole found: what was found, then the gap, then the rest.
    assert offsets(order.fill("g", "e", [positioned("g", 5)], 3.0)) == [5, "gap", 7]
    assert order.gaps == 2


def test_duplicates_are_dropped_and_counted() -> None:
    order = GroupOrder()
    offer(order, "g", 1, 0.0)
    offer(order, "g", 3, 0.0)
    assert offer(order, "g", 1, 0.0) == []
    assert offer(order, "g", 3, 0.0) == []
    assert offer(order, "g", 2, 0.0) == [2, 3]
    assert offer(order, "g", 2, 0.0) == []
    assert order.duplicates == 3


def test_a_new_epoch_starts_afresh_behind_a_gap() -> None:
    order = GroupOrder()
    offer(order, "g", 1, 0.0)
    offer(order, "g", 3, 0.0)
    assert offer(order, "g", 1, 0.1, epoch="f") == [3, "gap", 1]
    assert offer(order, "g", 2, 0.2, epoch="f") == [2]
    assert order.due(10.0) == [] and order.parked == 0


def test_a_late_answer_for_an_old_epoch_is_ignored() -> None:
    order = GroupOrder()
    offer(order, "g", 1, 0.0)
    offer(order, "g", 3, 0.0)
    order.due(1.0)
    offer(order, "g", 1, 1.0, epoch="f")
    assert order.fill("g", "e", [positioned("g", 2)], 1.0) == []


def test_one_overtaken_by_the_first_seen_is_a_gap() -> None:
    order = GroupOrder()
    assert offer(order, "g", 5, 0.0) == [5]
    assert offer(order, "g", 4, 0.0) == ["gap"]
    assert offer(order, "g", 4, 0.0) == []  # that one is a duplicate now


def test_parking_is_bounded() -> None:
    order = GroupOrder(wait=10.0, per_group=4, total=6)
    offer(order, "g", 1, 0.0)
    for n in range(3, 6):
        offer(order, "g", n, 0.0)
    assert order.due(0.0) == []
    offer(order, "g", 6, 0.0)  # the fourth parked: fetch at once
    assert order.due(0.0) == [Fetch("g", Position("e", 1), 1)]
    for n in range(7, 11):  # more while it is fetched: still parked up to twice the bound
        assert offer(order, "g", n, 0.0) == []
    # Past twice the bound, the hole is given up without waiting for the fetch.
    assert offer(order, "g", 11, 0.0) == ["gap", *range(3, 12)]
    assert order.parked == 0
    assert order.fill("g", "e", [positioned("g", 2)], 0.0) == []


def _send_order(
    rng: random.Random, count: int, lost: float, duplicated: float, swaps: int
) -> list[int]:
    sent = [n for n in range(1, count + 1) if rng.random() >= lost]
    sent += [n for n in sent if rng.random() < duplicated]
    sent.sort()
    for _ in range(swaps):
        if len(sent) > 1:
            i = rng.randrange(len(sent) - 1)
            j = min(len(sent) - 1, i + rng.randint(1, 4))
            sent[i], sent[j] = sent[j], sent[i]
    return sent


@settings(max_examples=300)
@given(
    seed=st.integers(0, 2**32),
    count=st.integers(1, 40),
    lost=st.sampled_from([0.0, 0.1, 0.4]),
    duplicated=st.sampled_from([0.0, 0.2]),
    swaps=st.integers(0, 30),
    trimmed=st.integers(0, 40),
    bounds=st.sampled_from([(256, 4096), (2, 3)]),
)
def test_the_order_stage_is_in_order_once_each_and_never_silent(
    seed: int,
    count: int,
    lost: float,
    duplicated: float,
    swaps: int,
    trimmed: int,
    bounds: tuple[int, int],
) -> None:
    """Whatever arrives, in whatever order, with whatever history can give back.

    Out of the stage, per group: offsets strictly increasing, none twice; every offset
    skipped over has a gap in its place; once time passes and the fetches are answered,
    nothing stays parked and everything sent past the start came out.
    """
    rng = random.Random(seed)
    order = GroupOrder(wait=0.2, per_group=bounds[0], total=bounds[1])
    groups = ["a", "b"]
    arrivals = {g: _send_order(rng, count, lost, duplicated, swaps) for g in groups}
    out: dict[str, list[int | str]] = {g: [] for g in groups}
    fetches: list[Fetch] = []
    now = 0.0

    def answer(fetch: Fetch) -> None:
        # The store kept offsets after `trimmed`: a read reaching before them is None.
        first = fetch.after.offset + 1
        if first <= trimmed:
            got = None
        else:
            got = [positioned(fetch.group, n) for n in range(first, first + fetch.limit)]
        out[fetch.group] += offsets(order.fill(fetch.group, "e", got, now))

    queue = [(g, n) for g in groups for n in arrivals[g]]
    rng.shuffle(queue)
    queue.sort(key=lambda item: arrivals[item[0]].index(item[1]))  # each group's own order
    while queue or fetches or order.deadline() is not None:
        choice = rng.random()
        if queue and choice < 0.6:
            group, n = queue.pop(0)
            out[group] += offer(order, group, n, now)
        elif fetches and choice < 0.8:
            answer(fetches.pop(rng.randrange(len(fetches))))
        else:
            now += rng.choice([0.05, 0.3])
        fetches += order.due(now)
    for group in groups:
        delivered = [x for x in out[group] if x != "gap"]
        assert delivered == sorted(set(delivered)), out[group]
        previous: int | str | None = None
        for item in out[group]:
            if isinstance(item, int) and isinstance(previous, int):
                assert item == previous + 1, out[group]  # a jump only after a gap
            previous = item
        if arrivals[group]:
            start = arrivals[group][0]
            everything = set(range(start, max(arrivals[group]) + 1))
            missing = everything - set(delivered)
            # Nothing missing silently: any offset missing means a gap was said.
            assert not missing or "gap" in out[group]
            assert max(arrivals[group]) in delivered
            late = set(arrivals[group]) - everything  # overtaken by the first one seen
            if trimmed == 0 and not late and bounds[0] > count:
                # History had everything and the bounds never made a hole be given up.
                assert missing == set()
    assert order.parked == 0
