"""A consumed batch applied to PostgreSQL: effects, history, inbox, outbox and consumed offsets commit together.

The batch is cut into parts, each one transaction: every segment command alone, and the user commands between
them as one run whose locks are all taken up front, in one order (users, the rollout lock, segments).
"""
from __future__ import annotations

import logging
import uuid
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
    UpdateSegment,
    UpdateUserSegments,
)
from schemas.results import CommandResult, ErrorCode, ErrorInfo
from service.domain import CommandRejectedError, NotDueYetError, Segment
from service.write import segment_handlers, sql, user_handlers
from service.write.change_set import OutboxRow, UnitOfWork, result_row, segment_event
from service.write.decoding import Decoded, InboundRecord, decode, printable
from service.write.user_handlers import RunContext

log = logging.getLogger("segmentation.worker")

USER_HANDLERS: dict[type, Callable[..., Any]] = {
    UpdateUserSegments: user_handlers.update_user_segments,
    RegisterUsers: user_handlers.register_users,
    ExpireMembership: user_handlers.expire_membership,
}
SEGMENT_HANDLERS: dict[type, Callable[..., Awaitable[Any]]] = {
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


DLQ_MAX_BYTES = 900_000  # key + value of a dead letter
DLQ_MAX_KEY_BYTES = 16_384


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

    def copy(self) -> BatchReport:
        return BatchReport(Counter(self.outcomes), self.skipped, self.dead_letters, self.events)

    def restore(self, saved: BatchReport) -> None:
        """Back to `saved` (a copy taken before a savepoint that was rolled back)."""
        self.outcomes, self.skipped = Counter(saved.outcomes), saved.skipped
        self.dead_letters, self.events = saved.dead_letters, saved.events


class BatchProcessor:
    """Applies a batch of records from one topic, part by part (see the module's docstring)."""

    def __init__(self, group: str, clock: Callable[[], datetime] = utcnow):
        self.group = group
        self.clock = clock

    async def process(self, conn: asyncpg.Connection, records: list[InboundRecord],
                      report: BatchReport | None = None) -> BatchReport:
        """Apply `records`; committed parts are added to `report` (kept by the caller across retries)."""
        report = report if report is not None else BatchReport()
        for part in _parts([decode(r) for r in records]):
            await self._part(conn, part, report)
        return report

    async def _part(self, conn: asyncpg.Connection, items: list[Decoded], report: BatchReport) -> None:
        try:
            await self._apply_in_transaction(conn, items, report, _Part.apply)
        except _FATAL:
            raise
        except Exception as exc:  # whatever a record's content breaks, the partition goes on
            if len(items) > 1:
                log.error("part failed; applying its records one by one",
                          extra={"from": items[0].record.position, "to": items[-1].record.position, "error": repr(exc)})
                for d in items:
                    await self._part(conn, [d], report)
                return
            log.error("record cannot be processed; sent to the dead-letter topic",
                      extra={"position": items[0].record.position, "error": repr(exc)})

            reason = printable(repr(exc))

            async def quarantine(part: _Part, fresh: list[Decoded]) -> None:
                part.uow.record_outbox(dead_letter_row(fresh[0].record, "UNPROCESSABLE", reason))
                part.report.dead_letters += 1

            await self._apply_in_transaction(conn, items, report, quarantine)

    async def _apply_in_transaction(self, conn: asyncpg.Connection, items: list[Decoded], report: BatchReport,
                                    work: Callable) -> None:
        topic = items[0].record.topic
        partitions = sorted({d.record.partition for d in items})
        done = BatchReport()
        async with conn.transaction():
            await conn.execute(sql.ENSURE_OFFSETS, self.group, topic, partitions)
            stored = dict(await conn.fetch(sql.LOCK_OFFSETS, self.group, topic, partitions))
            fresh = [d for d in items if d.record.offset >= stored[d.record.partition]]
            done.skipped = len(items) - len(fresh)
            if fresh:
                part = _Part(conn, UnitOfWork(self.clock()), done)
                await work(part, fresh)
                await part.uow.flush(conn)
                last: dict[int, int] = {}
                for d in fresh:
                    last[d.record.partition] = max(last.get(d.record.partition, -1), d.record.offset + 1)
                await conn.execute(sql.STORE_OFFSETS, self.group, topic, list(last), list(last.values()))
                await conn.execute(sql.NOTIFY_OUTBOX)
        report.add(done)


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


def dead_letter_row(record: InboundRecord, code: str, message: str) -> OutboxRow:
    """The original bytes (a tombstone stays one) with the five headers that say why."""
    headers = {"error.code": code, "error.message": message, "source.topic": record.topic,
               "source.partition": str(record.partition), "source.offset": str(record.offset)}
    key, value = record.key, record.value
    # What the broker took may not fit back with our headers: keep the heads, say how long they were.
    if key is not None and len(key) > DLQ_MAX_KEY_BYTES:
        key, headers["error.key_truncated"] = key[:DLQ_MAX_KEY_BYTES], str(len(key))
    room = DLQ_MAX_BYTES - len(key or b"")
    if value is not None and len(value) > room:
        value, headers["error.truncated"] = value[:room], str(len(value))
    return OutboxRow("dlq", key, value, str(uuid.uuid4()), headers)


def _label(d: Decoded) -> str:
    """Metric label of a record's type: only the contract's types (a sender must not mint new series)."""
    return d.command.type if d.command is not None else "unknown"


class _Part:
    """The records of one transaction, applied in partition order."""

    def __init__(self, conn: asyncpg.Connection, uow: UnitOfWork, report: BatchReport):
        self.conn, self.uow, self.report = conn, uow, report
        self.seen: dict[str, tuple[str, str]] = {}  # command id -> (body hash, stored result json)

    async def apply(self, items: list[Decoded]) -> None:
        ids = [d.command_id for d in items if d.command_id]
        for row in await self.conn.fetch(sql.FIND_PROCESSED, ids):
            self.seen[row["command_id"]] = (row["body_hash"], row["result"])
        first = items[0]
        if isinstance(first.command, SEGMENT_COMMANDS) and first.command_id not in self.seen:
            await self.apply_segment_command(first)  # alone in its part
        else:
            await self.apply_run(items)

    async def apply_run(self, items: list[Decoded]) -> None:
        """Lock everything the run needs, run the rules in order, write in bulk; all inside one savepoint.

        If PostgreSQL refuses the writes, the run is redone record by record, a savepoint each, and a
        command the database refuses alone is rejected.
        """
        before_report, before_seen = self.report.copy(), dict(self.seen)
        try:
            async with self.conn.transaction():
                ctx = await self.load_run([d for d in items if isinstance(d.command, USER_COMMANDS)])
                for d in items:
                    self.route(d, ctx)
                await self.uow.flush(self.conn)
        except _FATAL:
            raise
        except asyncpg.PostgresError as exc:
            self.uow.forget()
            self.report.restore(before_report)
            self.seen.clear()
            self.seen.update(before_seen)
            if len(items) > 1:
                log.warning("run failed, redoing it record by record",
                            extra={"from": items[0].record.position, "to": items[-1].record.position,
                                   "error": str(exc)})
                for d in items:
                    await self.apply_run([d])
            elif items[0].command is not None and items[0].command_id not in self.seen:
                self.refused(items[0], exc)
            else:
                raise

    def route(self, d: Decoded, ctx: RunContext) -> None:
        if d.command is None:
            self.dead_letter(d)
        elif d.command_id in self.seen:
            self.answer_duplicate(d)
        else:
            self.apply_user_command(d, ctx)

    async def load_run(self, run: list[Decoded]) -> RunContext:
        """Lock in one fixed order: users (rows, id order), the rollout lock if some are new, segments (id order)."""
        new = await self.uow.load_users(self.conn, {u for d in run for u in user_handlers.users_of(d.command)})
        if new:
            await self.conn.execute(sql.LOCK_ROLLOUT_SHARED, sql.ROLLOUT_LOCK)
        slugs = sorted({s for d in run for s in user_handlers.slugs_of(d.command)})
        rows = await self.conn.fetch(sql.LOCK_SEGMENTS_FOR_SHARE, slugs, bool(new)) if slugs or new else []
        segments = {r["slug"]: Segment(r["id"], r["slug"], r["salt"], r["auto_percent"]) for r in rows}
        rollouts = [s for s in segments.values() if s.auto_percent > 0]
        return RunContext(self.uow, segments, rollouts)

    def apply_user_command(self, d: Decoded, ctx: RunContext) -> None:
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

    def finish(self, d: Decoded, status: str, events: int = 0, error: ErrorInfo | None = None,
               store: bool = True) -> None:
        """Publish the command's result; store it under its id unless `store` is False (nothing was decided)."""
        assert d.command_id is not None  # a decoded command always has its id
        result = CommandResult(
            command_id=d.command_id, type=d.type, status=status, error=error,
            events=events, processed_at=self.uow.now,
        )
        payload = self.uow.record_result(result, d.body_hash if store else None)
        if store:
            self.seen[d.command_id] = (d.body_hash, payload)
        self.report.outcomes[(_label(d), status)] += 1
        self.report.events += events
        if error is not None:
            log.info("command rejected", extra={"position": d.record.position, "command_id": d.command_id,
                                                "error_code": error.code.value, "error": error.message})

    def refused(self, d: Decoded, exc: Exception) -> None:
        """The database refused one command (its savepoint is rolled back): reject it alone, go on."""
        log.error("command could not be applied",
                  extra={"position": d.record.position, "command_id": d.command_id, "error": str(exc)})
        self.finish(d, "rejected", error=ErrorInfo(code=ErrorCode.INVALID_COMMAND,
                                                   message=printable(f"could not be applied: {exc}")))

    def answer_duplicate(self, d: Decoded) -> None:
        """A seen command id: the stored result again, or a conflict if the body differs."""
        assert d.command_id is not None  # only decoded commands are looked up in `seen`
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
        self.report.outcomes[(_label(d), status)] += 1
        log.info("duplicate command", extra={"position": d.record.position, "command_id": d.command_id, "status": status})

    def dead_letter(self, d: Decoded) -> None:
        assert d.error_code is not None and d.error_message is not None  # what makes it a dead letter
        self.uow.record_outbox(dead_letter_row(d.record, d.error_code, d.error_message))
        self.report.dead_letters += 1
        log.warning("dead letter", extra={"position": d.record.position, "command_id": d.command_id,
                                          "error_code": d.error_code, "error": d.error_message})
        if d.command_id in self.seen:
            self.answer_duplicate(d)  # the same id again: its stored result, or a conflict
        elif d.command_id is not None:
            self.finish(d, "rejected", error=ErrorInfo(code=ErrorCode.INVALID_COMMAND, message=d.error_message,
                                                       details={"dead_letter": d.error_code}))
