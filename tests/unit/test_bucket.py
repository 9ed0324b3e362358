"""The rollout bucket rules, as properties."""
import hashlib
from datetime import UTC, datetime
from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from service.bucket import bucket, in_rollout, segment_salt, threshold
from service.domain import Segment, UserState, register_user

users = st.integers(min_value=1, max_value=2**63 - 1)
salts = st.text(min_size=1, max_size=40)
percents = st.decimals(min_value=0, max_value=100, places=2, allow_nan=False, allow_infinity=False)


@given(salts, users)
def test_stable_and_in_range(salt, user):
    assert bucket(salt, user) == bucket(salt, user)
    assert 0 <= bucket(salt, user) < 10_000


@given(salts, users, percents, percents)
def test_monotone_in_the_percent(salt, user, p, q):
    low, high = min(p, q), max(p, q)
    assert not in_rollout(salt, user, low) or in_rollout(salt, user, high)


@given(salts, st.lists(users, min_size=1, max_size=50, unique=True), percents, percents)
def test_a_percent_change_moves_exactly_the_users_between_the_lines(salt, ids, old, new):
    before = {u for u in ids if in_rollout(salt, u, old)}
    after = {u for u in ids if in_rollout(salt, u, new)}
    lo, hi = sorted((threshold(old), threshold(new)))
    between = {u for u in ids if lo <= bucket(salt, u) < hi}
    assert before ^ after == between
    assert ((after - before) if new >= old else (before - after)) == between


@given(users, percents)
def test_exclusions_win(user, percent):
    seg = Segment(1, "S", segment_salt("S", 1), percent)
    state = UserState(user, known=False, exclusions={1})
    register_user(state, [seg], datetime(2026, 11, 22, tzinfo=UTC))
    assert 1 not in state.memberships


def test_ten_percent_of_consecutive_ids():
    salt = segment_salt("AVITO_DISCOUNT_30", 3)
    inside = sum(in_rollout(salt, u, Decimal(10)) for u in range(1, 100_001))
    assert abs(inside / 100_000 - 0.10) <= 0.003


def test_the_worked_example_of_the_readme():
    # sha256("AVITO_VOICE_MESSAGES:1:1000") starts 9144151f = 2437158175; 2437158175 % 10000 = 8175
    assert hashlib.sha256(b"AVITO_VOICE_MESSAGES:1:1000").hexdigest()[:8] == "9144151f"
    assert bucket("AVITO_VOICE_MESSAGES:1", 1000) == 8175
    assert in_rollout("AVITO_VOICE_MESSAGES:1", 1000, Decimal("81.76"))
    assert not in_rollout("AVITO_VOICE_MESSAGES:1", 1000, Decimal("81.75"))
