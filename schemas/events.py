"""Events published by the outbox relay."""
from typing import Annotated, Literal

from pydantic import Field, SerializerFunctionWrapHandler, model_serializer

from schemas.common import CommandId, Message, Percent, Slug, UserId, UtcTime

MembershipChange = Literal["added", "removed"]
Reason = Literal["command", "auto_percent", "expired", "segment_deleted", "scheduled"]
# Written only for a segment in a layer (left out of the JSON otherwise; in a layer a missing range is null).
_IN_LAYER = Field(default=None, exclude_if=lambda v: v is None)
Bucket = Annotated[int, Field(ge=0, le=10_000)]


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
    """A segment was created, updated or deleted (`segmentation.segment-changed.v1`, key slug).

    A segment in a layer also carries `layer` and its bucket range `[bucket_start, bucket_end)` (null before it
    first has a percent).
    """

    event_id: str
    type: Literal["SegmentChanged"] = "SegmentChanged"
    change: Literal["created", "updated", "deleted"]
    slug: Slug
    description: str | None
    auto_percent: Percent
    occurred_at: UtcTime
    command_id: CommandId
    layer: Slug | None = _IN_LAYER
    bucket_start: Bucket | None = _IN_LAYER
    bucket_end: Bucket | None = _IN_LAYER

    @model_serializer(mode="wrap")
    def _null_range_in_a_layer(self, handler: SerializerFunctionWrapHandler):  # type: ignore[no-untyped-def]  # noqa: ANN202 (an annotation would replace the schema)
        data = handler(self)
        if self.layer is not None:
            data.setdefault("bucket_start", None)
            data.setdefault("bucket_end", None)
        return data
