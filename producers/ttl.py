"""The scheduler (TTL producer): publishes StartMembership when a scheduled membership begins and ExpireMembership
when a membership runs out. One active instance.

Each due item is published once. It is published again only when it is still due although the worker has
consumed past the message (it ignored it: a clock behind ours) and REPUBLISH_AFTER has passed: a worker that lags
never sees the command topic multiplied. Command ids are an HMAC of the item under a key kept in PostgreSQL, so
every scheduler instance derives the same id (scanning twice is harmless) and a publisher without database
access cannot take an id first and so block an expiry or a start.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg
from aiokafka import AIOKafkaProducer
from prometheus_client import Counter

from producers import leader, sql
from schemas.commands import ExpireMembership, StartMembership
from schemas.common import format_time
from service.infra import db, metrics
from service.infra.settings import Settings
from service.write.decoding import scheduler_json, time_text

log = logging.getLogger("segmentation.ttl")

# Rows are visible at commit, not at insert: look back this far each pass so a late commit is not missed.
LOOKBACK = timedelta(seconds=60)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ORIGIN = (EPOCH, 0, 0)
FULL_SCAN_SECONDS = 300
REPUBLISH_AFTER = timedelta(seconds=10)
LAG_SECONDS = 1.0  # the lag gauge is measured at most this often: a burst of due items makes passes back to back
# The pass for the next due instant starts this much ahead: the burst is read and encoded by then and goes out at
# the instant (a burst of 10 000 took ~0.15 s to read and encode; that was lag).
PREPARE_AHEAD = timedelta(seconds=0.3)


@dataclass(frozen=True)
class End:
    """One end of a membership the scheduler watches: where its due items are and which command they become."""

    kind: str  # "start" | "expire": the command id's prefix
    command: type[ExpireMembership | StartMembership]
    due: str
    next_due: str
    oldest_due: str
    published: Counter

    def payload(self, command_id: str, row: asyncpg.Record, issued_at: datetime) -> bytes:
        """The command's JSON (`decoding.scheduler_json`): one per due item of a burst."""
        return scheduler_json(self.command.__name__, command_id, row["user_id"], row["slug"], row["at"], issued_at)


STARTS = End("start", StartMembership, sql.DUE_STARTS, sql.NEXT_START, sql.OLDEST_DUE_START,
             metrics.TTL_STARTS)
EXPIRIES = End("expire", ExpireMembership, sql.DUE_EXPIRIES, sql.NEXT_EXPIRY, sql.OLDEST_DUE_EXPIRY,
               metrics.TTL_EXPIRIES)
ENDS = (STARTS, EXPIRIES)  # starts first: a start and its expiry due in one pass go out in that order


def command_id(secret: bytes, kind: str, user_id: int, slug: str, at: datetime) -> str:
    """Deterministic for whoever holds `secret`, unguessable for anyone else."""
    digest = hmac.digest(secret, f"{kind}|{user_id}|{slug}|{time_text(at)}".encode(), hashlib.sha256)
    return f"{kind}:{user_id}:{digest[:16].hex()}"


@dataclass(slots=True)
class Outgoing:
    """One command to publish (a `leader.Message`)."""

    command_id: str
    key: bytes
    payload: bytes
    headers: list[tuple[str, bytes]] = field(default_factory=list)


@dataclass(frozen=True)
class Sent:
    """Where a command went, and when the broker acknowledged it (loop time)."""

    partition: int
    offset: int
    at: float


