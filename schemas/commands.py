"""Commands published to `segmentation.commands.v1`."""
import functools
from typing import Annotated, Literal

from pydantic import Field, TypeAdapter

from schemas.common import CommandId, Description, Message, Percent, Slug, UserId, UtcTime

MAX_SLUGS_PER_COMMAND = 1000
MAX_USERS_PER_REGISTRATION = 10_000
MAX_USERS_PER_SEGMENT_UPDATE = 100_000


class CommandBase(Message):
    command_id: CommandId
    issued_at: UtcTime | None = None


class CreateSegment(CommandBase):
    """Create a segment, optionally rolled out to a percent of users (exclusively within its `layer`)."""

    type: Literal["CreateSegment"] = "CreateSegment"
    slug: Slug
    description: Description | None = None
    auto_percent: Percent | None = None
    layer: Slug | None = None


class UpdateSegment(CommandBase):
    """Change a segment's description or rollout percent."""

    type: Literal["UpdateSegment"] = "UpdateSegment"
    slug: Slug
    description: Description | None = None
    auto_percent: Percent | None = None


class DeleteSegment(CommandBase):
    """Delete a segment: every member leaves it."""

    type: Literal["DeleteSegment"] = "DeleteSegment"
    slug: Slug


class SlugAdd(Message):
    """One slug to add, with an optional expiry and an optional start (the TTL then counts from the start)."""

    slug: Slug
    expires_at: UtcTime | None = None
    ttl_seconds: int | None = Field(default=None, strict=True)
    starts_at: UtcTime | None = None


@functools.lru_cache(maxsize=4096)
def _plain_add(slug: str) -> SlugAdd:
    """A plain slug as a `SlugAdd` (frozen, so one per slug is shared): building the model costs ~5 µs, on the worker's
    hot path twice per slug before."""
    return SlugAdd(slug=slug)


class UpdateUserSegments(CommandBase):
    """Add and remove a user's segments in one atomic step.

    The rules that make a well-formed command invalid (a slug in both lists, an expiry in the past,
    both expiry fields, a non-positive TTL, more than 1 000 slugs) are checked by the worker and
    answered with an `INVALID_COMMAND` result, not dead-lettered.
    """

    type: Literal["UpdateUserSegments"] = "UpdateUserSegments"
    user_id: UserId
    add: list[Slug | SlugAdd] = Field(default_factory=list)
    remove: list[Slug] = Field(default_factory=list)
    ttl_seconds: int | None = Field(default=None, strict=True)

    def added(self) -> list[SlugAdd]:
        """`add` with every plain slug spelled as a `SlugAdd`."""
        return [_plain_add(a) if isinstance(a, str) else a for a in self.add]


class RegisterUsers(CommandBase):
    """Make users known, so rolled-out segments reach them with events and history."""

    type: Literal["RegisterUsers"] = "RegisterUsers"
    user_ids: list[UserId] = Field(min_length=1, max_length=MAX_USERS_PER_REGISTRATION)


class ExpireMembership(CommandBase):
    """Published by the scheduler (TTL producer): remove a membership whose time is up."""

    type: Literal["ExpireMembership"] = "ExpireMembership"
    user_id: UserId
    slug: Slug
    expires_at: UtcTime


class StartMembership(CommandBase):
    """Published by the scheduler (TTL producer): a scheduled membership's start is due."""

    type: Literal["StartMembership"] = "StartMembership"
    user_id: UserId
    slug: Slug
    starts_at: UtcTime


class UpdateSegmentMembers(CommandBase):
    """Add and remove users of one segment in one atomic step (an uploaded list); keyed by the slug.

    For each user it does what an `UpdateUserSegments` naming only this slug would do. The rules that make a
    well-formed command invalid (a user in both lists or listed twice, more than 100 000 ids, an expiry in the
    past, both expiry fields) are checked by the worker and answered with `INVALID_COMMAND`, not dead-lettered.
    """

    type: Literal["UpdateSegmentMembers"] = "UpdateSegmentMembers"
    slug: Slug
    add: list[UserId] = Field(default_factory=list)
    remove: list[UserId] = Field(default_factory=list)
    ttl_seconds: int | None = Field(default=None, strict=True)
    expires_at: UtcTime | None = None
    starts_at: UtcTime | None = None


COMMAND_MODELS = (CreateSegment, UpdateSegment, DeleteSegment, UpdateUserSegments, RegisterUsers, ExpireMembership,
                  UpdateSegmentMembers, StartMembership)
Command = Annotated[
    CreateSegment | UpdateSegment | DeleteSegment | UpdateUserSegments | RegisterUsers | ExpireMembership
    | UpdateSegmentMembers | StartMembership,
    Field(discriminator="type"),
]
COMMAND_ADAPTER: TypeAdapter[Command] = TypeAdapter(Command)
COMMAND_TYPES = {m.model_fields["type"].default: m for m in COMMAND_MODELS}
USER_COMMANDS = (UpdateUserSegments, RegisterUsers, ExpireMembership, StartMembership)
# Keyed by slug, each alone in its transaction (UpdateSegmentMembers too: it names one segment).
SEGMENT_COMMANDS = (CreateSegment, UpdateSegment, DeleteSegment, UpdateSegmentMembers)
SCHEDULER_COMMANDS = (ExpireMembership, StartMembership)


def command_key(command: Command) -> bytes:
    """The Kafka key of a command: the user id for user commands (per-user order), the slug for segment ones."""
    if isinstance(command, RegisterUsers):
        return str(command.user_ids[0]).encode()
    if isinstance(command, USER_COMMANDS):
        return str(command.user_id).encode()
    return command.slug.encode()
