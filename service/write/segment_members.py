"""UpdateSegmentMembers: an uploaded list of users added to or removed from one segment, in set-based SQL.

For each user it does what an UpdateUserSegments naming only this slug does (the same statements' order is the
rules' order), with a handful of statements for all of them. Locks are taken in the global order: the users'
rows (id order: a user's own commands on other partitions wait, or are waited for, so its events keep commit
order), the rollout lock if some users are new, then the segment (and, for new users, every rolled-out segment)
`FOR SHARE`. Users it does not name are never waited for.
"""
from __future__ import annotations

import asyncpg

from schemas.commands import UpdateSegmentMembers
from schemas.common import format_time
from schemas.results import ErrorCode
from service import domain
from service.domain import CommandRejectedError
from service.infra import db
from service.write import rollouts, sql
from service.write.change_set import ChangeSet
from service.write.segment_handlers import Outcome, fan_out, in_slices, line, segment_of


async def update_segment_members(conn: asyncpg.Connection, cmd: UpdateSegmentMembers, changes: ChangeSet,
                                 slice_size: int) -> Outcome:
    now = changes.now
    domain.validate_segment_members(cmd, now)
    named = sorted(cmd.add + cmd.remove)
    new = [r["user_id"] for r in await conn.fetch(sql.LOCK_OR_INSERT_USERS, named, now)]
    if new:
        await conn.execute(sql.LOCK_ROLLOUT_SHARED, db.ROLLOUT_LOCK)
    await rollouts.settle(conn, [cmd.slug])  # its own segment only (see rollouts.py), before its row lock
    segments = [segment_of(r) for r in await conn.fetch(sql.LOCK_SEGMENTS_FOR_SHARE, [cmd.slug], bool(new))]
    seg = next((s for s in segments if s.slug == cmd.slug), None)
    if seg is None:
        raise CommandRejectedError(ErrorCode.SEGMENT_NOT_FOUND, f"unknown or deleted segment: {cmd.slug}",
                                   {"slugs": [cmd.slug]})
    await rollouts.not_rolling(conn, [cmd.slug])
    # 100 000 rows per statement: sorted and staged in memory instead of temporary files (this transaction only).
    await conn.execute(sql.BULK_WORK_MEM)
    args = (seg.id, seg.slug, now, format_time(now), cmd.command_id)
    expires_at = domain.expiry(cmd.expires_at, cmd.ttl_seconds, cmd.starts_at, now)
    events = 0
    # A later add or remove replaces or cancels a schedule; a scheduled add leaves today's membership alone.
    await conn.execute(sql.MEMBERS_UNSCHEDULE, seg.id, named)
    if cmd.starts_at is not None:
        await conn.execute(sql.MEMBERS_SCHEDULE, seg.id, cmd.add, now, cmd.starts_at, expires_at, cmd.command_id)
        changes.due_at(cmd.starts_at)
        touched = cmd.remove
    else:
        touched = named
    events += await conn.fetchval(sql.MEMBERS_DROP_EXPIRED, *args, touched)
    if cmd.starts_at is None and cmd.add:
        await conn.execute(sql.MEMBERS_INCLUDE, seg.id, cmd.add)
        events += await conn.fetchval(sql.MEMBERS_ADD, *args, cmd.add, expires_at)
        if expires_at is not None:
            changes.due_at(expires_at)
    if cmd.remove:
        await conn.execute(sql.MEMBERS_EXCLUDE, seg.id, cmd.remove, now)
        events += await conn.fetchval(sql.MEMBERS_REMOVE, *args, cmd.remove)
    for rollout in (s for s in segments if s.auto_percent > 0 and new):  # id order, as the rules register
        joins = (rollout.id, rollout.slug, now, format_time(now), cmd.command_id, rollout.bucket_salt,
                 rollout.bucket_start or 0, line(rollout))
        events += await fan_out(conn, sql.ROLLOUT_ADD_LISTED, joins, in_slices(new, slice_size))
    return events, None, None
