"""One consumed batch, one transaction: effects, inbox, outbox and consumed offsets commit together."""
from __future__ import annotations

import logging
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

import asyncpg

from schemas.commands import SEGMENT_COMMANDS, USER_COMMANDS, CreateSegment, DeleteSegment, ExpireMembership, RegisterUsers, UpdateSegment, UpdateUserSegments
from schemas.results import CommandResult, ErrorCode, ErrorInfo
from service import segment_handlers, sql, user_handlers
from service.decoding import Decoded, InboundRecord, decode
from service.domain import CommandRejectedError, NotDueYetError, Segment
from service.unit_of_work import OutboxRow, UnitOfWork, result_row, segment_event
from service.user_handlers import RunContext

log = logging.getLogger("segmentation.worker")

USER_HANDLERS = {
    UpdateUserSegments: user_handlers.update_user_segments,
    RegisterUsers: user_handlers.register_users,
    ExpireMembership: user_handlers.expire_membership,
}
SEGMENT_HANDLERS = {
    CreateSegment: segment_handlers.create_segment,
    UpdateSegment: segment_handlers.update_segment,
    DeleteSegment: segment_handlers.delete_segment,
}


# Errors that say "try again", not "this command is wrong": the whole batch is rolled back and retried.
_FATAL = (
    asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError,
    asyncpg.exceptions.TransactionRollbackError,  # deadlock, serialization failure
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, query canceled
    asyncpg.exceptions.InsufficientResourcesError,
)


DLQ_MAX_BYTES = 900_000


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class BatchReport:
    """What a batch did: per-type outcomes (for metrics and logs) and the offsets now stored."""

    outcomes: Counter = field(default_factory=Counter)  # (type, status) -> count
    skipped: int = 0  # records already applied by an earlier owner of the partition
    dead_letters: int = 0
    events: int = 0


class BatchProcessor:
    """Applies a batch of records from one topic inside one PostgreSQL transaction."""

    def __init__(self, group: str, clock: Callable[[], datetime] = utcnow):
        self.group = group
        self.clock = clock

    async def process(self, conn: asyncpg.Connection, records: list[InboundRecord]) -> BatchReport:
        report = BatchReport()
        if not records:
            return report
        for part in _transactions([decode(r) for r in records]):
            await self._apply_in_transaction(conn, part, report)
        return report

    async def _apply_in_transaction(self, conn: asyncpg.Connection, items: list[Decoded], report: BatchReport) -> None:
        topic = items[0].record.topic
        partitions = sorted({d.record.partition for d in items})
        async with conn.transaction():
            await conn.execute(sql.ENSURE_OFFSETS, self.group, topic, partitions)
            stored = dict(await conn.fetch(sql.LOCK_OFFSETS, self.group, topic, partitions))
            fresh = [d for d in items if d.record.offset >= stored[d.record.partition]]
            report.skipped += len(items) - len(fresh)
            if fresh:
                await _Batch(conn, UnitOfWork(self.clock()), report).apply(fresh)
                last: dict[int, int] = {}
                for d in fresh:
                    last[d.record.partition] = max(last.get(d.record.partition, -1), d.record.offset + 1)
                await conn.execute(sql.STORE_OFFSETS, self.group, topic, list(last), list(last.values()))
                await conn.execute(sql.NOTIFY_OUTBOX)


def _transactions(items: list[Decoded]) -> list[list[Decoded]]:
    """Split a batch so that every segment command has a transaction of its own.

    A run of user commands share-locks segments; a segment command locks one for update. In one transaction
    that upgrade can deadlock with another worker's batch doing the same the other way round, and a
    fan-out would hold every lock of the batch for its whole duration.
    """
    parts: list[list[Decoded]] = [[]]
    for d in items:
        if isinstance(d.command, SEGMENT_COMMANDS):
            parts += [[d], []]
        else:
            parts[-1].append(d)
    return [p for p in parts if p]


