"""The rules of user commands, on in-memory state with a fixed clock."""
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from schemas.commands import ExpireMembership, StartMembership, UpdateSegmentMembers, UpdateUserSegments
from schemas.results import ErrorCode
from service import domain
from service.domain import CommandRejectedError, Membership, Scheduled, Segment, UserState

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
A, B, C = Segment(1, "A", "A:1"), Segment(2, "B", "B:2"), Segment(3, "C", "C:3")
LIVE = {s.slug: s for s in (A, B, C)}


def update(**fields) -> UpdateUserSegments:
    return UpdateUserSegments(command_id="c1", user_id=fields.pop("user_id", 1000), **fields)


def apply(cmd, user=None, segments=LIVE, rollouts=()):
    user = user or UserState(cmd.user_id)
    return user, domain.update_user_segments(cmd, user, segments, list(rollouts), NOW)


def test_add_and_remove_in_one_step():
    user = UserState(1000, known=True, memberships={3: Membership("manual", NOW, None)})
    user, out = apply(update(add=["A", "B"], remove=["C"]), user)
    assert set(user.memberships) == {1, 2}
    assert [(c.change, c.segment.slug, c.reason) for c in out.changes] == [
        ("added", "A", "command"), ("added", "B", "command"), ("removed", "C", "command")]
    assert user.exclusions == {3}


def test_adding_a_membership_the_user_has_changes_nothing_unless_the_expiry_changes():
    user = UserState(1000, known=True, memberships={1: Membership("manual", NOW, None)})
    _, out = apply(update(add=["A"]), user)
    assert out.changes == []
    _, out = apply(update(add=[{"slug": "A", "ttl_seconds": 60}]), user)
    assert [(c.change, c.expires_at) for c in out.changes] == [("added", NOW + timedelta(seconds=60))]
    assert user.memberships[1].added_at == NOW  # still the original membership


def test_removing_a_membership_the_user_lacks_changes_nothing():
    _, out = apply(update(remove=["A"]))
    assert [c for c in out.changes if c.reason == "command"] == []


def test_default_ttl_and_per_slug_expiry():
    at = NOW + timedelta(hours=1)
    user, _ = apply(update(add=["A", {"slug": "B", "expires_at": at.isoformat()}], ttl_seconds=30))
    assert user.memberships[1].expires_at == NOW + timedelta(seconds=30)
    assert user.memberships[2].expires_at == at


@pytest.mark.parametrize("fields, text", [
    (dict(add=["A"], remove=["A"]), "both in add and remove"),
    (dict(add=[{"slug": "A", "expires_at": "2020-01-01T00:00:00Z"}]), "in the past"),
    (dict(add=[{"slug": "A", "expires_at": "2030-01-01T00:00:00Z", "ttl_seconds": 5}]), "not both"),
    (dict(add=[{"slug": "A", "ttl_seconds": 0}]), "ttl_seconds must be from 1"),
    (dict(add=["A"], ttl_seconds=-1), "ttl_seconds must be from 1"),
    (dict(add=["A"], ttl_seconds=10**12), "ttl_seconds must be from 1"),
    (dict(add=[f"S{i}" for i in range(1001)]), "at most 1000"),
    (dict(add=["A", "A"]), "twice"),
    (dict(add=[{"slug": "A", "starts_at": "2020-01-01T00:00:00Z"}]), "starts_at is in the past"),
    (dict(add=[{"slug": "A", "starts_at": "2030-01-02T00:00:00Z", "expires_at": "2030-01-01T00:00:00Z"}]),
     "starts_at must be before expires_at"),
])
def test_invalid_commands_are_rejected_whole(fields, text):
    user = UserState(1000)
    with pytest.raises(CommandRejectedError) as err:
        apply(update(**fields), user)
    assert err.value.info.code == ErrorCode.INVALID_COMMAND
    assert text in err.value.info.message
    assert user.memberships == {} and not user.known


def test_unknown_slugs_are_listed():
    with pytest.raises(CommandRejectedError) as err:
        apply(update(add=["A", "X"], remove=["Y"]))
    assert err.value.info.code == ErrorCode.SEGMENT_NOT_FOUND
    assert err.value.info.details == {"slugs": ["X", "Y"]}


def test_a_new_user_joins_the_rollouts_that_cover_its_bucket():
    full, none = Segment(4, "ALL", "ALL:4", Decimal(100)), Segment(5, "NONE", "NONE:5", Decimal("0.01"))
    segments = LIVE | {"ALL": full, "NONE": none}
    user, out = apply(update(add=["A"]), segments=segments, rollouts=[full])
    assert out.registered and user.known
    assert user.memberships[4].source == "auto_percent"
    assert ("added", "ALL", "auto_percent") in [(c.change, c.segment.slug, c.reason) for c in out.changes]


def test_explicit_remove_excludes_from_the_rollout_until_added_again():
    full = Segment(4, "ALL", "ALL:4", Decimal(100))
    segments = LIVE | {"ALL": full}
    user = UserState(1000, known=True, memberships={4: Membership("auto_percent", NOW, None)})
    apply(update(remove=["ALL"]), user, segments, [full])
    assert 4 in user.exclusions and 4 not in user.memberships
    domain.register_user(user, [full], NOW)
    assert 4 not in user.memberships
    apply(update(add=["ALL"]), user, segments, [full])
    assert user.memberships[4].source == "manual" and 4 not in user.exclusions


def test_an_expired_membership_leaves_as_an_expiry_before_a_new_add():
    old = NOW - timedelta(seconds=5)
    user = UserState(1000, known=True, memberships={1: Membership("manual", NOW - timedelta(hours=1), old)})
    _, out = apply(update(add=["A"]), user)
    assert [(c.change, c.reason, c.occurred_at) for c in out.changes] == [
        ("removed", "expired", old), ("added", "command", NOW)]


