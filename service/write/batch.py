"""A consumed batch applied to PostgreSQL: effects, history, inbox, outbox and consumed offsets commit together.

The batch is cut into parts (`_parts`), each one transaction: every segment command alone (a rollout: one
transaction per pass, see rollouts.py), and the user commands between them as one run whose locks are all taken
up front, in one order (offsets, users, the rollout lock, segments). What a part does when it fails is decided
in one place: `next_step`.
"""
from __future__ import annotations

import enum
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg

from schemas.commands import (
    SEGMENT_COMMANDS,
    USER_COMMANDS,
    CreateSegment,
    DeleteSegment,
    ExpireMembership,
    RegisterUsers,
    StartMembership,
    UpdateSegment,
    UpdateSegmentMembers,
    UpdateUserSegments,
)
from schemas.results import CommandResult, ErrorCode, ErrorInfo
from service.domain import CommandRejectedError, NotDueYetError
from service.infra import db, errors
from service.write import rollouts, segment_handlers, segment_members, sql, user_handlers
from service.write.change_set import ChangeSet
from service.write.decoding import Decoded, InboundRecord, decode, printable
from service.write.outbox import dead_letter_row, result_payload, result_row, segment_event
from service.write.user_handlers import RunContext

log = logging.getLogger("segmentation.worker")

USER_HANDLERS: dict[type, Callable[..., Any]] = {
    UpdateUserSegments: user_handlers.update_user_segments,
    RegisterUsers: user_handlers.register_users,
    ExpireMembership: user_handlers.expire_membership,
    StartMembership: user_handlers.start_membership,
}
ROLLOUT_COMMANDS = (CreateSegment, UpdateSegment)  # the segment commands that may leave a rollout to run
SEGMENT_HANDLERS: dict[type, Callable[..., Awaitable[Any]]] = {
    CreateSegment: segment_handlers.create_segment,
    UpdateSegment: segment_handlers.update_segment,
    DeleteSegment: segment_handlers.delete_segment,
    UpdateSegmentMembers: segment_members.update_segment_members,
}


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class BatchReport:
    """What a batch did (metrics and logs). Parts are added only once their transaction committed."""

    outcomes: Counter = field(default_factory=Counter)  # (type, status) -> count
    skipped: int = 0  # records already applied (by an earlier owner of the partition, or an earlier attempt)
    dead_letters: int = 0
    events: int = 0

    def add(self, other: BatchReport) -> None:
        self.outcomes.update(other.outcomes)
        self.skipped += other.skipped
        self.dead_letters += other.dead_letters
        self.events += other.events


class Step(enum.Enum):
    """What follows a part whose transaction failed (and was rolled back whole)."""

    RETRY_BATCH = "retry the batch"
    ONE_BY_ONE = "redo the part record by record"
    REDO = "redo the record: its command id was stored meanwhile, it is answered as seen"
    REJECT = "reject the command"
    QUARANTINE = "send the record to the dead-letter topic"


def next_step(exc: Exception, items: list[Decoded], first_attempt: bool, alone: bool = False) -> Step:
    """The one decision of the failure path. `exc` rolled back the transaction of `items`: nothing of it stays.

    - Retryable (connection lost, deadlock, ...): nothing was decided about the commands. The batch is given up
      and retried by the worker; parts already committed are skipped then by their stored offsets. When
      the worker redoes a batch record by record (`alone`: its retries kept failing), only a connection
      loss retries: another retryable error of one record (a statement timeout, ...) quarantines it.
    - A part of several records: one of them is at fault, the others are not: each is applied alone.
    - One command whose id another partition stored meanwhile: done again, it is answered as a duplicate.
    - One command whose data the database refused (`errors.is_content_error`, an allow-list): rejected (stored
      and published). Rules say what they decide by raising `CommandRejectedError`, handled before this.
    - Anything else (a bug this record's content triggers, an internal error of the server, a ValueError of
      the code, a record that could not even be rejected): the record goes to the dead-letter topic
      (UNPROCESSABLE, a rejected result published but not stored) and the partition goes on.
    """
    if errors.is_connection_loss(exc) or (errors.is_retryable(exc) and not alone):
        return Step.RETRY_BATCH
    if len(items) > 1:
        return Step.ONE_BY_ONE
    if not first_attempt or items[0].command is None:
        return Step.QUARANTINE
    if errors.is_stored_meanwhile(exc):
        return Step.REDO
    if errors.is_content_error(exc):
        return Step.REJECT
    return Step.QUARANTINE


