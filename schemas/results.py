"""Command results (`segmentation.command-results.v1`, key command id)."""
from enum import StrEnum
from typing import Any, Literal

from schemas.common import CommandId, Message, UtcTime


class ErrorCode(StrEnum):
    """Why a command was rejected."""

    INVALID_COMMAND = "INVALID_COMMAND"
    SEGMENT_NOT_FOUND = "SEGMENT_NOT_FOUND"
    SEGMENT_EXISTS = "SEGMENT_EXISTS"
    IDEMPOTENCY_CONFLICT = "IDEMPOTENCY_CONFLICT"
    LAYER_FULL = "LAYER_FULL"


class ErrorInfo(Message):
    """The reason of a rejection; `details` lists the slugs at fault where there are some."""

    code: ErrorCode
    message: str
    details: dict[str, Any] | None = None


class CommandResult(Message):
    """The outcome of one command; `events` counts the MembershipChanged events it caused."""

    command_id: CommandId
    type: str
    status: Literal["applied", "rejected"]
    error: ErrorInfo | None
    events: int
    processed_at: UtcTime
