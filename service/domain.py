"""Pure domain rules: state and a time in, decisions and changes out. No I/O, no clock reads."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from schemas.commands import MAX_SLUGS_PER_COMMAND, ExpireMembership, SlugAdd, UpdateUserSegments
from schemas.results import ErrorCode, ErrorInfo
from service.bucket import in_rollout


class CommandRejectedError(Exception):
    """A command that breaks a rule: rejected whole, with a code."""

    def __init__(self, code: ErrorCode, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.info = ErrorInfo(code=code, message=message, details=details)


class NotDueYetError(Exception):
    """An ExpireMembership that came before its time (a clock behind the TTL producer's): nothing to do yet."""


MAX_TTL_SECONDS = 100 * 366 * 24 * 3600


@dataclass(frozen=True)
class Segment:
    """A live segment as the rules see it."""

    id: int
    slug: str
    salt: str
    auto_percent: Decimal = Decimal(0)

    def rolls_out_to(self, user_id: int) -> bool:
        return self.auto_percent > 0 and in_rollout(self.salt, user_id, self.auto_percent)


@dataclass(frozen=True)
class Membership:
    source: str  # 'manual' | 'auto_percent'
    added_at: datetime
    expires_at: datetime | None

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= now


@dataclass
class UserState:
    """One user's memberships and exclusions, by segment id."""

    user_id: int
    known: bool = False
    memberships: dict[int, Membership] = field(default_factory=dict)
    exclusions: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class Change:
    """One membership transition: becomes one history row and one MembershipChanged event."""

    change: str  # 'added' | 'removed'
    user_id: int
    segment: Segment
    reason: str  # 'command' | 'auto_percent' | 'expired' | 'segment_deleted'
    expires_at: datetime | None
    occurred_at: datetime


@dataclass
class Outcome:
    """What applying a user command did: the changes, and whether the user became known."""

    changes: list[Change] = field(default_factory=list)
    registered: bool = False


def _expiry(add: SlugAdd, default_ttl: int | None, now: datetime) -> datetime | None:
    if add.expires_at is not None:
        return add.expires_at
    ttl = add.ttl_seconds if add.ttl_seconds is not None else default_ttl
    return now + timedelta(seconds=ttl) if ttl is not None else None


def validate_update(cmd: UpdateUserSegments, now: datetime) -> None:
    """The INVALID_COMMAND rules of UpdateUserSegments."""
    def invalid(message: str, **details: Any) -> CommandRejectedError:
        return CommandRejectedError(ErrorCode.INVALID_COMMAND, message, details or None)

    adds = cmd.added()
    if len(adds) + len(cmd.remove) > MAX_SLUGS_PER_COMMAND:
        raise invalid(f"at most {MAX_SLUGS_PER_COMMAND} slugs in add and remove together")
    added = [a.slug for a in adds]
    for name, slugs in (("add", added), ("remove", cmd.remove)):
        twice = sorted({s for s in slugs if slugs.count(s) > 1})
        if twice:
            raise invalid(f"slugs listed twice in {name}: {', '.join(twice)}", slugs=twice)
    both = sorted(set(added) & set(cmd.remove))
    if both:
        raise invalid(f"slugs both in add and remove: {', '.join(both)}", slugs=both)
    if cmd.ttl_seconds is not None and not 0 < cmd.ttl_seconds <= MAX_TTL_SECONDS:
        raise invalid(f"ttl_seconds must be from 1 to {MAX_TTL_SECONDS}")
    for a in adds:
        if a.expires_at is not None and a.ttl_seconds is not None:
            raise invalid(f"{a.slug}: give either expires_at or ttl_seconds, not both", slugs=[a.slug])
        if a.ttl_seconds is not None and not 0 < a.ttl_seconds <= MAX_TTL_SECONDS:
            raise invalid(f"{a.slug}: ttl_seconds must be from 1 to {MAX_TTL_SECONDS}", slugs=[a.slug])
        if a.expires_at is not None and a.expires_at <= now:
            raise invalid(f"{a.slug}: expires_at is in the past", slugs=[a.slug])


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
    validate_update(cmd, now)
    adds = cmd.added()
    live = _live([a.slug for a in adds] + list(cmd.remove), segments)
    to_add, to_remove = live[: len(adds)], live[len(adds):]
    out = Outcome()
    for seg, add in zip(to_add, adds, strict=True):
        _drop_if_expired(user, seg, now, out)
        expires_at = _expiry(add, cmd.ttl_seconds, now)
        old = user.memberships.get(seg.id)
        user.exclusions.discard(seg.id)
        user.memberships[seg.id] = Membership("manual", old.added_at if old else now, expires_at)
        if old is None or old.expires_at != expires_at:
            out.changes.append(Change("added", user.user_id, seg, "command", expires_at, now))
    for seg in to_remove:
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
    _drop_if_expired(user, segment, now, out)
    if segment.id not in user.exclusions and segment.rolls_out_to(user.user_id):
        # Still inside the segment's rollout: the user stays, now as a rollout member.
        user.memberships[segment.id] = Membership("auto_percent", now, None)
        out.changes.append(Change("added", user.user_id, segment, "auto_percent", None, now))
    return out
