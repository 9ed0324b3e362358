"""The outbox relay: publishes outbox rows in seq order per shard and deletes them in the same transaction.

Rows carry a shard (a hash of their key, computed by PostgreSQL). Each relay leads a share of the shards under
one advisory lock per shard, so the rows of a key leave from one relay, in seq order; relays rebalance the shards
among themselves as they come and go.
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import get_args

import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, KafkaTimeoutError, MessageSizeTooLargeError, RecordListTooLargeError

from producers import leader, sql
from service.infra import db, metrics
from service.infra.settings import Settings
from service.write import outbox

log = logging.getLogger("segmentation.relay")

SHARDS = 24  # the `shard` column of migration 003 is a hash of the key modulo this
BALANCE_SECONDS = 1.0  # how often a relay counts its peers and takes or hands back shards
TOO_LARGE = (MessageSizeTooLargeError, RecordListTooLargeError)
# A topic the broker refuses (authorization, ...) is left alone this long, then tried again on its own.
REFUSED_SECONDS = (1.0, 60.0)  # first pause, longest pause

for _kind in get_args(outbox.Kind):  # at 0 from the start: alerts take increase() of it (see consumers/worker.py)
    metrics.OUTBOX_REFUSED.labels(_kind)

class TopicRefused(KafkaError):
    """The broker refused a topic's batch with a non-retriable error; its rows stay for later."""

    def __init__(self, kind: str, error: BaseException):
        super().__init__(f"{kind}: {error!r}")
        self.kind, self.error = kind, error


@dataclass
class Row:
    seq: int
    kind: str
    key: bytes | None
    payload: bytes | None
    event_id: str
    headers: list[tuple[str, bytes]]
    created_at: datetime


@dataclass
class Refusal:
    until: float
    pause: float


