"""Answers of the read-only HTTP API."""
from typing import Literal

from pydantic import BaseModel, ConfigDict

from schemas.common import Percent, UtcTime


class _Answer(BaseModel):
    model_config = ConfigDict(frozen=True)


class UserSegment(_Answer):
    slug: str
    added_at: UtcTime
    expires_at: UtcTime | None
    source: Literal["manual", "auto_percent"]


class UserSegments(_Answer):
    user_id: int
    segments: list[UserSegment]


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


class ReportLink(_Answer):
    url: str


class ErrorDetail(_Answer):
    code: str
    message: str


class ErrorBody(_Answer):
    error: ErrorDetail
