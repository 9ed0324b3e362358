"""Handlers of segment commands: one row lock, then set-based SQL for every fan-out, a slice of users at a time.

Each returns an `Outcome`: the MembershipChanged events it wrote, its SegmentChanged event, the rollout to run.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from decimal import Decimal

import asyncpg

from schemas.commands import CreateSegment, DeleteSegment, UpdateSegment
from schemas.common import format_time
from schemas.events import SegmentChanged
from schemas.results import ErrorCode
from service.bucket import segment_salt, threshold
from service.domain import CommandRejectedError, Segment, layer_placement
from service.infra import db
from service.write import rollouts, sql
from service.write.change_set import ChangeSet
from service.write.outbox import new_id
from service.write.rollouts import Rollout

# What a segment handler did: the events it wrote, its SegmentChanged (None: the segment itself did not change) and
# the rollout it leaves to run (the batch commits it a pass at a time, see service/write/rollouts.py).
Outcome = tuple[int, SegmentChanged | None, Rollout | None]


def segment_of(row: asyncpg.Record) -> Segment:
    """A segment row (with layer and bucket_start) as the rules see it."""
    return Segment(row["id"], row["slug"], row["salt"], row["auto_percent"], row["layer"], row["bucket_start"])


def _segment_changed(change: str, seg: Segment, description, now: datetime, command_id: str) -> SegmentChanged:
    in_layer: dict = {}
    if seg.layer is not None:
        end = None if seg.bucket_start is None else seg.bucket_start + threshold(seg.auto_percent)
        in_layer = {"layer": seg.layer, "bucket_start": seg.bucket_start, "bucket_end": end}
    return SegmentChanged(
        event_id=new_id(), change=change, slug=seg.slug, description=description,
        auto_percent=seg.auto_percent, occurred_at=now, command_id=command_id, **in_layer,
    )


async def _placed(conn: asyncpg.Connection, seg: Segment, percent: Decimal) -> Segment:
    """`seg` at `percent`, with its layer range (kept start, or first-fit); LAYER_FULL if there is no room."""
    if seg.layer is not None and percent:
        await rollouts.settle_layer(conn, seg.layer)
    taken = [] if seg.layer is None else [tuple(r) for r in await conn.fetch(sql.LAYER_RANGES, seg.layer, seg.id)]
    start, _end = layer_placement(seg.layer, taken, seg.bucket_start, percent)
    return Segment(seg.id, seg.slug, seg.salt, percent, seg.layer, start)


def line(seg: Segment) -> int:
    """The end of a segment's rollout range on its hash (its start plus its percent in buckets)."""
    return (seg.bucket_start or 0) + threshold(seg.auto_percent)


async def _locked(conn: asyncpg.Connection, slug: str) -> asyncpg.Record:
    await rollouts.settle(conn, [slug])  # before the row lock, which the rollout's passes take
    row = await conn.fetchrow(sql.LOCK_SEGMENT_FOR_UPDATE, slug)
    if row is None:
        raise CommandRejectedError(ErrorCode.SEGMENT_NOT_FOUND, f"unknown or deleted segment: {slug}", {"slugs": [slug]})
    await rollouts.not_rolling(conn, [slug])
    return row


async def _starting_a_rollout(conn: asyncpg.Connection, percent) -> None:
    """Before any segment lock: wait for registrations in flight, hold new ones off (see sql.LOCK_ROLLOUT_SHARED).
    Polled rather than queued for."""
    if percent:
        async def locked() -> bool:
            return await conn.fetchval(sql.TRY_LOCK_ROLLOUT_EXCLUSIVE, db.ROLLOUT_LOCK)
        await rollouts.poll(conn, locked, "the rollout lock stayed taken")


async def fan_out(conn: asyncpg.Connection, statement: str, args: tuple, slices: AsyncIterator[tuple]) -> int:
    """Apply a fan-out `statement` (its users the last arguments: a slice) to each slice, in the caller's
    transaction; returns the events written. With the bulk work_mem: a slice's outbox rows are sorted by user in
    memory (with the default 4 MB, 20 000 of them spilled to disk)."""
    await conn.execute(sql.BULK_WORK_MEM)
    events = 0
    async for piece in slices:
        events += await conn.fetchval(statement, *args, *piece)
    return events


