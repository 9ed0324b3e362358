"""Handlers of segment commands: one row lock, then set-based SQL for every fan-out.

Each returns the number of MembershipChanged events it wrote and its SegmentChanged event.
"""
from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal

import asyncpg

from schemas.commands import CreateSegment, DeleteSegment, UpdateSegment
from schemas.common import format_time
from schemas.events import SegmentChanged
from schemas.results import ErrorCode
from service.bucket import segment_salt, threshold
from service.domain import CommandRejectedError
from service.infra import db
from service.write import sql
from service.write.change_set import ChangeSet


def _segment_changed(change: str, slug: str, description, percent, now: datetime, command_id: str) -> SegmentChanged:
    return SegmentChanged(
        event_id=str(uuid.uuid4()), change=change, slug=slug, description=description,
        auto_percent=percent, occurred_at=now, command_id=command_id,
    )


async def _locked(conn: asyncpg.Connection, slug: str) -> asyncpg.Record:
    row = await conn.fetchrow(sql.LOCK_SEGMENT_FOR_UPDATE, slug)
    if row is None:
        raise CommandRejectedError(ErrorCode.SEGMENT_NOT_FOUND, f"unknown or deleted segment: {slug}", {"slugs": [slug]})
    return row


async def _starting_a_rollout(conn: asyncpg.Connection, percent) -> None:
    """Before any segment lock: wait for registrations in flight, hold new ones off (see sql.LOCK_ROLLOUT_SHARED)."""
    if percent:
        await conn.execute(sql.LOCK_ROLLOUT_EXCLUSIVE, db.ROLLOUT_LOCK)


async def create_segment(conn: asyncpg.Connection, cmd: CreateSegment, changes: ChangeSet) -> tuple[int, SegmentChanged]:
    await _starting_a_rollout(conn, cmd.auto_percent)
    if await conn.fetchrow(sql.LOCK_SEGMENT_FOR_UPDATE, cmd.slug) is not None:
        raise CommandRejectedError(ErrorCode.SEGMENT_EXISTS, f"segment already exists: {cmd.slug}", {"slugs": [cmd.slug]})
    now, percent = changes.now, cmd.auto_percent or Decimal(0)
    segment_id = await conn.fetchval(sql.NEXT_SEGMENT_ID)
    salt = segment_salt(cmd.slug, segment_id)
    try:
        await conn.execute(sql.INSERT_SEGMENT, segment_id, cmd.slug, cmd.description, percent, salt, now)
    except asyncpg.UniqueViolationError:  # created meanwhile by a command keyed to another partition
        raise CommandRejectedError(ErrorCode.SEGMENT_EXISTS, f"segment already exists: {cmd.slug}",
                                   {"slugs": [cmd.slug]}) from None
    event = _segment_changed("created", cmd.slug, cmd.description, percent, now, cmd.command_id)
    if percent == 0:
        return 0, event
    return await conn.fetchval(
        sql.ROLLOUT_ADD, segment_id, cmd.slug, now, format_time(now), cmd.command_id, salt, 0, threshold(percent)
    ), event


async def update_segment(conn: asyncpg.Connection, cmd: UpdateSegment, changes: ChangeSet) -> tuple[int, SegmentChanged]:
    await _starting_a_rollout(conn, cmd.auto_percent)
    row = await _locked(conn, cmd.slug)
    now = changes.now
    description = row["description"] if cmd.description is None else cmd.description
    old = row["auto_percent"]
    new = old if cmd.auto_percent is None else cmd.auto_percent
    await conn.execute(sql.UPDATE_SEGMENT, row["id"], description, new, now)
    event = _segment_changed("updated", cmd.slug, description, new, now, cmd.command_id)
    args = (row["id"], cmd.slug, now, format_time(now), cmd.command_id, row["salt"])
    if new > old:  # only the users between the old and the new line join
        return await conn.fetchval(sql.ROLLOUT_ADD, *args, threshold(old), threshold(new)), event
    if new < old:  # only rollout members above the new line leave; explicit members stay
        return await conn.fetchval(sql.ROLLOUT_REMOVE, *args, threshold(new)), event
    return 0, event


async def delete_segment(conn: asyncpg.Connection, cmd: DeleteSegment, changes: ChangeSet) -> tuple[int, SegmentChanged]:
    row = await _locked(conn, cmd.slug)
    now = changes.now
    removed = await conn.fetchval(
        sql.SEGMENT_DELETE_MEMBERS, row["id"], cmd.slug, now, format_time(now), cmd.command_id
    )
    await conn.execute(sql.DELETE_SEGMENT_EXCLUSIONS, row["id"])
    await conn.execute(sql.MARK_SEGMENT_DELETED, row["id"], now)
    return removed, _segment_changed("deleted", cmd.slug, row["description"], row["auto_percent"], now, cmd.command_id)