Work = Callable[["_Part", list[Decoded]], Awaitable[None]]


class BatchProcessor:
    """Applies a batch of records from one topic, part by part (see the module's docstring)."""

    def __init__(self, group: str, clock: Callable[[], datetime] = utcnow, fan_out_slice: int = 20_000,
                 fan_out_pass_seconds: float = 0.25, should_stop: Callable[[], bool] = lambda: False):
        self.group = group
        self.clock = clock
        self.should_stop = should_stop  # the worker lets its partitions go: a rollout stops between two passes
        self.fan_out_slice = fan_out_slice  # users per statement of a segment fan-out
        self.fan_out_pass_seconds = fan_out_pass_seconds  # a rollout commits its slices about this often

    async def process(self, conn: asyncpg.Connection, records: list[InboundRecord],
                      report: BatchReport | None = None, alone: bool = False) -> BatchReport:
        """Apply `records`; committed parts are added to `report` (kept by the caller across retries).
        Raises a retryable error when the batch must be retried (see `next_step`). `alone`: every record in a
        part of its own (a batch whose retries kept failing: one poison record must not block its partition)."""
        report = report if report is not None else BatchReport()
        decoded = await _rollouts_first([decode(r) for r in records], conn)
        for part in [[d] for d in decoded] if alone else _parts(decoded):
            await self._part(conn, part, report, alone=alone)
        return report

    async def _part(self, conn: asyncpg.Connection, items: list[Decoded], report: BatchReport,
                    work: Work | None = None, alone: bool = False) -> None:
        """Apply `items` in one transaction (with `work`, or the normal way); on failure, take `next_step`. A rollout
        takes one transaction per pass (service/write/rollouts.py)."""
        how = work or _Part.apply
        try:
            finished = await self._apply_in_transaction(conn, items, report, how)
            while not finished and not self.should_stop():  # a rollout's pass committed: the next goes on from it
                finished = await self._apply_in_transaction(conn, items, report, how)
        except Exception as exc:
            failure = exc
        else:
            if finished:
                return
            raise errors.UnfinishedWorkError("stopped between two passes of a rollout (resumed from its progress)")
        if not errors.is_stored_meanwhile(failure) and await _rollout_started(conn, items):
            # Its first pass was applied and published: it is finished, never rejected nor dead-lettered. Retried
            # with the batch (a lasting failure holds its partition up, loudly: logs, lag, retries metric).
            if isinstance(failure, errors.DATABASE_FAILURE):
                raise failure
            raise errors.UnfinishedWorkError(f"a pass of the rollout {items[0].command_id} failed") from failure
        step = next_step(failure, items, first_attempt=work is None, alone=alone)
        if step is Step.RETRY_BATCH:
            raise failure
        log.error(f"part failed: {step.value}", extra={
            "from": items[0].record.position, "to": items[-1].record.position, "error": repr(failure)})
        if step is Step.ONE_BY_ONE:
            for d in items:
                await self._part(conn, [d], report, alone=alone)
        elif step is Step.REDO:  # if it fails again, the record is quarantined
            await self._part(conn, items, report, _Part.apply, alone)
        elif step is Step.REJECT:  # if rejecting fails too, the record is quarantined
            await self._part(conn, items, report, lambda part, fresh: part.refuse(fresh[0], failure), alone)
        else:  # the last resort: if even this fails, the worker retries the batch
            reason = printable(repr(failure))
            await self._apply_in_transaction(conn, items, report, lambda part, fresh: part.quarantine(fresh[0], reason))

    async def _apply_in_transaction(self, conn: asyncpg.Connection, items: list[Decoded], report: BatchReport,
                                    work: Work) -> bool:
        """Lock the partitions' offsets, skip what they say was applied, `work` the rest, store the new offsets.
        False: a rollout's pass committed without its command's result and offset (it is not finished)."""
        topic = items[0].record.topic
        partitions = sorted({d.record.partition for d in items})
        done = BatchReport()
        async with conn.transaction():
            await conn.execute(sql.ENSURE_OFFSETS, self.group, topic, partitions)
            stored = dict(await conn.fetch(sql.LOCK_OFFSETS, self.group, topic, partitions))
            fresh = [d for d in items if d.record.offset >= stored[d.record.partition]]
            done.skipped = len(items) - len(fresh)
            finished = True
            if fresh:
                part = _Part(conn, ChangeSet(self.clock()), done, self.fan_out_slice, self.fan_out_pass_seconds)
                await part.find_processed(fresh)
                await work(part, fresh)
                await part.change_set.flush(conn)
                finished = not part.unfinished
                if finished:
                    last: dict[int, int] = {}
                    for d in fresh:
                        last[d.record.partition] = max(last.get(d.record.partition, -1), d.record.offset + 1)
                    await conn.execute(sql.STORE_OFFSETS, self.group, topic, list(last), list(last.values()))
                await conn.execute(sql.NOTIFY_OUTBOX)
        report.add(done)
        return finished


