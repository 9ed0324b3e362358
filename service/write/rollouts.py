"""A percent rollout's fan-out, committed a pass at a time: the relay publishes its events while it runs.

A rollout moves every known user whose bucket lies between two lines (or every rollout member above the new
line). The command's first pass changes the segment, publishes its SegmentChanged and runs slices of users for
about `pass_seconds`; if users are left, it commits them with its progress (a `fan_outs` row: the last user id
done, the events so far) but without the command's result and consumed offset. The batch then runs the same
record again: a pass that finds the progress row goes on from there, and the pass that reaches the last user
writes the result, the inbox row and the offset, and deletes the progress row. A worker that crashes in between
leaves the offset where it was: the next owner of the partition reads the command again and resumes it.

While a rollout's progress row exists no other segment command may change the segment: one that locks it waits
until the row is gone (`settle`) before it takes the segment's row, which each pass holds for update, and checks
once it holds it (`not_rolling`: a rollout started meanwhile is a lock timeout, retried). A segment placed in a
layer waits for the layer's rollouts the same way (holding only its own row, which their passes do not take). Those
commands share the rollout's key (the slug), so in a batch they come after it. Users' commands do not wait: they
may go to another partition, even to a part of the same batch before the rollout's (a wait there would wait for
itself), and applied between two passes they give what the rules give at the new percent: a user the rollout has
not reached yet is in it already (a raise: their add finds no membership and makes one, the rollout's slice then
skips the user; their remove leaves an exclusion the slice honours) or already out of it (a lowering: their add
takes the rollout membership over as an explicit one, which the slice leaves alone; their remove deletes it). New
users join the rollout at its new percent when registered, and the slice skips them. The read side counts a
rollout membership inside the segment's line only, so it answers the new percent from the first pass on.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from schemas.common import format_time
from service.write import sql

FIRST_BOUND = -(2**63)  # below every user id
_NOTHING = object()


@dataclass(frozen=True)
class Rollout:
    """The users a percent change moves. `joining`: known users with a bucket in [low, high) join (unless
    excluded); otherwise the rollout members with a bucket at or above `low` leave. On `salt`'s hash."""

    segment_id: int
    slug: str
    salt: str
    joining: bool
    low: int
    high: int | None
    occurred_at: datetime

    def statement(self, command_id: str) -> tuple[str, tuple, str, tuple]:
        """The slice statement and its arguments (the slice's bounds follow), the bound query and its own."""
        args = (self.segment_id, self.slug, self.occurred_at, format_time(self.occurred_at), command_id, self.salt)
        if self.joining:
            return sql.ROLLOUT_ADD, (*args, self.low, self.high), sql.FAN_OUT_KNOWN_USERS, ()
        return sql.ROLLOUT_REMOVE, (*args, self.low), sql.FAN_OUT_SEGMENT_MEMBERS, (self.segment_id,)


@dataclass
class Progress:
    """How far a command's rollout got: the users up to `after` are done, `events` written so far."""

    command_id: str
    body_hash: str
    rollout: Rollout
    after: int = FIRST_BOUND
    events: int = 0
    stored: bool = False  # a fan_outs row holds it (a pass has committed)


async def walk(conn: asyncpg.Connection, slice_size: int, bound_query: str, *query_args,
               after: int = FIRST_BOUND):
    """Key ranges (after, upto] of at most `slice_size` of the users `bound_query` walks, in id order."""
    while (upto := await conn.fetchval(bound_query, after, slice_size, *query_args)) is not None:
        yield after, upto
        after = upto


