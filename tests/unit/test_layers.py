"""Layers: first-fit ranges of one shared hash, kept on percent changes; no user in two rollouts of a layer."""
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.results import ErrorCode
from service.bucket import BUCKETS, bucket, first_fit, layer_range, layer_salt
from service.domain import CommandRejectedError, Segment, layer_placement

USERS = range(1, 1001)


def test_first_fit_takes_the_lowest_gap_wide_enough():
    assert first_fit([], 3000) == 0
    assert first_fit([(0, 3000), (5000, 8000)], 2000) == 3000
    assert first_fit([(0, 3000), (5000, 7000)], 2001) == 7000
    assert first_fit([(0, 3000), (5000, 7000)], 3001) is None
    assert first_fit([(100, 100)], 10_000) == 0  # an empty range (a layer segment at 0 %) holds nothing


def test_a_range_keeps_its_start_and_cannot_grow_into_a_neighbour():
    taken = [(3000, 5000)]
    assert layer_range(taken, 0, 3000) == (0, 3000)
    assert layer_range(taken, 0, 3001) is None
    assert layer_range(taken, 5000, 5000) == (5000, 10_000)
    assert layer_range(taken, 5000, 5001) is None  # past the last bucket


def test_placement_outside_layers_and_before_a_first_percent_is_none():
    assert layer_placement(None, [(0, 10_000)], None, Decimal(30)) == (None, None)
    assert layer_placement("L", [(0, 10_000)], None, Decimal(0)) == (None, None)
    assert layer_placement("L", [(0, 10_000)], 0, Decimal(0)) == (0, 0)  # keeps its start at 0 %


def test_a_full_layer_is_layer_full():
    with pytest.raises(CommandRejectedError) as exc:
        layer_placement("discounts", [(0, 5000), (5000, 10_000)], None, Decimal("0.01"))
    assert exc.value.info.code == ErrorCode.LAYER_FULL
    assert exc.value.info.details == {"layer": "discounts", "buckets": 1}


def test_a_layer_at_100_percent_split_among_three_puts_every_user_in_exactly_one():
    taken: list[tuple[int, int]] = []
    segments = []
    for i, percent in enumerate((Decimal("33.34"), Decimal("33.33"), Decimal("33.33"))):
        start, _end = layer_placement("L", taken, None, percent)
        taken.append((start, _end))
        segments.append(Segment(i, f"S{i}", f"S{i}:{i}", percent, "L", start))
    assert sorted(taken) == [(0, 3334), (3334, 6667), (6667, 10_000)]
    for user in USERS:
        assert sum(s.rolls_out_to(user) for s in segments) == 1


def test_segments_of_a_layer_hash_with_the_layer_salt():
    seg = Segment(7, "D30", "D30:7", Decimal(100), "discounts", 0)
    assert seg.bucket_salt == "layer:discounts"
    assert all(seg.rolls_out_to(u) for u in range(1, 200))
    half = Segment(7, "D30", "D30:7", Decimal(50), "discounts", 5000)
    assert {u for u in USERS if half.rolls_out_to(u)} == {u for u in USERS if bucket("layer:discounts", u) >= 5000}
    assert layer_salt("discounts") == "layer:discounts"


percents = st.decimals(min_value=0, max_value=60, places=2, allow_nan=False, allow_infinity=False)
steps = st.lists(st.tuples(st.sampled_from(["create", "update", "delete"]), st.integers(0, 4), percents),
                 min_size=1, max_size=25)


@settings(max_examples=150, deadline=None)
@given(steps)
def test_random_creates_updates_and_deletes_never_overlap_and_move_exactly_the_users_between(script):
    live: dict[int, Segment] = {}
    members = {u: set() for u in USERS}  # what the applied deltas say
    for action, n, percent in script:
        seg = live.get(n)
        others = [(s.bucket_start, s.bucket_start + int(s.auto_percent * 100))
                  for k, s in live.items() if k != n and s.bucket_start is not None]
        if action == "delete" or (seg is None) != (action == "create"):
            if action == "delete" and seg is not None:
                for u in USERS:
                    members[u].discard(n)
                del live[n]
            continue
        try:
            start, end = layer_placement("L", others, seg.bucket_start if seg else None, percent)
        except CommandRejectedError as exc:
            assert exc.info.code == ErrorCode.LAYER_FULL
            continue
        new = Segment(n, f"S{n}", f"S{n}:{n}", percent, "L", start)
        if start is not None:
            assert end is not None and 0 <= start <= end <= BUCKETS and end - start == int(percent * 100)
            assert all(not (s < end and start < e) for s, e in others if e > s) or start == end
        for u in USERS:  # the exact delta: those who enter or leave, nobody else
            was, now = seg.rolls_out_to(u) if seg else False, new.rolls_out_to(u)
            if now and not was:
                assert n not in members[u]
                members[u].add(n)
            elif was and not now:
                members[u].remove(n)
        live[n] = new
        for u in USERS:
            assert members[u] == {k for k, s in live.items() if s.rolls_out_to(u)}
            assert len(members[u]) <= 1
