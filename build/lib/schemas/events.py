"""Events published by the outbox relay."""
from typing import Literal

from schemas.common import CommandId, Message, Percent, Slug, UserId, UtcTime

MembershipChange = Literal["added", "removed"]
Reason = Literal["command", "auto_percent", "expired", "segment_deleted"]


class MembershipChanged(Message):
    """A user's membership of a segment changed (`segmentation.membership-changed.v1`, key user id)."""

    event_id: str
    type: Literal["MembershipChanged"] = "MembershipChanged"
    change: MembershipChange
    user_id: UserId
    slug: Slug
    reason: Reason
    expires_at: UtcTime | None
    occurred_at: UtcTime
    command_id: CommandId | None


class SegmentChanged(Message):
    """A segment was created, updated or deleted (`segmentation.segment-changed.v1`, key slug)."""

    event_id: str
    type: Literal["SegmentChanged"] = "SegmentChanged"
    change: Literal["created", "updated", "deleted"]
    slug: Slug
    description: str | None
    auto_percent: Percent
    occurred_at: UtcTime
    command_id: CommandId