def test_expire_membership_only_when_still_due_with_that_expiry():
    at = NOW - timedelta(seconds=1)
    cmd = ExpireMembership(command_id="e", user_id=1000, slug="A", expires_at=at)
    moved = UserState(1000, True, {1: Membership("manual", NOW, at + timedelta(hours=1))})
    assert domain.expire_membership(cmd, moved, A, NOW).changes == []
    not_yet = UserState(1000, True, {1: Membership("manual", NOW, at)})
    with pytest.raises(domain.NotDueYetError):
        domain.expire_membership(cmd, not_yet, A, at - timedelta(seconds=1))
    assert 1 in not_yet.memberships
    due = UserState(1000, True, {1: Membership("manual", NOW, at)})
    out = domain.expire_membership(cmd, due, A, NOW)
    assert [(c.change, c.reason, c.occurred_at) for c in out.changes] == [("removed", "expired", at)]
    assert due.memberships == {}


def test_an_expired_rollout_user_stays_as_a_rollout_member():
    full = Segment(4, "ALL", "ALL:4", Decimal(100))
    at = NOW - timedelta(seconds=1)
    user = UserState(1000, True, {4: Membership("manual", NOW, at)})
    out = domain.expire_membership(ExpireMembership(command_id="e", user_id=1000, slug="ALL", expires_at=at),
                                   user, full, NOW)
    assert [(c.change, c.reason) for c in out.changes] == [("removed", "expired"), ("added", "auto_percent")]
    assert user.memberships[4].source == "auto_percent"


LATER = NOW + timedelta(hours=1)


def start(user, at=LATER, now=LATER, segment=A):
    return domain.start_membership(StartMembership(command_id="s", user_id=user.user_id, slug=segment.slug,
                                                   starts_at=at), user, segment, now)


def test_a_scheduled_add_is_no_membership_until_its_start_and_its_ttl_counts_from_the_start():
    user, out = apply(update(add=[{"slug": "A", "starts_at": LATER.isoformat(), "ttl_seconds": 60}]))
    assert user.memberships == {} and out.changes == [] and out.registered
    assert user.scheduled == {1: Scheduled(LATER, LATER + timedelta(seconds=60))}
    out = start(user)
    assert [(c.change, c.reason, c.expires_at, c.occurred_at) for c in out.changes] == [
        ("added", "scheduled", LATER + timedelta(seconds=60), LATER)]
    assert user.memberships[1] == Membership("manual", LATER, LATER + timedelta(seconds=60))
    assert user.scheduled == {}


def test_a_start_before_its_time_is_not_due_and_a_replaced_or_cancelled_schedule_is_ignored():
    user, _ = apply(update(add=[{"slug": "A", "starts_at": LATER.isoformat()}]))
    with pytest.raises(domain.NotDueYetError):
        start(user, now=LATER - timedelta(seconds=1))
    assert start(user, at=LATER - timedelta(minutes=1)).changes == []  # an older schedule's start
    apply(update(remove=["A"]), user)
    assert user.scheduled == {} and start(user).changes == []
    apply(update(add=[{"slug": "A", "starts_at": LATER.isoformat()}]), user)
    apply(update(add=["A"]), user)  # a plain add now replaces the schedule
    assert user.scheduled == {} and 1 in user.memberships


def test_a_start_lifts_the_exclusion_and_a_start_applied_after_its_expiry_also_expires():
    end = LATER + timedelta(milliseconds=500)
    user = UserState(1000, True, exclusions={1}, scheduled={1: Scheduled(LATER, end)})
    out = start(user, now=end + timedelta(seconds=3))
    assert [(c.change, c.reason, c.occurred_at) for c in out.changes] == [
        ("added", "scheduled", LATER), ("removed", "expired", end)]
    assert user.memberships == {} and user.exclusions == set()


def test_a_start_of_a_membership_held_with_the_same_expiry_changes_nothing():
    user = UserState(1000, True, {1: Membership("auto_percent", NOW, None)}, scheduled={1: Scheduled(LATER, None)})
    assert start(user).changes == []
    assert user.memberships[1] == Membership("manual", NOW, None)


def members(**fields) -> UpdateSegmentMembers:
    return UpdateSegmentMembers(command_id="b", slug="A", **fields)


@pytest.mark.parametrize("fields, text", [
    (dict(), "from 1 to 100000 user ids"),
    (dict(add=list(range(1, 100_002))), "from 1 to 100000 user ids"),
    (dict(add=[1, 2, 1]), "listed twice in add: 1"),
    (dict(add=[1], remove=[1]), "both in add and remove: 1"),
    (dict(add=[1], expires_at=NOW - timedelta(seconds=1)), "expires_at is in the past"),
    (dict(add=[1], expires_at=LATER, ttl_seconds=5), "not both"),
    (dict(add=[1], ttl_seconds=0), "ttl_seconds must be from 1"),
    (dict(remove=[1], starts_at=LATER), "starts_at needs users to add"),
    (dict(add=[1], starts_at=LATER, expires_at=LATER), "before expires_at"),
])
def test_invalid_segment_member_updates_are_rejected(fields, text):
    with pytest.raises(CommandRejectedError) as err:
        domain.validate_segment_members(members(**fields), NOW)
    assert err.value.info.code == ErrorCode.INVALID_COMMAND
    assert text in err.value.info.message


def test_a_segment_member_update_of_100_000_users_is_valid():
    domain.validate_segment_members(members(add=list(range(1, 50_001)), remove=list(range(50_001, 100_001))), NOW)
