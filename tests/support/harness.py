"""A running service for integration tests: worker(s), relay and TTL producer in this event loop, plus a client
that publishes commands and collects everything the service publishes."""
from __future__ import annotations

import asyncio
import json
import uuid
from collections import defaultdict

from aiokafka.errors import KafkaTimeoutError
from aiokafka.structs import RecordMetadata

from consumers.worker import CommandWorker
from producers.client import SegmentationClient
from producers.relay import OutboxRelay
from producers.ttl import TtlProducer
from schemas import CommandResult
from service.infra import db, kafka
from service.infra.settings import Settings


class Collector:
    """Reads every output topic from the beginning into lists (value as JSON when it parses)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.messages: dict[str, list] = defaultdict(list)
        self.consumer = None
        self.task = None

    async def start(self) -> None:
        s = self.settings
        self.consumer = kafka.consumer(s, group=None)
        await self.consumer.start()
        tps = await kafka.assign_all(self.consumer, s.membership_topic, s.segment_topic, s.results_topic, s.dlq_topic)
        await self.consumer.seek_to_beginning(*tps)
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.consumer:
            try:
                value = json.loads(msg.value)
            except ValueError:
                value = msg.value
            self.messages[msg.topic].append((msg, value))

    async def stop(self) -> None:
        self.task.cancel()
        await self.consumer.stop()

    def values(self, topic: str) -> list:
        return [v for _, v in self.messages[topic]]

    def results(self) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = defaultdict(list)
        for v in self.values(self.settings.results_topic):
            out[v["command_id"]].append(v)
        return out

    def membership_events(self) -> list[dict]:
        return self.values(self.settings.membership_topic)


class Stack:
    """Worker(s) + relay + TTL producer as tasks, a command client and a collector."""

    def __init__(self, settings: Settings, workers: int = 1, ttl: bool = False):
        self.settings = settings
        self.n_workers = workers
        self.with_ttl = ttl
        self.tasks: list[asyncio.Task] = []
        self.workers: list[CommandWorker] = []
        self.stoppables = []

    async def __aenter__(self) -> Stack:
        s = self.settings
        await kafka.create_topics(s)
        self.pool = await db.create_pool(s, "test", 1, 4)
        for _ in range(self.n_workers):
            await self.add_worker()
        self.relay = OutboxRelay(s)
        self.stoppables.append(self.relay)
        self.tasks.append(asyncio.create_task(self.relay.run()))
        if self.with_ttl:
            self.ttl = TtlProducer(s)
            self.stoppables.append(self.ttl)
            self.tasks.append(asyncio.create_task(self.ttl.run()))
        self.client = SegmentationClient(s)
        await self.client.start()
        self.collector = Collector(s)
        await self.collector.start()
        return self

    async def add_worker(self) -> CommandWorker:
        w = CommandWorker(self.settings, self.pool)
        self.workers.append(w)
        self.stoppables.append(w)
        self.tasks.append(asyncio.create_task(w.run()))
        return w

    async def __aexit__(self, *exc) -> None:
        for s in self.stoppables:
            s.stop()
        await asyncio.wait_for(asyncio.gather(*self.tasks, return_exceptions=True), 30)
        await self.client.close()
        await self.collector.stop()
        await self.pool.close()

    async def request(self, command, timeout: float = 30.0) -> CommandResult:
        return await self.client.request(command, timeout)

    async def send_raw(self, value: bytes, key: bytes | None = b"1") -> None:
        await self.client.send_raw(value, key)

    async def query(self, sql: str, *args):
        async with self.pool.acquire() as conn:
            return await conn.fetch(sql, *args)


async def read_all(settings, topic: str) -> list:
    """Every record of `topic`, from the beginning until nothing more comes for 2 s."""
    consumer = kafka.consumer(settings, group=None)
    await consumer.start()
    try:
        await consumer.seek_to_beginning(*await kafka.assign_all(consumer, topic))
        records = []
        while batch := await consumer.getmany(timeout_ms=2000):
            records += [r for recs in batch.values() for r in recs]
        return records
    finally:
        await consumer.stop()


class FakeProducer:
    """Records what is sent in batches (one partition, offsets in order); every send fails while `fail` is set."""

    def __init__(self, fail: bool = False):
        self.fail, self.sent = fail, []

    async def partitions_for(self, topic):
        return {0}

    def create_batch(self):
        return _FakeBatch()

    async def send_batch(self, batch, topic, partition):
        fut = asyncio.get_running_loop().create_future()
        if self.fail:
            fut.set_exception(KafkaTimeoutError())
        else:
            fut.set_result(RecordMetadata(topic, partition, None, len(self.sent), -1, None, 0))
            self.sent += batch.values
        return fut


class _FakeBatch:
    def __init__(self):
        self.values = []

    def append(self, key, value, timestamp, headers):
        self.values.append(value)
        return True


def cid() -> str:
    return str(uuid.uuid4())
