"""Handlers of user commands: the rules run on state loaded once per run; writes go to the change set."""
from __future__ import annotations

from dataclasses import dataclass

from schemas.commands import (
    SCHEDULER_COMMANDS,
    ExpireMembership,
    RegisterUsers,
    StartMembership,
    UpdateUserSegments,
)
from service import domain
from service.domain import Outcome, Segment
from service.write.change_set import ChangeSet


@dataclass
class RunContext:
    """What a run of user commands shares: the change set and the segments locked for it."""

    changes: ChangeSet
    segments: dict[str, Segment]
    rollouts: list[Segment]

    def record(self, outcome: Outcome, user_id: int, command_id: str) -> int:
        if outcome.registered:
            self.changes.registered.add(user_id)
        self.changes.record_changes(outcome.changes, command_id)
        return len(outcome.changes)


def update_user_segments(cmd: UpdateUserSegments, ctx: RunContext) -> int:
    user = ctx.changes.users[cmd.user_id]
    # The rules raise before changing anything; they work on a copy so a rejection leaves no trace.
    trial = domain.UserState(user.user_id, user.known, dict(user.memberships), set(user.exclusions),
                             dict(user.scheduled))
    outcome = domain.update_user_segments(cmd, trial, ctx.segments, ctx.rollouts, ctx.changes.now)
    ctx.changes.users[cmd.user_id] = trial
    return ctx.record(outcome, cmd.user_id, cmd.command_id)


def register_users(cmd: RegisterUsers, ctx: RunContext) -> int:
    events = 0
    for user_id in dict.fromkeys(cmd.user_ids):
        outcome = domain.register_user(ctx.changes.users[user_id], ctx.rollouts, ctx.changes.now)
        events += ctx.record(outcome, user_id, cmd.command_id)
    return events


def expire_membership(cmd: ExpireMembership, ctx: RunContext) -> int:
    user = ctx.changes.users[cmd.user_id]
    outcome = domain.expire_membership(cmd, user, ctx.segments.get(cmd.slug), ctx.changes.now)
    return ctx.record(outcome, cmd.user_id, cmd.command_id)


def start_membership(cmd: StartMembership, ctx: RunContext) -> int:
    user = ctx.changes.users[cmd.user_id]
    outcome = domain.start_membership(cmd, user, ctx.segments.get(cmd.slug), ctx.changes.now)
    return ctx.record(outcome, cmd.user_id, cmd.command_id)


def users_of(cmd) -> list[int]:
    return list(cmd.user_ids) if isinstance(cmd, RegisterUsers) else [cmd.user_id]


def slugs_of(cmd) -> list[str]:
    if isinstance(cmd, UpdateUserSegments):
        return [a if isinstance(a, str) else a.slug for a in cmd.add] + list(cmd.remove)
    if isinstance(cmd, SCHEDULER_COMMANDS):
        return [cmd.slug]
    return []
