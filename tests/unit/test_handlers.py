"""The user-command handlers on in-memory state (a unit of work that is never flushed) and a fixed clock."""
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from schemas.commands import ExpireMembership, RegisterUsers, UpdateUserSegments
from service.domain import CommandRejectedError, Membership, Segment, UserState
from service.write import user_handlers
from service.write.change_set import ChangeSet
from service.write.user_handlers import RunContext

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
A = Segment(1, "A", "A:1")
ALL = Segment(2, "ALL", "ALL:2", Decimal(100))


def context(*users: UserState) -> RunContext:
    changes = ChangeSet(NOW)
    for u in users:
        changes.users[u.user_id] = u
    return RunContext(changes, {s.slug: s for s in (A, ALL)}, [ALL])


def events(ctx: RunContext) -> list[tuple]:
    return [(e["change"], e["user_id"], e["slug"], e["reason"], e["command_id"])
            for e in (json.loads(r.payload) for r in ctx.changes.outbox if r.kind == "membership")]


def test_update_user_segments_records_history_events_and_registration():
    ctx = context(UserState(7))
    n = user_handlers.update_user_segments(UpdateUserSegments(command_id="c", user_id=7, add=["A"]), ctx)
    assert n == 2
    assert events(ctx) == [("added", 7, "A", "command", "c"), ("added", 7, "ALL", "auto_percent", "c")]
    assert [(h[0], h[1], h[3], h[5]) for h in ctx.changes.history] == [(7, "A", "added", "command"),
                                                                     (7, "ALL", "added", "auto_percent")]
    assert ctx.changes.registered == {7}


def test_a_rejected_update_leaves_the_state_and_the_unit_of_work_untouched():
    user = UserState(7, known=True, memberships={1: Membership("manual", NOW, None)})
    ctx = context(user)
    with pytest.raises(CommandRejectedError):
        user_handlers.update_user_segments(UpdateUserSegments(command_id="c", user_id=7, add=["A"], remove=["A"]), ctx)
    assert ctx.changes.users[7].memberships == {1: Membership("manual", NOW, None)}
    assert ctx.changes.outbox == [] and ctx.changes.history == [] and ctx.changes.registered == set()


def test_register_users_registers_only_the_unknown():
    ctx = context(UserState(1, known=True), UserState(2))
    n = user_handlers.register_users(RegisterUsers(command_id="r", user_ids=[1, 2, 2]), ctx)
    assert n == 1 and ctx.changes.registered == {2}
    assert events(ctx) == [("added", 2, "ALL", "auto_percent", "r")]


def test_expire_membership_dates_the_history_at_the_expiry():
    at = NOW - timedelta(seconds=3)
    ctx = context(UserState(5, known=True, memberships={1: Membership("manual", NOW - timedelta(hours=1), at)}))
    n = user_handlers.expire_membership(ExpireMembership(command_id="e", user_id=5, slug="A", expires_at=at), ctx)
    assert n == 1 and events(ctx) == [("removed", 5, "A", "expired", "e")]
    assert ctx.changes.history[0][4] == at
    assert ctx.changes.earliest_expiry is None  # nothing new to wake the TTL producer for