async def _rollouts_first(items: list[Decoded], conn: asyncpg.Connection) -> list[Decoded]:
    """The partitions that hold a rollout in progress first (each partition's records keep their order): a segment
    command of another partition that waits for that rollout (rollouts.settle) must not wait for a later part of
    its own batch."""
    ids = [d.command.command_id for d in items if isinstance(d.command, ROLLOUT_COMMANDS)]
    rolling = await rollouts.in_progress(conn, ids) if ids else set()
    if not rolling:
        return items
    first = {d.record.partition for d in items if d.command_id in rolling}
    return [d for d in items if d.record.partition in first] + [d for d in items if d.record.partition not in first]


def _parts(items: list[Decoded]) -> list[list[Decoded]]:
    """Every segment command alone; the records between them together.

    A run share-locks segments; a segment command locks one for update. In one transaction that upgrade can
    deadlock with another worker doing the same the other way round, and a fan-out would hold every lock of
    the batch for its whole duration.
    """
    parts: list[list[Decoded]] = [[]]
    for d in items:
        if isinstance(d.command, SEGMENT_COMMANDS):
            parts += [[d], []]
        else:
            parts[-1].append(d)
    return [p for p in parts if p]


async def _rollout_started(conn: asyncpg.Connection, items: list[Decoded]) -> bool:
    """Whether `items` is a rollout whose passes have committed (so it can no longer be rejected, only finished)."""
    d = items[0]
    return (len(items) == 1 and isinstance(d.command, ROLLOUT_COMMANDS)
            and d.command.command_id in await rollouts.in_progress(conn, [d.command.command_id]))


def _label(d: Decoded) -> str:
    """Metric label of a record's type: only the contract's types (a sender must not mint new series)."""
    return d.command.type if d.command is not None else "unknown"