async def run(conn: asyncpg.Connection, progress: Progress, slice_size: int, pass_seconds: float) -> int | None:
    """Run slices from where `progress` stands, for about `pass_seconds` (one slice at least). Returns every event
    of the rollout once the last user is done (its progress row deleted), or None: progress saved, more to do."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + pass_seconds
    statement, args, bound_query, bound_args = progress.rollout.statement(progress.command_id)
    # Each pass holds the segment's row for update, as a fan-out did, for the pass only: a user's command holding it
    # for share (and writing an exclusion or membership the slices decide on) commits before or after the pass's
    # slices, never between a slice's snapshot and its writes.
    await conn.execute(sql.LOCK_ROLLOUT_SEGMENT, progress.rollout.segment_id)
    await conn.execute(sql.BULK_WORK_MEM)  # a slice's outbox rows are sorted by user in memory
    async for after, upto in walk(conn, slice_size, bound_query, *bound_args, after=progress.after):
        progress.events += await conn.fetchval(statement, *args, after, upto)
        progress.after = upto
        if loop.time() >= deadline:
            await _save(conn, progress)
            return None
    if progress.stored:
        await conn.execute(sql.END_FAN_OUT, progress.command_id)
    return progress.events


async def _save(conn: asyncpg.Connection, progress: Progress) -> None:
    r = progress.rollout
    await conn.execute(sql.SAVE_FAN_OUT, progress.command_id, progress.body_hash, r.segment_id, r.slug, r.salt,
                       r.joining, r.low, r.high, r.occurred_at, progress.after, progress.events)
    progress.stored = True


async def find(conn: asyncpg.Connection, command_id: str) -> Progress | None:
    """The command's rollout in progress (its row locked: two owners of the partition take turns), or None."""
    row = await conn.fetchrow(sql.FIND_FAN_OUT, command_id)
    if row is None:
        return None
    rollout = Rollout(row["segment_id"], row["slug"], row["salt"], row["joining"], row["low_line"],
                      row["high_line"], row["occurred_at"])
    return Progress(command_id, row["body_hash"], rollout, row["after_user"], row["events"], stored=True)


async def in_progress(conn: asyncpg.Connection, command_ids: list[str]) -> set[str]:
    """Those of the commands whose rollout has committed passes and is not done."""
    return {r["command_id"] for r in await conn.fetch(sql.ROLLOUTS_IN_PROGRESS, command_ids)}


async def poll(conn: asyncpg.Connection, ready: Callable[[], Awaitable[object]], waiting_for: str) -> None:
    """Until `ready()` is True: polled (5 ms doubling up to 200 ms) and given up as a lock_timeout would be (the
    command is retried). Any other value `ready()` gives says how far the awaited work got: while it changes, the
    wait goes on past the lock_timeout."""
    loop = asyncio.get_running_loop()
    timeout = None
    pause = 0.005
    seen: object = _NOTHING
    while (state := await ready()) is not True:
        if timeout is None:
            timeout = await conn.fetchval(sql.LOCK_TIMEOUT_SECONDS)
        if state != seen:
            deadline = loop.time() + timeout if timeout > 0 else float("inf")
            seen = state
        if loop.time() >= deadline:
            raise asyncpg.exceptions.LockNotAvailableError(f"{waiting_for} for the whole lock_timeout")
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.2)


async def settle(conn: asyncpg.Connection, slugs: list[str]) -> None:
    """Wait until no rollout of these segments is in progress: as long as one commits passes, or for the
    lock_timeout if none does (a worker crashed in it: the partition's next owner resumes it). Before the
    segments' row locks (each pass takes its segment's); `not_rolling` once they are held."""
    await _settle(conn, sql.FAN_OUTS_RUNNING, slugs)


async def not_rolling(conn: asyncpg.Connection, slugs: list[str]) -> None:
    """Under the segments' row locks, in a statement of its own: no rollout of them began since `settle`."""
    if await conn.fetchval(sql.FAN_OUTS_RUNNING, slugs) is not None:
        raise asyncpg.exceptions.LockNotAvailableError("a rollout of the segment began meanwhile")


async def settle_layer(conn: asyncpg.Connection, layer: str) -> None:
    """Wait until no rollout of a segment of `layer` is in progress (under the exclusive rollout lock, before its
    ranges are read): a lowered segment's rollout members above its new line are still members until the end,
    so the range it frees is free only then."""
    await _settle(conn, sql.LAYER_FAN_OUTS_RUNNING, layer)


async def _settle(conn: asyncpg.Connection, query: str, *args) -> None:
    async def none_running() -> object:
        last_pass = await conn.fetchval(query, *args)
        return True if last_pass is None else last_pass
    await poll(conn, none_running, "a rollout of the segment made no progress")