class OutboxRelay(leader.LeaderLoop):
    LOCK, NAME, ACTIVE = db.RELAY_LOCK, "relay", metrics.RELAY_ACTIVE
    TRY_LOCK = sql.TRY_LOCK_SHARED  # presence: every relay holds it; shards are led apart

    def __init__(self, settings: Settings, producer: AIOKafkaProducer | None = None):
        super().__init__(settings, producer)
        self.topics = outbox.topics(settings)
        self.shards: set[int] = set()
        self.refused: dict[str, Refusal] = {}

    async def lead(self, conn: asyncpg.Connection) -> None:
        await conn.add_listener("segmentation_outbox", lambda *_: self.wake.set())
        self.shards = set()
        metrics.OUTBOX_SHARDS.set(SHARDS)
        next_balance = next_backlog = 0.0
        try:
            while not self.stopping.is_set():
                self.wake.clear()
                now = time.monotonic()
                if now >= next_balance:
                    await self.balance(conn)
                    next_balance = now + BALANCE_SECONDS
                if now >= next_backlog:  # before publishing, so a relay stuck on a row still shows its backlog
                    backlog, oldest = await conn.fetchrow(sql.BACKLOG, sorted(self.shards))
                    metrics.OUTBOX_BACKLOG.set(backlog)
                    metrics.OUTBOX_OLDEST.set(oldest)
                    next_backlog = now + 5
                sent = await self.publish_refused_again(conn)
                try:
                    sent += await self.publish_batch(conn, self.open_kinds())
                except TopicRefused:
                    continue  # set aside; the other topics go on at once
                if sent < self.settings.relay_batch_max:  # NOTIFY, the polling fallback, or the next balance
                    await leader.wait(self.wake, min(self.settings.relay_poll_seconds, next_balance - time.monotonic()))
        finally:
            self.shards = set()  # the locks go with the connection, and with them what this relay reports
            for gauge in (metrics.RELAY_SHARDS, metrics.OUTBOX_BACKLOG, metrics.OUTBOX_OLDEST):
                gauge.set(0)

    async def balance(self, conn: asyncpg.Connection) -> None:
        """Lead a fair share of the shards: hand back what is over it, take free ones up to it."""
        fair = -(-SHARDS // max(1, await conn.fetchval(sql.RELAYS, self.LOCK)))
        if len(self.shards) > fair:
            for shard in sorted(self.shards)[fair:]:
                await conn.fetchval(sql.RELEASE_SHARD, self.LOCK, shard)
                self.shards.discard(shard)
        elif len(self.shards) < fair:
            taken = {r[0] for r in await conn.fetch(sql.TAKEN_SHARDS, self.LOCK)}
            for shard in range(SHARDS):
                if len(self.shards) >= fair:
                    break
                if shard not in taken and await conn.fetchval(sql.TAKE_SHARD, self.LOCK, shard):
                    self.shards.add(shard)
        metrics.RELAY_SHARDS.set(len(self.shards))

    def open_kinds(self) -> list[str]:
        return [k for k in self.topics if k not in self.refused]

    async def publish_refused_again(self, conn: asyncpg.Connection) -> int:
        """Try a refused topic again once its pause is over, alone, so that its refusal repeats nothing else."""
        sent = 0
        for kind, refusal in list(self.refused.items()):
            if time.monotonic() >= refusal.until:
                try:
                    sent += await self.publish_batch(conn, [kind])
                except TopicRefused:
                    continue
                del self.refused[kind]
                log.info("topic accepted again", extra={"kind": kind, "topic": self.topics[kind]})
        return sent

    async def publish_batch(self, conn: asyncpg.Connection, kinds: list[str]) -> int:
        """Claim, publish and delete one batch of the led shards; on any failure the transaction rolls back and
        the rows stay. A topic the broker refuses is set aside (TopicRefused) so that the others go on."""
        if not self.shards or not kinds:
            return 0
        try:
            async with conn.transaction():
                records = await claim(conn, sorted(self.shards), kinds, self.settings.relay_batch_max)
                if not records:
                    return 0
                rows = sorted((_row(r) for r in records), key=lambda r: r.seq)
                await self.publish(rows)
        except TopicRefused as exc:
            refusal = self.refused.get(exc.kind)
            pause = REFUSED_SECONDS[0] if refusal is None else min(2 * refusal.pause, REFUSED_SECONDS[1])
            self.refused[exc.kind] = Refusal(time.monotonic() + pause, pause)
            metrics.OUTBOX_REFUSED.labels(exc.kind).inc()
            log.error("the broker refuses a topic; its rows wait, the other topics go on",
                      extra={"kind": exc.kind, "topic": self.topics[exc.kind], "error": repr(exc.error),
                             "retry_in_seconds": pause})
            raise
        now = datetime.now(UTC)
        for (created_at, kind), n in Counter((r.created_at, r.kind) for r in rows).items():  # a transaction's rows
            metrics.observe_many(metrics.PUBLISH_LATENCY, (now - created_at).total_seconds(), n)  # share their age
            metrics.OUTBOX_PUBLISHED.labels(kind).inc(n)
        self.published += len(rows)
        return len(rows)

    async def publish(self, rows: list[Row]) -> None:
        """Send `rows` on the partitions aiokafka's default partitioner would pick, in rounds of one producer batch
        per partition (see `send_rounds`)."""
        partitions: dict[tuple[str, int], leader.Partition[Row]] = {}
        counts: dict[str, list[int]] = {}
        numbered: dict[tuple[str, bytes | None], int] = {}  # a user's events of one claim share their key
        for r in rows:
            topic = self.topics[r.kind]
            if topic not in counts:
                try:
                    counts[topic] = sorted(await self.producer.partitions_for(topic))
                except KafkaError as exc:
                    if _refusal(exc):
                        raise TopicRefused(r.kind, exc) from exc
                    raise
            if (number := numbered.get((topic, r.key), -1)) < 0:
                number = numbered[topic, r.key] = leader.partition_of(r.key, counts[topic])
            if (part := partitions.get((topic, number))) is None:
                part = partitions[topic, number] = leader.Partition(topic, number)
            part.rows.append(r)
        await self.send_rounds(partitions.values(), _settled, lambda r: _drop(r, "larger than a producer batch"))


async def claim(conn: asyncpg.Connection, shards: list[int], kinds: list[str], limit: int) -> list[asyncpg.Record]:
    """Delete and return the oldest `limit` rows of `shards` and `kinds`, inside the caller's transaction."""
    await conn.execute(sql.CLAIM_BY_PRIMARY_KEY)
    return await conn.fetch(sql.CLAIM, shards, kinds, limit)


def _settled(sends: leader.Round) -> None:
    for part, taken, outcome in sends:
        if isinstance(outcome, TOO_LARGE):
            if len(taken) > 1:  # over the topic's limit together: send them one by one to find the culprit
                part.rows.extendleft(reversed(taken))
                part.single = True
            else:
                _drop(taken[0], repr(outcome))
        elif _refusal(outcome):
            raise TopicRefused(taken[0].kind, outcome)
        elif isinstance(outcome, BaseException):
            raise outcome


def _row(r: asyncpg.Record) -> Row:
    kind, key, payload, event_id = r["kind"], r["key"], r["payload"], r["event_id"]
    headers = outbox.published_headers(kind, key, payload, event_id.encode())
    if r["headers"]:
        headers += [(k, str(v).encode()) for k, v in json.loads(r["headers"]).items()]
    return Row(r["seq"], kind, key, payload, event_id, headers, r["created_at"])


def _refusal(outcome: object) -> bool:
    """A broker's final no to a topic (authorization, invalid topic, ...), not a timeout or a lost connection."""
    return isinstance(outcome, KafkaError) and not outcome.retriable and not isinstance(outcome, KafkaTimeoutError)


def _drop(row: Row, reason: str) -> None:
    """Never retried into a stall: a row no broker takes is skipped, loudly. (Dead letters are bounded when written,
    so this is a configuration error: a broker limit below the service's.)"""
    metrics.OUTBOX_DROPPED.inc()
    log.error("outbox row refused as too large; skipped",
              extra={"seq": row.seq, "kind": row.kind, "event_id": row.event_id, "error": reason})


async def main(settings: Settings) -> None:
    """`segmentation relay`: run until SIGTERM or Ctrl-C."""
    from service.infra.runtime import run_until_signalled

    relay = OutboxRelay(settings)
    await run_until_signalled(relay.run(), relay.stop)
