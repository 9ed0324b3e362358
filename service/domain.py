"""Pure domain rules: state and a time in, decisions and changes out. No I/O, no clock reads."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from schemas.commands import (
    MAX_SLUGS_PER_COMMAND,
    MAX_USERS_PER_SEGMENT_UPDATE,
    ExpireMembership,
    SlugAdd,
    StartMembership,
    UpdateSegmentMembers,
    UpdateUserSegments,
)
from schemas.results import ErrorCode, ErrorInfo
from service.bucket import Range, bucket, layer_range, layer_salt, threshold


class CommandRejectedError(Exception):
    """A command that breaks a rule: rejected whole, with a code."""

    def __init__(self, code: ErrorCode, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.info = ErrorInfo(code=code, message=message, details=details)


class NotDueYetError(Exception):
    """A scheduler command that came before its time (a clock behind the scheduler's): nothing to do yet."""


MAX_TTL_SECONDS = 100 * 366 * 24 * 3600
# Every time a command sets is before this: PostgreSQL's driver stores the last instant Python has
# (9999-12-31T23:59:59.999999Z) as `infinity` and reads it back as a naive datetime.max.
LATEST = datetime(9999, 1, 1, tzinfo=UTC)
LATEST_TEXT = "9999-01-01T00:00:00Z"


@dataclass(frozen=True)
class Segment:
    """A live segment as the rules see it."""

    id: int
    slug: str
    salt: str
    auto_percent: Decimal = Decimal(0)
    layer: str | None = None
    bucket_start: int | None = None  # in a layer: where its range begins

    @property
    def bucket_salt(self) -> str:
        """The salt of the hash its rollout reads: its own, or its layer's."""
        return layer_salt(self.layer) if self.layer is not None else self.salt

    def rolls_out_to(self, user_id: int) -> bool:
        if self.auto_percent <= 0:
            return False
        start = self.bucket_start or 0
        return start <= bucket(self.bucket_salt, user_id) < start + threshold(self.auto_percent)


@dataclass(frozen=True)
class Membership:
    source: str  # 'manual' | 'auto_percent'
    added_at: datetime
    expires_at: datetime | None

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= now


@dataclass(frozen=True)
class Scheduled:
    """A membership that begins at `starts_at` (not a membership before that)."""

    starts_at: datetime
    expires_at: datetime | None


@dataclass
class UserState:
    """One user's memberships, exclusions and scheduled starts, by segment id."""

    user_id: int
    known: bool = False
    memberships: dict[int, Membership] = field(default_factory=dict)
    exclusions: set[int] = field(default_factory=set)
    scheduled: dict[int, Scheduled] = field(default_factory=dict)


@dataclass(frozen=True)
class Change:
    """One membership transition: becomes one history row and one MembershipChanged event."""

    change: str  # 'added' | 'removed'
    user_id: int
    segment: Segment
    reason: str  # 'command' | 'auto_percent' | 'expired' | 'segment_deleted' | 'scheduled'
    expires_at: datetime | None
    occurred_at: datetime


@dataclass
class Outcome:
    """What applying a user command did: the changes, and whether the user became known."""

    changes: list[Change] = field(default_factory=list)
    registered: bool = False


def expiry(expires_at: datetime | None, ttl_seconds: int | None, starts_at: datetime | None, now: datetime
           ) -> datetime | None:
    """The expiry of an added membership: given, or its TTL counted from its start (now, unless scheduled)."""
    if expires_at is not None:
        return expires_at
    return (starts_at or now) + timedelta(seconds=ttl_seconds) if ttl_seconds is not None else None


def _expiry(add: SlugAdd, default_ttl: int | None, now: datetime) -> datetime | None:
    return expiry(add.expires_at, add.ttl_seconds if add.ttl_seconds is not None else default_ttl, add.starts_at, now)


def invalid(message: str, **details: Any) -> CommandRejectedError:
    return CommandRejectedError(ErrorCode.INVALID_COMMAND, message, details or None)


def _check_times(label: str, expires_at: datetime | None, ttl_seconds: int | None, starts_at: datetime | None,
                 now: datetime, **details: Any) -> None:
    """The rules one added membership's times obey (`label` names it in the message)."""
    if expires_at is not None and ttl_seconds is not None:
        raise invalid(f"{label}give either expires_at or ttl_seconds, not both", **details)
    if ttl_seconds is not None and not 0 < ttl_seconds <= MAX_TTL_SECONDS:
        raise invalid(f"{label}ttl_seconds must be from 1 to {MAX_TTL_SECONDS}", **details)
    if expires_at is not None and expires_at <= now:
        raise invalid(f"{label}expires_at is in the past", **details)
    if starts_at is not None and starts_at <= now:
        raise invalid(f"{label}starts_at is in the past", **details)
    begins = starts_at or now  # the TTL counts from here; compared without the sum, which could overflow
    if begins >= LATEST or (expires_at is not None and expires_at >= LATEST) or (
            ttl_seconds is not None and begins >= LATEST - timedelta(seconds=ttl_seconds)):
        raise invalid(f"{label}times must be before {LATEST_TEXT}", **details)
    if starts_at is not None and expires_at is not None and expires_at <= starts_at:
        raise invalid(f"{label}starts_at must be before expires_at", **details)


def validate_update(cmd: UpdateUserSegments, adds: list[SlugAdd], now: datetime) -> None:
    """The INVALID_COMMAND rules of UpdateUserSegments (`adds`: its `added()`). On the worker's hot path: each check
    is a set size or a None test first, its message built only for a command that breaks it."""
    if len(adds) + len(cmd.remove) > MAX_SLUGS_PER_COMMAND:
        raise invalid(f"at most {MAX_SLUGS_PER_COMMAND} slugs in add and remove together")
    added = [a.slug for a in adds]
    unique = set(added)
    for name, slugs, distinct in (("add", added, unique), ("remove", cmd.remove, None)):
        if len(distinct if distinct is not None else set(slugs)) != len(slugs):
            twice = sorted(s for s, n in Counter(slugs).items() if n > 1)
            raise invalid(f"slugs listed twice in {name}: {', '.join(twice)}", slugs=twice)
    if cmd.remove and not unique.isdisjoint(cmd.remove):
        both = sorted(unique.intersection(cmd.remove))
        raise invalid(f"slugs both in add and remove: {', '.join(both)}", slugs=both)
    if cmd.ttl_seconds is not None and not 0 < cmd.ttl_seconds <= MAX_TTL_SECONDS:
        raise invalid(f"ttl_seconds must be from 1 to {MAX_TTL_SECONDS}")
    for a in adds:
        if a.expires_at is not None or a.ttl_seconds is not None or a.starts_at is not None:
            ttl = a.ttl_seconds if a.ttl_seconds is not None or a.expires_at is not None else cmd.ttl_seconds
            _check_times(f"{a.slug}: ", a.expires_at, ttl, a.starts_at, now, slugs=[a.slug])


def validate_segment_members(cmd: UpdateSegmentMembers, now: datetime) -> None:
    """The INVALID_COMMAND rules of UpdateSegmentMembers."""
    count = len(cmd.add) + len(cmd.remove)
    if not 0 < count <= MAX_USERS_PER_SEGMENT_UPDATE:
        raise invalid(f"from 1 to {MAX_USERS_PER_SEGMENT_UPDATE} user ids in add and remove together")
    for name, ids in (("add", cmd.add), ("remove", cmd.remove)):
        if len(set(ids)) != len(ids):
            twice = sorted(u for u, n in Counter(ids).items() if n > 1)
            raise invalid(f"user ids listed twice in {name}: {_some(twice)}", user_ids=twice[:100])
    both = sorted(set(cmd.add) & set(cmd.remove))
    if both:
        raise invalid(f"user ids both in add and remove: {_some(both)}", user_ids=both[:100])
    if cmd.starts_at is not None and not cmd.add:
        raise invalid("starts_at needs users to add")
    _check_times("", cmd.expires_at, cmd.ttl_seconds, cmd.starts_at, now)


def _some(ids: list[int]) -> str:
    return ", ".join(map(str, ids[:10])) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")


def _live(slugs: list[str], segments: dict[str, Segment]) -> list[Segment]:
    missing = sorted({s for s in slugs if s not in segments})
    if missing:
        raise CommandRejectedError(
            ErrorCode.SEGMENT_NOT_FOUND, f"unknown or deleted segments: {', '.join(missing)}", {"slugs": missing}
        )
    return [segments[s] for s in slugs]


def _drop_if_expired(user: UserState, seg: Segment, now: datetime, out: Outcome) -> None:
    """An expired membership that is still stored leaves first, as an expiry at its own time."""
    m = user.memberships.get(seg.id)
    if m is not None and m.expired(now):
        _expire(user, seg, m, out)


def _expire(user: UserState, seg: Segment, m: Membership, out: Outcome) -> None:
    """`m` leaves as an expiry, dated its own expiry time."""
    del user.memberships[seg.id]
    assert m.expires_at is not None  # expired() holds only with an expiry
    out.changes.append(Change("removed", user.user_id, seg, "expired", m.expires_at, m.expires_at))


def _register(user: UserState, rollouts: list[Segment], now: datetime, out: Outcome) -> None:
    """A user seen for the first time joins every rollout that covers its bucket."""
    if user.known:
        return
    user.known = True
    out.registered = True
    for seg in rollouts:
        if seg.id not in user.memberships and seg.id not in user.exclusions and seg.rolls_out_to(user.user_id):
            user.memberships[seg.id] = Membership("auto_percent", now, None)
            out.changes.append(Change("added", user.user_id, seg, "auto_percent", None, now))


def update_user_segments(
    cmd: UpdateUserSegments, user: UserState, segments: dict[str, Segment], rollouts: list[Segment], now: datetime
) -> Outcome:
    """The Avito method: add and remove in one atomic step. Raises before touching `user` if rejected."""
    adds = cmd.added()
    validate_update(cmd, adds, now)
    live = _live([a.slug for a in adds] + list(cmd.remove), segments)
    to_add, to_remove = live[: len(adds)], live[len(adds):]
    out = Outcome()
    for seg, add in zip(to_add, adds, strict=True):
        expires_at = _expiry(add, cmd.ttl_seconds, now)
        if add.starts_at is not None:  # replaces any earlier schedule; today's membership stays until then
            user.scheduled[seg.id] = Scheduled(add.starts_at, expires_at)
            continue
        user.scheduled.pop(seg.id, None)
        _drop_if_expired(user, seg, now, out)
        old = user.memberships.get(seg.id)
        user.exclusions.discard(seg.id)
        user.memberships[seg.id] = Membership("manual", old.added_at if old else now, expires_at)
        if old is None or old.expires_at != expires_at:
            out.changes.append(Change("added", user.user_id, seg, "command", expires_at, now))
    for seg in to_remove:
        user.scheduled.pop(seg.id, None)
        _drop_if_expired(user, seg, now, out)
        user.exclusions.add(seg.id)
        old = user.memberships.pop(seg.id, None)
        if old is not None:
            out.changes.append(Change("removed", user.user_id, seg, "command", old.expires_at, now))
    _register(user, rollouts, now, out)
    return out


def register_user(user: UserState, rollouts: list[Segment], now: datetime) -> Outcome:
    """RegisterUsers for one user: known users are left as they are."""
    out = Outcome()
    _register(user, rollouts, now, out)
    return out


def expire_membership(cmd: ExpireMembership, user: UserState, segment: Segment | None, now: datetime) -> Outcome:
    """Remove the membership only if it still expires at that time and that time has passed."""
    out = Outcome()
    if segment is None:
        return out
    m = user.memberships.get(segment.id)
    if m is None or m.expires_at != cmd.expires_at:
        return out
    if not m.expired(now):
        raise NotDueYetError(cmd.command_id)
    _expire_into_rollout(user, segment, m, now, out)
    return out


def _expire_into_rollout(user: UserState, segment: Segment, m: Membership, now: datetime, out: Outcome) -> None:
    _expire(user, segment, m, out)
    if segment.id not in user.exclusions and segment.rolls_out_to(user.user_id):
        # Still inside the segment's rollout: the user stays, now as a rollout member.
        user.memberships[segment.id] = Membership("auto_percent", now, None)
        out.changes.append(Change("added", user.user_id, segment, "auto_percent", None, now))


def start_membership(cmd: StartMembership, user: UserState, segment: Segment | None, now: datetime) -> Outcome:
    """Begin a scheduled membership, only if it is still scheduled at that time and that time has passed.

    It is what an add at `starts_at` would have done (the exclusion lifted, an `added` event unless the user
    already held it with that expiry), dated `starts_at`; a start applied after its own expiry also expires.
    """
    out = Outcome()
    s = user.scheduled.get(segment.id) if segment is not None else None
    if segment is None or s is None or s.starts_at != cmd.starts_at:
        return out
    if s.starts_at > now:
        raise NotDueYetError(cmd.command_id)
    del user.scheduled[segment.id]
    user.exclusions.discard(segment.id)
    _drop_if_expired(user, segment, s.starts_at, out)
    old = user.memberships.get(segment.id)
    started = Membership("manual", old.added_at if old else s.starts_at, s.expires_at)
    user.memberships[segment.id] = started
    if old is None or old.expires_at != s.expires_at:
        out.changes.append(Change("added", user.user_id, segment, "scheduled", s.expires_at, s.starts_at))
    if started.expired(now):
        _expire_into_rollout(user, segment, started, now, out)
    return out


def layer_placement(layer: str | None, taken: list[Range], start: int | None, auto_percent: Decimal
                    ) -> tuple[int | None, int | None]:
    """A segment's `(bucket_start, bucket_end)` at `auto_percent`: `(None, None)` outside layers and in a layer
    before its first percent; its start is kept once it has one. LAYER_FULL if `taken` (the ranges of the
    layer's other live segments) leaves no room."""
    size = threshold(auto_percent)
    if layer is None or (start is None and size == 0):
        return None, None
    placed = layer_range(taken, start, size)
    if placed is None:
        raise CommandRejectedError(
            ErrorCode.LAYER_FULL,
            f"layer {layer} has no free range of {size} buckets" + (f" from bucket {start}" if start is not None else ""),
            {"layer": layer, "buckets": size},
        )
    return placed
