"""The change set of one transaction: what its commands changed, written with a handful of bulk statements."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

from schemas.common import format_time
from service.domain import Change, Membership, Scheduled, UserState
from service.write import sql
from service.write.outbox import OutboxRow, membership_event, result_row


@dataclass
class ChangeSet:
    """An identity map of user state, the diff of what the rules changed, and the inbox and outbox rows.

    It does not own the transaction: the batch opens it, and `flush` writes into it. Users are locked
    (`lock_users`), then, once every lock of the transaction is held, their state is read once and snapshotted
    (`read_users`); `flush` writes the difference between the snapshot and
    the state the rules left, so every change of a row is written exactly once, then history, inbox and outbox
    rows in the order they were recorded.
    """

    now: datetime
    users: dict[int, UserState] = field(default_factory=dict)
    before: dict[int, tuple[dict[int, Membership], set[int], dict[int, Scheduled]]] = field(default_factory=dict)
    registered: set[int] = field(default_factory=set)  # users the rules made known
    tentative: set[int] = field(default_factory=set)  # users inserted when loaded (their row is their lock)
    history: list[tuple] = field(default_factory=list)
    outbox: list[OutboxRow] = field(default_factory=list)
    processed: list[tuple] = field(default_factory=list)
    earliest_expiry: datetime | None = None  # the scheduler's next due time among what this set wrote

    async def lock_users(self, conn: asyncpg.Connection, user_ids: set[int]) -> set[int]:
        """Lock the users' rows (inserting those seen for the first time); returns the new ones. Reads no state:
        `read_users` does, once every other lock of the transaction is held too."""
        ids = sorted(u for u in user_ids if u not in self.users)
        if not ids:
            return set()
        new = {r["user_id"] for r in await conn.fetch(sql.LOCK_OR_INSERT_USERS, ids, self.now)}
        self.tentative |= new
        for u in ids:
            self.users[u] = UserState(u, known=u not in new)
        return new

    async def read_users(self, conn: asyncpg.Connection) -> None:
        """Read the memberships, exclusions and schedules of the users locked and not read yet; snapshot them.

        Call it only after the last lock wait: a fan-out committed meanwhile changed them (under READ COMMITTED
        each statement sees what was committed before it started)."""
        ids = sorted(u for u in self.users if u not in self.before)
        if not ids:
            return
        await conn.execute(sql.READS_BY_KEY)
        for r in await conn.fetch(sql.USER_MEMBERSHIPS, ids):
            self.users[r["user_id"]].memberships[r["segment_id"]] = Membership(
                r["source"], r["added_at"], r["expires_at"]
            )
        for r in await conn.fetch(sql.USER_EXCLUSIONS, ids):
            self.users[r["user_id"]].exclusions.add(r["segment_id"])
        for r in await conn.fetch(sql.USER_SCHEDULES, ids):
            self.users[r["user_id"]].scheduled[r["segment_id"]] = Scheduled(r["starts_at"], r["expires_at"])
        await conn.execute(sql.READS_DONE)
        for u in ids:
            state = self.users[u]
            self.before[u] = (dict(state.memberships), set(state.exclusions), dict(state.scheduled))

    def record_changes(self, changes: list[Change], command_id: str | None) -> None:
        for c in changes:
            self.history.append((c.user_id, c.segment.slug, c.segment.id, c.change, c.occurred_at, c.reason, command_id,
                                 c.expires_at if c.change == "added" else None))  # a history row: an add's expiry
            self.outbox.append(membership_event(c, command_id))
            if c.change == "added" and c.expires_at is not None:
                self.due_at(c.expires_at)

    def due_at(self, when: datetime) -> None:
        """Something this set writes is due for the scheduler at `when` (an expiry or a start)."""
        if self.earliest_expiry is None or when < self.earliest_expiry:
            self.earliest_expiry = when

    def record_result(self, command_id: str, type_: str, payload: str, body_hash: str | None) -> None:
        """Store a result's JSON in the inbox (when `body_hash` is given) and publish it."""
        if body_hash is not None:
            self.processed.append((command_id, type_, body_hash, payload, self.now))
        self.outbox.append(result_row(command_id, payload))

    def record_outbox(self, row: OutboxRow) -> None:
        self.outbox.append(row)

    async def flush(self, conn: asyncpg.Connection) -> None:
        """Write users, memberships, exclusions, history, outbox and inbox rows; then forget the state."""
        if unregistered := self.tentative - self.registered:  # every command of theirs was rejected
            await conn.execute(sql.DELETE_USERS, sorted(unregistered))
        await self._write_state(conn)
        if self.history:
            await conn.copy_records_to_table("membership_history", records=self.history, columns=sql.HISTORY_COLUMNS)
        if self.processed:
            await conn.copy_records_to_table("processed_commands", records=self.processed, columns=sql.PROCESSED_COLUMNS)
        if self.outbox:
            await conn.copy_records_to_table(
                "outbox", records=[r.record() for r in self.outbox], columns=sql.OUTBOX_COLUMNS
            )
        if self.earliest_expiry is not None:
            await conn.execute(sql.NOTIFY_TTL, format_time(self.earliest_expiry))
        self.forget()

    def forget(self) -> None:
        """Drop loaded state and pending writes (after a flush, or after a rollback)."""
        self.users.clear()
        self.before.clear()
        self.registered.clear()
        self.tentative.clear()
        self.history.clear()
        self.outbox.clear()
        self.processed.clear()
        self.earliest_expiry = None

    async def _write_state(self, conn: asyncpg.Connection) -> None:
        gone: list[tuple[int, int]] = []
        kept: list[tuple[int, int, Membership]] = []
        excluded: list[tuple[int, int]] = []
        included: list[tuple[int, int]] = []
        unscheduled: list[tuple[int, int]] = []
        scheduled: list[tuple[int, int, Scheduled]] = []
        for user_id, (memberships, exclusions, schedules) in self.before.items():
            state = self.users[user_id]
            gone += [(user_id, s) for s in memberships.keys() - state.memberships.keys()]
            kept += [(user_id, s, m) for s, m in state.memberships.items() if memberships.get(s) != m]
            excluded += [(user_id, s) for s in state.exclusions - exclusions]
            included += [(user_id, s) for s in exclusions - state.exclusions]
            unscheduled += [(user_id, s) for s in schedules.keys() - state.scheduled.keys()]
            scheduled += [(user_id, s, x) for s, x in state.scheduled.items() if schedules.get(s) != x]
        if gone:
            await conn.execute(sql.DELETE_MEMBERSHIPS, *_columns(gone, 2))
        if kept:
            await conn.execute(
                sql.UPSERT_MEMBERSHIPS, [u for u, _, _ in kept], [s for _, s, _ in kept],
                [m.source for *_, m in kept], [m.added_at for *_, m in kept], [m.expires_at for *_, m in kept],
            )
        if included:
            await conn.execute(sql.DELETE_EXCLUSIONS, *_columns(included, 2))
        if excluded:
            await conn.execute(sql.INSERT_EXCLUSIONS, *_columns(excluded, 2), [self.now] * len(excluded))
        if unscheduled:
            await conn.execute(sql.DELETE_SCHEDULES, *_columns(unscheduled, 2))
        if scheduled:
            await conn.execute(sql.UPSERT_SCHEDULES, [u for u, _, _ in scheduled], [s for _, s, _ in scheduled],
                               [x.starts_at for *_, x in scheduled], [x.expires_at for *_, x in scheduled], self.now)
            for *_, x in scheduled:
                self.due_at(x.starts_at)


def _columns(rows: list[tuple], width: int) -> list[list]:
    return [[r[i] for r in rows] for i in range(width)] if rows else [[] for _ in range(width)]