class _Batch:
    """The commands of one transaction, applied in partition order; runs of user commands go set-based."""

    def __init__(self, conn: asyncpg.Connection, uow: UnitOfWork, report: BatchReport):
        self.conn, self.uow, self.report = conn, uow, report
        self.seen: dict[str, tuple[str, str]] = {}  # command id -> (body hash, stored result json)
        self.run: list[Decoded] = []
        self.run_ids: set[str] = set()

    async def apply(self, items: list[Decoded]) -> None:
        ids = [d.command_id for d in items if d.command_id]
        for row in await self.conn.fetch(sql.FIND_PROCESSED, ids):
            self.seen[row["command_id"]] = (row["body_hash"], row["result"])
        for d in items:
            if d.command is None:
                await self.flush_run()
                self.dead_letter(d)
            elif d.command_id in self.seen or d.command_id in self.run_ids:
                await self.flush_run()
                self.answer_duplicate(d)
            elif isinstance(d.command, USER_COMMANDS):
                self.run.append(d)
                self.run_ids.add(d.command_id)
            else:
                await self.flush_run()
                await self.apply_segment_command(d)
        await self.flush_run()
        await self.uow.flush(self.conn)

    def finish(self, d: Decoded, status: str, events: int = 0, error: ErrorInfo | None = None,
               store: bool = True) -> None:
        """Publish the command's result; store it under its id unless `store` is False (nothing was decided)."""
        result = CommandResult(
            command_id=d.command_id, type=d.type, status=status, error=error,
            events=events, processed_at=self.uow.now,
        )
        payload = self.uow.record_result(result, d.body_hash if store else None)
        if store:
            self.seen[d.command_id] = (d.body_hash, payload)
        self.report.outcomes[(result.type, status)] += 1
        self.report.events += events
        if error is not None:
            log.info("command rejected", extra={"position": d.record.position, "command_id": d.command_id,
                                                "error_code": error.code.value, "error": error.message})

    def answer_duplicate(self, d: Decoded) -> None:
        """A seen command id: the stored result again, or a conflict if the body differs."""
        stored_hash, stored_result = self.seen[d.command_id]
        if stored_hash == d.body_hash:
            payload = stored_result
            status = "duplicate"
        else:
            conflict = CommandResult(
                command_id=d.command_id, type=d.type, status="rejected",
                error=ErrorInfo(code=ErrorCode.IDEMPOTENCY_CONFLICT,
                                message="this command_id was used before with a different body"),
                events=0, processed_at=self.uow.now,
            )
            payload = conflict.model_dump_json()
            status = "conflict"
        self.uow.record_outbox(result_row(d.command_id, payload))
        self.report.outcomes[(d.type, status)] += 1
        log.info("duplicate command", extra={"position": d.record.position, "command_id": d.command_id, "status": status})

    def dead_letter(self, d: Decoded) -> None:
        r = d.record
        headers = {"error.code": d.error_code, "error.message": d.error_message, "source.topic": r.topic,
                   "source.partition": str(r.partition), "source.offset": str(r.offset)}
        value = r.value
        if value is not None and len(value) > DLQ_MAX_BYTES:
            # Larger than any broker would take back with our headers: keep the head, say how long it was.
            value, headers["error.truncated"] = value[:DLQ_MAX_BYTES], str(len(value))
        self.uow.record_outbox(OutboxRow("dlq", r.key, value, _new_id(), headers))
        self.report.dead_letters += 1
        log.warning("dead letter", extra={"position": r.position, "command_id": d.command_id,
                                          "error_code": d.error_code, "error": d.error_message})
        if d.command_id in self.seen:
            self.answer_duplicate(d)  # the same id again: its stored result, or a conflict
        elif d.command_id is not None:
            self.finish(d, "rejected", error=ErrorInfo(code=ErrorCode.INVALID_COMMAND, message=d.error_message,
                                                       details={"dead_letter": d.error_code}))

    async def apply_segment_command(self, d: Decoded) -> None:
        handler = SEGMENT_HANDLERS[type(d.command)]
        try:
            async with self.conn.transaction():  # savepoint: a rejected command leaves nothing behind
                events, event = await handler(self.conn, d.command, self.uow)
        except CommandRejectedError as exc:
            self.finish(d, "rejected", error=exc.info)
        except _FATAL:
            raise
        except asyncpg.PostgresError as exc:
            self.refused(d, exc)
        else:
            self.uow.record_outbox(segment_event(event))
            self.finish(d, "applied", events)

    def refused(self, d: Decoded, exc: Exception) -> None:
        """The database refused one command (its savepoint is rolled back): reject it alone, go on."""
        log.error("command could not be applied",
                  extra={"position": d.record.position, "command_id": d.command_id, "error": str(exc)})
        self.finish(d, "rejected", error=ErrorInfo(code=ErrorCode.INVALID_COMMAND, message=f"could not be applied: {exc}"))

    async def flush_run(self) -> None:
        """Apply the pending run of user commands: lock segments, load users, run the rules, write in bulk."""
        run, self.run, self.run_ids = self.run, [], set()
        if not run:
            return
        await self.uow.flush(self.conn)  # what came before the run is not undone if the run fails
        try:
            async with self.conn.transaction():  # savepoint around the whole run
                self.apply_run_rules(run, await self.load_run(run))
                await self.uow.flush(self.conn)
        except _FATAL:
            raise
        except asyncpg.PostgresError as exc:
            self.uow.forget()
            if len(run) == 1:
                self.refused(run[0], exc)
                return
            # Rare: the database refused something in the run. Redo it command by command, a savepoint each.
            log.warning("run failed, retrying command by command", extra={"error": str(exc), "commands": len(run)})
            for d in run:
                self.run, self.run_ids = [d], {d.command_id}
                await self.flush_run()

    async def load_run(self, run: list[Decoded]) -> RunContext:
        """Lock in a fixed order: users (rows), the rollout lock if some are new, then segments (id order)."""
        new = await self.uow.load_users(self.conn, {u for d in run for u in user_handlers.users_of(d.command)})
        if new:
            await self.conn.execute(sql.LOCK_ROLLOUT_SHARED, sql.ROLLOUT_LOCK)
        slugs = sorted({s for d in run for s in user_handlers.slugs_of(d.command)})
        rows = await self.conn.fetch(sql.LOCK_SEGMENTS_FOR_SHARE, slugs, bool(new))
        segments = {r["slug"]: Segment(r["id"], r["slug"], r["salt"], r["auto_percent"]) for r in rows}
        rollouts = [s for s in segments.values() if s.auto_percent > 0]
        return RunContext(self.uow, segments, rollouts)

    def apply_run_rules(self, run: list[Decoded], ctx: RunContext) -> None:
        for d in run:
            try:
                events = USER_HANDLERS[type(d.command)](d.command, ctx)
            except CommandRejectedError as exc:
                self.finish(d, "rejected", error=exc.info)
            except NotDueYetError:
                # Not stored: the TTL producer sends the same id again, and then it must count.
                self.finish(d, "applied", 0, store=False)
            except (ArithmeticError, ValueError) as exc:  # a rule met values it cannot handle
                self.refused(d, exc)
            else:
                self.finish(d, "applied", events)


def _new_id() -> str:
    return str(uuid.uuid4())
