"""The command worker: batches from `getmany`, one PostgreSQL transaction each, Kafka commit after it."""
from __future__ import annotations

import asyncio
import logging
import time

import asyncpg
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, KafkaError

from service.infra import db, errors, kafka, metrics
from service.infra.settings import Settings
from service.write import sql
from service.write.batch import BatchProcessor, BatchReport
from service.write.decoding import InboundRecord

log = logging.getLogger("segmentation.worker")


_RESET_MESSAGES = {
    "beyond_log_end": "stored offset beyond the end of the log (topic recreated or truncated): "
                      "starting again at the log's beginning",
    "before_log_start": "stored offset before the start of the log: commands deleted by retention before "
                        "they were applied are lost; starting at the log's beginning",
}
# Alerts take increase() of this counter: its series exist at 0 from the start (one first seen at 1, a reset at the
# first assignment before any scrape, would never show an increase).
for _reason in _RESET_MESSAGES:
    metrics.OFFSET_RESETS.labels(_reason)


def start_position(stored: int, log_start: int, log_end: int) -> tuple[int, str | None]:
    """Where a partition's consumption starts: the offset stored with the effects, unless the log no longer has
    it. Beyond the log's end, the topic was recreated or truncated: its records are new commands, applied from
    its beginning (their ids still deduplicated by the inbox). Before the log's start, retention deleted
    commands that were never applied: they are lost, said loudly. The reason is None when nothing is wrong."""
    if stored > log_end:
        return log_start, "beyond_log_end"
    if stored < log_start:
        return log_start, "before_log_start"
    return stored, None


class _SeekToStoredOffsets(ConsumerRebalanceListener):
    """On assignment, start where PostgreSQL says; on revocation, let the batch in hand finish first."""

    def __init__(self, worker: CommandWorker):
        self.worker = worker

    async def on_partitions_revoked(self, revoked):
        self.worker.revoking = True
        async with self.worker.batch_lock:  # the batch in hand commits (or gives up) before we let go
            self.worker.revoking = False
        if revoked:
            for tp in revoked:  # no longer ours to report
                try:
                    metrics.CONSUMER_LAG.remove(tp.topic, str(tp.partition))
                except KeyError:
                    pass
            log.info("partitions revoked", extra={"partitions": sorted(tp.partition for tp in revoked)})

    async def on_partitions_assigned(self, assigned):
        if assigned:
            await self.worker.seek_to_stored(assigned)


