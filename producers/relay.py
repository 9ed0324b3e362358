"""The outbox relay: publishes outbox rows in seq order, marks them published in the same transaction."""
from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import UTC, datetime

import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError

from producers import leader, sql
from service.infra import db, metrics
from service.infra.settings import Settings
from service.write import outbox

log = logging.getLogger("segmentation.relay")

# One round of sends stays within one producer batch (kafka.producer_options max_batch_size).
ROUND_BYTES = 1024 * 1024 - 64 * 1024


class OutboxRelay(leader.LeaderLoop):
    LOCK, NAME, ACTIVE = db.RELAY_LOCK, "relay", metrics.RELAY_ACTIVE

    def __init__(self, settings: Settings, producer: AIOKafkaProducer | None = None):
        super().__init__(settings, producer)
        self.topics = outbox.topics(settings)

    async def lead(self, conn: asyncpg.Connection) -> None:
        await conn.add_listener("segmentation_outbox", lambda *_: self.wake.set())
        next_purge = next_backlog = 0.0
        while not self.stopping.is_set():
            self.wake.clear()
            now = time.monotonic()
            if now >= next_backlog:  # before publishing, so a relay stuck on a row still shows its backlog
                metrics.OUTBOX_BACKLOG.set(await conn.fetchval(sql.BACKLOG))
                next_backlog = now + 5
            sent = await self.publish_batch(conn)
            if now >= next_purge and self.settings.outbox_retention_seconds:
                await self.purge(conn)
                next_purge = now + 60
            if sent < self.settings.relay_batch_max:
                await leader.wait(self.wake, self.settings.relay_poll_seconds)  # NOTIFY, or the polling fallback

    async def purge(self, conn: asyncpg.Connection) -> None:
        """Delete published rows past retention, in slices, until none is left (keeps up with any load)."""
        while (await conn.execute(sql.PURGE, float(self.settings.outbox_retention_seconds))) == f"DELETE {sql.PURGE_SLICE}":  # noqa: ASYNC110 - slices; the sleep only yields
            await asyncio.sleep(0)  

    async def publish_batch(self, conn: asyncpg.Connection) -> int:
        """Claim, publish and mark one batch; on any failure the transaction rolls back and rows stay.

        Sends go out in rounds of at most one producer batch of bytes, each awaited before the next: a
        partition never has two batches in flight, so a failed one cannot be overtaken by the next one
        (without an idempotent producer Kafka would not keep them in order).
        """
        async with conn.transaction():
            rows = await conn.fetch(sql.CLAIM, self.settings.relay_batch_max)
            if not rows:
                return 0
            round_futures: list[asyncio.Future] = []
            round_bytes = 0
            for r in rows:
                headers = [("event_id", r["event_id"].encode())]
                if r["headers"]:
                    headers += [(k, str(v).encode()) for k, v in json.loads(r["headers"]).items()]
                size = len(r["payload"] or b"") + len(r["key"] or b"") + sum(len(k) + len(v) for k, v in headers)
                if round_bytes + size > ROUND_BYTES and round_futures:
                    await _all_acknowledged(round_futures)
                    round_futures, round_bytes = [], 0
                try:
                    round_futures.append(await self.producer.send(
                        self.topics[r["kind"]], value=r["payload"], key=r["key"], headers=headers))
                except MessageSizeTooLargeError as exc:
                    # Never retried into a stall: the row is skipped, loudly. (Dead letters are bounded when
                    # written, so this is a configuration error: a broker limit below the service's.)
                    metrics.OUTBOX_DROPPED.inc()
                    log.error("outbox row too large for the producer; skipped",
                              extra={"seq": r["seq"], "kind": r["kind"], "event_id": r["event_id"], "error": str(exc)})
                round_bytes += size
            await _all_acknowledged(round_futures)  # every row acknowledged before it is marked
            await conn.execute(sql.MARK_PUBLISHED, [r["seq"] for r in rows])
        now = datetime.now(UTC)
        for r in rows:
            metrics.PUBLISH_LATENCY.observe((now - r["created_at"]).total_seconds())
            metrics.OUTBOX_PUBLISHED.labels(r["kind"]).inc()
        self.published += len(rows)
        return len(rows)


async def _all_acknowledged(futures: list[asyncio.Future]) -> None:
    """Wait for every send of a round, even after one failed (nothing left in flight), then raise the first error."""
    for outcome in await asyncio.gather(*futures, return_exceptions=True):
        if isinstance(outcome, BaseException):
            raise outcome


async def main(settings: Settings) -> None:
    """`segmentation relay`: run until SIGTERM or Ctrl-C."""
    from service.infra.runtime import run_until_signalled

    relay = OutboxRelay(settings)
    await run_until_signalled(relay.run(), relay.stop)
