"""Answers of the read-only HTTP API."""
from typing import Literal

from pydantic import BaseModel, ConfigDict

from schemas.common import Percent, UtcTime

Source = Literal["manual", "auto_percent"]


class _Answer(BaseModel):
    model_config = ConfigDict(frozen=True)


class UserSegment(_Answer):
    slug: str
    added_at: UtcTime
    expires_at: UtcTime | None
    source: Source


class UserSegments(_Answer):
    user_id: int
    segments: list[UserSegment]


class Explain(_Answer):
    """Why the user has the segment: `bucket` and `threshold` are null for a segment without a rollout.

    Outside a layer the user is in the rollout iff bucket < threshold; in a layer `bucket` is the layer's
    bucket and `threshold` the end of the segment's range."""

    source: Source
    bucket: int | None
    threshold: int | None
    layer: str | None
    expires_in_seconds: float | None


class ExplainedSegment(UserSegment):
    explain: Explain


class Excluded(_Answer):
    """A rollout the user would be in but for an explicit removal, since then."""

    slug: str
    since: UtcTime
    bucket: int
    threshold: int


class Scheduled(_Answer):
    """An added membership whose start has not come yet."""

    slug: str
    starts_at: UtcTime
    expires_at: UtcTime | None


class ExplainedUserSegments(_Answer):
    """The answer with `explain=true`."""

    user_id: int
    segments: list[ExplainedSegment]
    excluded: list[Excluded]
    scheduled: list[Scheduled]


class SegmentInfo(_Answer):
    slug: str
    description: str | None
    auto_percent: Percent
    member_count: int
    created_at: UtcTime
    deleted_at: UtcTime | None
    layer: str | None
    bucket_start: int | None  # a layer's segment: its bucket range [bucket_start, bucket_end); else null
    bucket_end: int | None


class SegmentList(_Answer):
    segments: list[SegmentInfo]


class Member(_Answer):
    user_id: int
    added_at: UtcTime
    expires_at: UtcTime | None
    source: Source


class MemberPage(_Answer):
    """One page of a live segment's known members, by user id; `next_cursor` null on the last page."""

    slug: str
    members: list[Member]
    next_cursor: str | None


class SegmentChange(_Answer):
    segment_id: int
    change: Literal["created", "updated", "deleted"]
    description: str | None
    auto_percent: Percent
    layer: str | None
    occurred_at: UtcTime
    command_id: str | None


class SegmentHistory(_Answer):
    """Every create, update and delete of every incarnation of a slug, oldest first."""

    slug: str
    changes: list[SegmentChange]


class ReportLink(_Answer):
    url: str


class ErrorDetail(_Answer):
    code: str
    message: str


class ErrorBody(_Answer):
    error: ErrorDetail