class CommandWorker:
    def __init__(self, settings: Settings, pool: asyncpg.Pool, consumer: AIOKafkaConsumer | None = None):
        self.settings = settings
        self.pool = pool
        self.consumer = consumer or kafka.consumer(settings, group=settings.consumer_group)
        self.processor = BatchProcessor(settings.consumer_group, fan_out_slice=settings.fan_out_slice,
                                        fan_out_pass_seconds=settings.fan_out_pass_seconds,
                                        should_stop=lambda: self.revoking or self.stopping.is_set())
        self.retries_alone = settings.batch_retries_alone
        self.batch_lock = asyncio.Lock()
        self.revoking = False
        self.stopping = asyncio.Event()
        self.next_lag_update = 0.0

    async def seek_to_stored(self, assigned) -> None:
        """Seek each partition to the offset stored in PostgreSQL (see `start_position` when the log lost it)."""
        tps = sorted(assigned, key=lambda tp: tp.partition)
        group, topic = self.settings.consumer_group, self.settings.commands_topic
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(sql.READ_OFFSETS, group, topic, [tp.partition for tp in tps])
        stored = {r["partition"]: r["next_offset"] for r in rows}
        known = [tp for tp in tps if tp.partition in stored]
        starts = await self.consumer.beginning_offsets(known) if known else {}
        ends = await self.consumer.end_offsets(known) if known else {}
        if past := {tp: stored[tp.partition] - 1 for tp in known if stored[tp.partition] > ends[tp]}:
            for tp in await kafka.holding(self.settings, past):  # a listed end short of the log: nothing is wrong
                ends[tp] = stored[tp.partition]
        for tp in known:
            position, reason = start_position(stored[tp.partition], starts[tp], ends[tp])
            if reason is not None:
                metrics.OFFSET_RESETS.labels(reason).inc()
                log.error(_RESET_MESSAGES[reason], extra={
                    "partition": tp.partition, "stored_offset": stored[tp.partition], "log_start": starts[tp],
                    "log_end": ends[tp], "position": position})
                if reason == "beyond_log_end":  # else the batch would skip the new records as applied
                    async with self.pool.acquire() as conn:
                        await conn.execute(sql.RESET_OFFSET, group, topic, tp.partition, stored[tp.partition], position)
            self.consumer.seek(tp, position)
        log.info("partitions positioned at their stored offsets",
                 extra={"partitions": [tp.partition for tp in tps], "stored_offsets": stored})

    async def run(self) -> None:
        """Poll and apply until `stop()`; then leave the group."""
        self.consumer.subscribe([self.settings.commands_topic], listener=_SeekToStoredOffsets(self))
        await self.consumer.start()
        log.info("worker started", extra={"topic": self.settings.commands_topic, "group": self.settings.consumer_group})
        try:
            while not self.stopping.is_set():
                batch = await self.consumer.getmany(timeout_ms=self.settings.worker_poll_ms,
                                                    max_records=self.settings.worker_batch_max)
                if batch:
                    async with self.batch_lock:
                        await self.handle(batch)
                await self.update_lag()
        finally:
            await self.consumer.stop()  # leaves the group: the partitions move on at once
            log.info("worker stopped")

    def stop(self) -> None:
        self.stopping.set()

    async def handle(self, batch: dict) -> None:
        records = [
            InboundRecord(r.topic, r.partition, r.offset, r.key, r.value)
            for tp in sorted(batch, key=lambda tp: tp.partition) for r in batch[tp]
        ]
        started = time.monotonic()
        report = BatchReport()  # kept across retries: parts committed by a failed attempt are counted once
        complete = await self.apply_with_retry(records, report)
        for (kind, status), n in report.outcomes.items():
            metrics.COMMANDS.labels(kind, status).inc(n)
        metrics.DEAD_LETTERS.inc(report.dead_letters)
        if not complete:
            return
        if report.skipped:  # records below the stored offsets: a newer owner, or a log that was recreated
            await self.seek_to_stored(batch.keys())
        metrics.BATCH_SIZE.observe(len(records))
        metrics.BATCH_SECONDS.observe(time.monotonic() - started)
        now_ms = time.time() * 1000
        for recs in batch.values():
            metrics.COMMAND_LATENCY.observe(max(0.0, (now_ms - recs[-1].timestamp) / 1000))
        offsets = {tp: recs[-1].offset + 1 for tp, recs in batch.items()}
        try:
            await self.consumer.commit(offsets)  # after the database commit: lag stays visible to Kafka tools
        except (CommitFailedError, KafkaError) as exc:
            log.warning("kafka commit failed; PostgreSQL holds the offsets", extra={"error": str(exc)})
        first, last = records[0], records[-1]
        log.debug("batch applied", extra={"records": len(records), "from": first.position, "to": last.position,
                                          "skipped": report.skipped, "events": report.events})

    async def apply_with_retry(self, records: list[InboundRecord], report: BatchReport) -> bool:
        """Apply until it commits (True). Never skips: what failed is rolled back and the batch retried (its
        committed parts are skipped by offset). False: given up uncommitted because the partitions move.
        After `batch_retries_alone` failures that are not a connection loss, the batch is redone record by
        record: the one record that keeps failing is quarantined (see `next_step`) and the partition goes on."""
        delay = 0.1
        stuck = 0  # failures that may be a record's doing
        while True:
            try:
                async with self.pool.acquire() as conn:
                    await self.processor.process(conn, records, report, alone=stuck >= self.retries_alone)
                    return True
            except errors.RETRIED as exc:
                if not errors.is_connection_loss(exc):
                    stuck += 1
                metrics.BATCH_RETRIES.inc()
                log.warning("batch failed, retrying", extra={
                    "from": records[0].position, "to": records[-1].position, "error": repr(exc), "retry_in": delay})
                if self.revoking or self.stopping.is_set():
                    log.warning("giving the rest of the batch up: partitions are moving or the worker stops",
                                extra={"from": records[0].position})
                    return False
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def update_lag(self) -> None:
        """Records behind the end of each assigned partition, at most every few seconds."""
        now = time.monotonic()
        if now < self.next_lag_update:
            return
        self.next_lag_update = now + 5
        for tp in self.consumer.assignment():
            high = self.consumer.highwater(tp)
            if high is not None:
                position = await self.consumer.position(tp)
                metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(max(0, high - position))


async def main(settings: Settings) -> None:
    """`segmentation worker`: run until SIGTERM or Ctrl-C."""
    from service.infra.runtime import run_until_signalled

    await db.wait_for(settings.database_url)
    pool = await db.create_pool(settings, "worker", 1, 3)
    worker = CommandWorker(settings, pool)
    try:
        await run_until_signalled(worker.run(), worker.stop)
    finally:
        await pool.close()
