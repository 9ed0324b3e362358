"""The outbox relay: publishes outbox rows in seq order, marks them published in the same transaction."""
from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import datetime, timezone

import asyncpg
from aiokafka import AIOKafkaProducer

from producers import leader
from service import kafka, metrics
from service.settings import Settings

log = logging.getLogger("segmentation.relay")

# Never a "last id seen" cursor: seq is handed out at INSERT but visible at COMMIT, so a cursor skips rows.
# FOR UPDATE without SKIP LOCKED: a new leader waits for the old one's transaction instead of overtaking it.
CLAIM = """
SELECT seq, kind, key, payload, event_id, headers::text AS headers, created_at
FROM outbox WHERE published_at IS NULL ORDER BY seq LIMIT $1 FOR UPDATE
"""
MARK_PUBLISHED = "UPDATE outbox SET published_at = now() WHERE seq = ANY($1::bigint[])"
PURGE = """
DELETE FROM outbox WHERE seq IN (
    SELECT seq FROM outbox WHERE published_at < now() - make_interval(secs => $1) LIMIT 50000)
"""
BACKLOG = "SELECT count(*) FROM outbox WHERE published_at IS NULL"


class OutboxRelay:
    def __init__(self, settings: Settings, producer: AIOKafkaProducer | None = None):
        self.settings = settings
        self.producer = producer or kafka.producer(settings)
        self.topics = {"membership": settings.membership_topic, "segment": settings.segment_topic,
                       "result": settings.results_topic, "dlq": settings.dlq_topic}
        self.stopping = asyncio.Event()
        self.wake = asyncio.Event()
        self.published = 0

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    async def run(self) -> None:
        await self.producer.start()
        try:
            await leader.lead_while_holding(self.settings.database_url, leader.RELAY_LOCK, "relay", self.stopping,
                                            self.lead, metrics.RELAY_ACTIVE)
        finally:
            await self.producer.stop()  # flushes what is in flight
            log.info("relay stopped", extra={"published": self.published})

    async def lead(self, conn: asyncpg.Connection) -> None:
        await conn.add_listener("segmentation_outbox", lambda *_: self.wake.set())
        next_purge = next_backlog = 0.0
        while not self.stopping.is_set():
            self.wake.clear()
            sent = await self.publish_batch(conn)
            now = time.monotonic()
            if now >= next_backlog:
                metrics.OUTBOX_BACKLOG.set(await conn.fetchval(BACKLOG))
                next_backlog = now + 5
            if now >= next_purge and self.settings.outbox_retention_seconds:
                await conn.execute(PURGE, float(self.settings.outbox_retention_seconds))
                next_purge = now + 60
            if sent < self.settings.relay_batch_max:
                await leader.wait(self.wake, self.settings.relay_poll_seconds)  # NOTIFY, or the polling fallback

    async def publish_batch(self, conn: asyncpg.Connection) -> int:
        """Claim, publish and mark one batch; on any failure the transaction rolls back and rows stay."""
        async with conn.transaction():
            rows = await conn.fetch(CLAIM, self.settings.relay_batch_max)
            if not rows:
                return 0
            futures = []
            for r in rows:
                headers = [("event_id", r["event_id"].encode())]
                if r["headers"]:
                    headers += [(k, str(v).encode()) for k, v in json.loads(r["headers"]).items()]
                futures.append(await self.producer.send(
                    self.topics[r["kind"]], value=r["payload"], key=r["key"], headers=headers))
            await asyncio.gather(*futures)  # every row acknowledged before it is marked
            await conn.execute(MARK_PUBLISHED, [r["seq"] for r in rows])
        now = datetime.now(timezone.utc)
        for r in rows:
            metrics.PUBLISH_LATENCY.observe((now - r["created_at"]).total_seconds())
            metrics.OUTBOX_PUBLISHED.labels(r["kind"]).inc()
        self.published += len(rows)
        return len(rows)


async def main(settings: Settings) -> None:
    """`segmentation relay`: run until SIGTERM or Ctrl-C."""
    from service.runtime import run_until_signalled

    relay = OutboxRelay(settings)
    await run_until_signalled(relay.run(), relay.stop)