class _Part:
    """The records of one transaction, applied in partition order, their writes collected in a change set."""

    def __init__(self, conn: asyncpg.Connection, change_set: ChangeSet, report: BatchReport, fan_out_slice: int,
                 fan_out_pass_seconds: float):
        self.conn, self.change_set, self.report = conn, change_set, report
        self.fan_out_slice, self.fan_out_pass_seconds = fan_out_slice, fan_out_pass_seconds
        self.unfinished = False  # a rollout's pass: its command is not finished with this transaction
        self.seen: dict[str, tuple[str, str]] = {}  # command id -> (body hash, stored result json)
        self.rolling: dict[str, str] = {}  # command id of a rollout in progress -> its body hash

    async def find_processed(self, items: list[Decoded]) -> None:
        ids = [d.command_id for d in items if d.command_id]
        for row in await self.conn.fetch(sql.FIND_PROCESSED, ids):
            if row["rolling"]:
                self.rolling[row["command_id"]] = row["body_hash"]
            else:
                self.seen[row["command_id"]] = (row["body_hash"], row["result"])

    async def apply(self, items: list[Decoded]) -> None:
        first = items[0]
        if isinstance(first.command, SEGMENT_COMMANDS) and (first.command_id not in self.seen
                                                            or first.command_id in self.rolling):
            # Relies on _parts(): a segment command is alone in its part. A rollout in progress goes on even if
            # another command stored its id before the first pass committed (its result is then not stored).
            await self.apply_segment_command(first)
        else:
            await self.apply_run(items)

    async def apply_run(self, items: list[Decoded]) -> None:
        """Lock everything the run needs, then run the rules in order; the change set writes it all in bulk."""
        ctx = await self.load_run([d for d in items if isinstance(d.command, USER_COMMANDS)])
        for d in items:
            if d.command is None:
                assert d.error_code is not None and d.error_message is not None  # what makes it a dead letter
                self.dead_letter(d, d.error_code, d.error_message)
            elif d.command_id in self.seen or d.command_id in self.rolling:
                self.answer_duplicate(d)
            else:
                self.apply_user_command(d, ctx)

    async def load_run(self, run: list[Decoded]) -> RunContext:
        """Every lock first, in the one global order (after the offsets, taken by the part): users (rows, id
        order), the rollout lock if some are new, segments (id order). Only then read the users' state: what
        was read before a lock wait would be stale (a fan-out it waited for may have changed it)."""
        new = await self.change_set.lock_users(self.conn, {u for d in run for u in user_handlers.users_of(d.command)})
        if new:
            await self.conn.execute(sql.LOCK_ROLLOUT_SHARED, db.ROLLOUT_LOCK)
        slugs = sorted({s for d in run for s in user_handlers.slugs_of(d.command)})
        rows = await self.conn.fetch(sql.LOCK_SEGMENTS_FOR_SHARE, slugs, bool(new)) if slugs or new else []
        await self.change_set.read_users(self.conn)
        segments = {r["slug"]: segment_handlers.segment_of(r) for r in rows}
        rolled_out = [s for s in segments.values() if s.auto_percent > 0]
        return RunContext(self.change_set, segments, rolled_out)

    def apply_user_command(self, d: Decoded, ctx: RunContext) -> None:
        try:
            events = USER_HANDLERS[type(d.command)](d.command, ctx)
        except CommandRejectedError as exc:
            self.finish(d, "rejected", error=exc.info)
        except NotDueYetError:
            # Nothing decided, nothing published or stored: the TTL producer sends the same id again, and that
            # one gets the command's one result.
            self.report.outcomes[(_label(d), "not_due")] += 1
            log.info("expiry not due yet", extra={"position": d.record.position, "command_id": d.command_id})
        else:
            self.finish(d, "applied", events)

    async def apply_segment_command(self, d: Decoded) -> None:
        assert d.command_id is not None and d.body_hash is not None  # a decoded command
        progress = await rollouts.find(self.conn, d.command_id)
        if progress is not None and progress.body_hash != d.body_hash:
            self.rolling[d.command_id] = progress.body_hash
            self.answer_duplicate(d)
            return
        if progress is None:
            handler = SEGMENT_HANDLERS[type(d.command)]
            try:
                async with self.conn.transaction():  # savepoint: a rejected command leaves nothing behind
                    events, event, rollout = await handler(self.conn, d.command, self.change_set, self.fan_out_slice)
            except CommandRejectedError as exc:
                self.finish(d, "rejected", error=exc.info)
                return
            if event is not None:  # UpdateSegmentMembers changes memberships, not the segment
                self.change_set.record_outbox(segment_event(event))
            if rollout is None:
                self.finish(d, "applied", events)
                return
            progress = rollouts.Progress(d.command_id, d.body_hash, rollout, events=events)
        total = await rollouts.run(self.conn, progress, self.fan_out_slice, self.fan_out_pass_seconds)
        if total is None:
            self.unfinished = True
            log.info("rollout pass", extra={"position": d.record.position, "command_id": d.command_id,
                                            "after_user": progress.after, "events": progress.events})
        else:  # not stored if another command took the id before the first pass committed
            self.finish(d, "applied", total, store=d.command_id not in self.seen)

    def finish(self, d: Decoded, status: str, events: int = 0, error: ErrorInfo | None = None,
               store: bool = True) -> None:
        """Publish the command's result; store it under its id unless `store` is False (a dead letter)."""
        assert d.command_id is not None  # a decoded command always has its id
        if error is None and status == "applied":
            payload = result_payload(d.command_id, d.type, events, self.change_set.now)
        else:
            payload = CommandResult(command_id=d.command_id, type=d.type, status=status, error=error, events=events,
                                    processed_at=self.change_set.now).model_dump_json()
        self.change_set.record_result(d.command_id, d.type, payload, d.body_hash if store else None)
        if store:
            self.seen[d.command_id] = (d.body_hash, payload)
        self.report.outcomes[(_label(d), status)] += 1
        self.report.events += events
        if error is not None:
            log.info("command rejected", extra={"position": d.record.position, "command_id": d.command_id,
                                                "error_code": error.code.value, "error": error.message})

    async def refuse(self, d: Decoded, exc: Exception) -> None:
        """The database refused the command's data: reject it alone."""
        log.error("command could not be applied",
                  extra={"position": d.record.position, "command_id": d.command_id, "error": str(exc)})
        self.finish(d, "rejected", error=ErrorInfo(code=ErrorCode.INVALID_COMMAND,
                                                   message=printable(f"could not be applied: {exc}")))

    async def quarantine(self, d: Decoded, reason: str) -> None:
        """A record that breaks the worker: a dead letter (UNPROCESSABLE), so that the partition goes on."""
        self.dead_letter(d, "UNPROCESSABLE", reason)

    def answer_duplicate(self, d: Decoded) -> None:
        """A seen command id: the stored result again, or a conflict if the body differs. The id of a rollout in
        progress (no result yet) is a conflict: a command with its body is that rollout, it joins it instead."""
        assert d.command_id is not None  # only decoded commands are looked up in `seen`
        stored_hash, stored_result = self.seen.get(d.command_id) or (None, "")
        if stored_hash == d.body_hash:
            payload = stored_result
            status = "duplicate"
        else:
            conflict = CommandResult(
                command_id=d.command_id, type=d.type, status="rejected",
                error=ErrorInfo(code=ErrorCode.IDEMPOTENCY_CONFLICT,
                                message="this command_id was used before with a different body"),
                events=0, processed_at=self.change_set.now,
            )
            payload = conflict.model_dump_json()
            status = "conflict"
        self.change_set.record_outbox(result_row(d.command_id, payload))
        self.report.outcomes[(_label(d), status)] += 1
        log.info("duplicate command", extra={"position": d.record.position, "command_id": d.command_id, "status": status})

    def dead_letter(self, d: Decoded, code: str, message: str) -> None:
        """To the DLQ with the headers that say why. A readable command id gets a `rejected` result that is
        published but not stored: the id stays free for the corrected command or a replay from the DLQ."""
        self.change_set.record_outbox(dead_letter_row(d.record, code, message))
        self.report.dead_letters += 1
        log.warning("dead letter", extra={"position": d.record.position, "command_id": d.command_id,
                                          "error_code": code, "error": message})
        if d.command_id in self.seen or d.command_id in self.rolling:
            self.answer_duplicate(d)  # an id already applied: its stored result, or a conflict
        elif d.command_id is not None:
            self.finish(d, "rejected", error=ErrorInfo(code=ErrorCode.INVALID_COMMAND, message=message,
                                                       details={"dead_letter": code}), store=False)
