"""The wire contract: commands, events, results and HTTP answers. No behaviour, no I/O."""
from schemas.commands import (
    COMMAND_ADAPTER,
    COMMAND_TYPES,
    Command,
    CreateSegment,
    DeleteSegment,
    ExpireMembership,
    RegisterUsers,
    SlugAdd,
    StartMembership,
    UpdateSegment,
    UpdateSegmentMembers,
    UpdateUserSegments,
)
from schemas.events import MembershipChanged, SegmentChanged
from schemas.results import CommandResult, ErrorCode, ErrorInfo

__all__ = [
    "Command", "COMMAND_ADAPTER", "COMMAND_TYPES", "CreateSegment", "DeleteSegment", "ExpireMembership",
    "RegisterUsers", "SlugAdd", "StartMembership", "UpdateSegment", "UpdateSegmentMembers", "UpdateUserSegments",
    "MembershipChanged", "SegmentChanged", "CommandResult", "ErrorCode", "ErrorInfo",
]