async def in_slices(user_ids: list[int], slice_size: int) -> AsyncIterator[tuple]:
    for i in range(0, len(user_ids), slice_size):
        yield (user_ids[i:i + slice_size],)


async def create_segment(conn: asyncpg.Connection, cmd: CreateSegment, changes: ChangeSet,
                         slice_size: int) -> Outcome:
    await _starting_a_rollout(conn, cmd.auto_percent)
    if await conn.fetchrow(sql.LOCK_SEGMENT_FOR_UPDATE, cmd.slug) is not None:
        raise CommandRejectedError(ErrorCode.SEGMENT_EXISTS, f"segment already exists: {cmd.slug}", {"slugs": [cmd.slug]})
    now, percent = changes.now, cmd.auto_percent or Decimal(0)
    segment_id = await conn.fetchval(sql.NEXT_SEGMENT_ID)
    seg = await _placed(conn, Segment(segment_id, cmd.slug, segment_salt(cmd.slug, segment_id), layer=cmd.layer),
                        percent)
    try:
        await conn.execute(sql.INSERT_SEGMENT, segment_id, cmd.slug, cmd.description, percent, seg.salt, now,
                           seg.layer, seg.bucket_start, line(seg) if seg.bucket_start is not None else None)
    except asyncpg.UniqueViolationError:  # created meanwhile by a command keyed to another partition
        raise CommandRejectedError(ErrorCode.SEGMENT_EXISTS, f"segment already exists: {cmd.slug}",
                                   {"slugs": [cmd.slug]}) from None
    event = _segment_changed("created", seg, cmd.description, now, cmd.command_id)
    if percent == 0:
        return 0, event, None
    return 0, event, Rollout(segment_id, cmd.slug, seg.bucket_salt, True, seg.bucket_start or 0, line(seg), now)


async def update_segment(conn: asyncpg.Connection, cmd: UpdateSegment, changes: ChangeSet,
                         slice_size: int) -> Outcome:
    await _starting_a_rollout(conn, cmd.auto_percent)
    row = await _locked(conn, cmd.slug)
    now = changes.now
    description = row["description"] if cmd.description is None else cmd.description
    old = segment_of(row)
    new = old if cmd.auto_percent in (None, old.auto_percent) else await _placed(conn, old, cmd.auto_percent)
    await conn.execute(sql.UPDATE_SEGMENT, row["id"], description, new.auto_percent, now, new.bucket_start,
                       line(new) if new.bucket_start is not None else None)
    event = _segment_changed("updated", new, description, now, cmd.command_id)
    # In a layer the start is kept, so both lines lie on one range: only the users between them move.
    if new.auto_percent > old.auto_percent:  # only the users between the old and the new line join
        first = (new.bucket_start or 0) + threshold(old.auto_percent)
        return 0, event, Rollout(row["id"], cmd.slug, new.bucket_salt, True, first, line(new), now)
    if new.auto_percent < old.auto_percent:  # only rollout members above the new line leave; explicit members stay
        return 0, event, Rollout(row["id"], cmd.slug, new.bucket_salt, False, line(new), None, now)
    return 0, event, None


async def delete_segment(conn: asyncpg.Connection, cmd: DeleteSegment, changes: ChangeSet,
                         slice_size: int) -> Outcome:
    row = await _locked(conn, cmd.slug)
    now = changes.now
    args = (row["id"], cmd.slug, now, format_time(now), cmd.command_id)
    members = rollouts.walk(conn, slice_size, sql.FAN_OUT_SEGMENT_MEMBERS, row["id"])
    removed = await fan_out(conn, sql.SEGMENT_DELETE_MEMBERS, args, members)
    await conn.execute(sql.DELETE_SEGMENT_EXCLUSIONS, row["id"])
    await conn.execute(sql.DELETE_SEGMENT_SCHEDULES, row["id"])  # not members yet: no events
    await conn.execute(sql.MARK_SEGMENT_DELETED, row["id"], now)  # its layer range is free from now on
    return removed, _segment_changed("deleted", segment_of(row), row["description"], now, cmd.command_id), None