class TtlProducer(leader.LeaderLoop):
    LOCK, NAME, ACTIVE = db.TTL_LOCK, "ttl producer", metrics.TTL_ACTIVE

    def __init__(self, settings: Settings, producer: AIOKafkaProducer | None = None):
        super().__init__(settings, producer)
        self.next_due: datetime | None = None
        self.sent: dict[str, Sent] = {}  # command id -> its message, for every item published and maybe due
        self.secret = b""

    def on_notify(self, _conn, _pid, _channel, payload: str) -> None:
        """A worker set an expiry or a start: wake early if it is due no later than the next due instant (one due
        at that very instant may have been committed after the pass read ahead for it: `PREPARE_AHEAD`)."""
        try:
            when = datetime.fromisoformat(payload.replace("Z", "+00:00"))
        except ValueError:
            when = None
        if when is None or self.next_due is None or when <= self.next_due:
            self.wake.set()

    async def lead(self, conn: asyncpg.Connection) -> None:
        await conn.add_listener("segmentation_ttl", self.on_notify)
        self.secret = (await conn.fetchval(sql.SCHEDULER_SECRET)).encode()
        self.sent.clear()  # a new leader publishes everything still due once
        loop = asyncio.get_running_loop()
        cursors = {end.kind: ORIGIN for end in ENDS}
        full_scan_at = loop.time() + FULL_SCAN_SECONDS
        try:
            await self.schedule(conn, cursors, full_scan_at)
        finally:
            for end in ENDS:  # a standby reports no lag: the leader that takes over does
                metrics.TTL_LAG.labels(end.kind).set(0)

    async def schedule(self, conn: asyncpg.Connection, cursors: dict[str, tuple], full_scan_at: float) -> None:
        """Pass after pass until stopped: publish what is due, measure the lag, sleep until the next due item."""
        loop = asyncio.get_running_loop()
        lag_at = 0.0
        while not self.stopping.is_set():
            self.wake.clear()
            now = datetime.now(UTC)
            if self.next_due is not None and now < self.next_due <= now + PREPARE_AHEAD:
                now = self.next_due  # woken ahead of it: what is due then is read now, sent then (`publish_due`)
            seen: set[str] | None = None
            if loop.time() >= full_scan_at:
                # Everything still due, from the start: what the worker ignored goes out again (see `due_again`),
                # and what is no longer due is forgotten.
                cursors, full_scan_at, seen = {end.kind: ORIGIN for end in ENDS}, loop.time() + FULL_SCAN_SECONDS, set()
            positions = dict(await conn.fetch(sql.WORKER_POSITIONS, self.settings.consumer_group,
                                              self.settings.commands_topic))
            for end in ENDS:
                cursor = await self.publish_due(conn, end, now, cursors[end.kind], positions, seen)
                # Next pass starts a little behind the cursor (late commits); `sent` keeps repeats out.
                cursors[end.kind] = min(cursor, (now - LOOKBACK, 0, 0))
            if loop.time() >= lag_at:
                for end in ENDS:
                    await measure_lag(conn, end)
                lag_at = loop.time() + LAG_SECONDS
            if seen is not None:
                self.sent = {c: s for c, s in self.sent.items() if c in seen}
            nexts = [t for end in ENDS if (t := await conn.fetchval(end.next_due, now)) is not None]
            self.next_due = min(nexts, default=None)
            sleep = self.settings.ttl_max_sleep_seconds
            if self.next_due is not None:
                ahead = self.next_due - PREPARE_AHEAD - datetime.now(UTC)
                sleep = min(sleep, max(0.0, ahead.total_seconds()))
            await leader.wait(self.wake, sleep)

    def due_again(self, sent: Sent, positions: dict[int, int]) -> bool:
        """Still due after the worker consumed its command (and REPUBLISH_AFTER passed): the worker ignored it."""
        return (asyncio.get_running_loop().time() - sent.at >= REPUBLISH_AFTER.total_seconds()
                and positions.get(sent.partition, 0) > sent.offset)

    def record_sent(self, sends: leader.Round) -> None:
        """Where each acknowledged command went (the first failure is raised: the leader starts over)."""
        at = asyncio.get_running_loop().time()
        for part, taken, outcome in sends:
            if isinstance(outcome, BaseException):
                raise outcome
            for i, command in enumerate(taken):  # a batch's messages follow its first one's offset
                self.sent[command.command_id] = Sent(part.number, outcome.offset + i, at)

    async def publish_due(self, conn: asyncpg.Connection, end: End, now: datetime, cursor: tuple,
                          positions: dict[int, int], seen: set[str] | None = None) -> tuple:
        """Publish every item of `end` due at `now` after `cursor` not published yet (or due again); returns the
        new cursor. `seen` collects the ids of every due item. A `now` still ahead (PREPARE_AHEAD): each read is
        sent once its last item is due, never before. Stopped (SIGTERM): nothing more is read or sent."""
        topic = self.settings.commands_topic
        while not self.stopping.is_set():
            rows = await conn.fetch(end.due, now, *cursor, self.settings.ttl_batch_max)
            if not rows:
                return cursor
            numbers = sorted(await self.producer.partitions_for(topic))
            partitions: dict[int, leader.Partition[Outgoing]] = {}
            count = 0
            for r in rows:
                cid = command_id(self.secret, end.kind, r["user_id"], r["slug"], r["at"])
                if seen is not None:
                    seen.add(cid)
                if cid in self.sent and not self.due_again(self.sent[cid], positions):
                    continue
                key = str(r["user_id"]).encode()
                number = leader.partition_of(key, numbers)
                if (part := partitions.get(number)) is None:
                    part = partitions[number] = leader.Partition(topic, number)
                part.rows.append(Outgoing(cid, key, end.payload(cid, r, now)))
                count += 1
            if not await _until(rows[-1]["at"], self.stopping):
                return cursor  # stopped first: nothing sent, the next leader reads these rows again
            # In producer batches per partition, bounded: a leader that cannot publish steps down.
            await self.send_rounds(partitions.values(), self.record_sent, _too_large)
            end.published.inc(count)
            self.published += count
            if count:
                log.info(f"{end.kind} commands published",
                         extra={"count": count, "up_to": format_time(rows[-1]["at"])})
            last = rows[-1]
            cursor = (last["at"], last["user_id"], last["segment_id"])
            if len(rows) < self.settings.ttl_batch_max:
                return cursor
        return cursor


async def _until(when: datetime, stopping: asyncio.Event) -> bool:
    """Sleep until the wall clock reaches `when` (at once if it has); False if `stopping` is set first. The loop's
    clock is not the wall clock: a wait can end a little before `when`, so it is checked again (nothing sets an
    event at a wall-clock time). At most PREPARE_AHEAD, unless the wall clock steps back meanwhile (NTP)."""
    while (left := (when - datetime.now(UTC)).total_seconds()) > 0:
        await leader.wait(stopping, left)
        if stopping.is_set():
            return False
    return True


def _too_large(command: Outgoing) -> None:
    raise ValueError(f"command {command.command_id} is larger than a producer batch")


async def measure_lag(conn: asyncpg.Connection, end: End) -> None:
    """The lag of `end`: how long its oldest item due has been waiting, whether for the scheduler or the worker
    (an item leaves the table when the worker applies its command)."""
    now = datetime.now(UTC)
    oldest = await conn.fetchval(end.oldest_due, now)
    metrics.TTL_LAG.labels(end.kind).set(0.0 if oldest is None else (now - oldest).total_seconds())


async def main(settings: Settings) -> None:
    """`segmentation ttl`: run until SIGTERM or Ctrl-C."""
    from service.infra.runtime import run_until_signalled

    ttl = TtlProducer(settings)
    await run_until_signalled(ttl.run(), ttl.stop)
