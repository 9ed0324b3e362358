"""A running service for integration tests: worker(s), relay and TTL producer in this event loop, plus a client
that publishes commands and collects everything the service publishes."""
from __future__ import annotations

import asyncio
import json
import uuid
from collections import defaultdict

from aiokafka.errors import KafkaError, KafkaTimeoutError
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
        self.errors: list[Exception] = []  # what interrupted the reading, which went on

    async def start(self) -> None:
        s = self.settings
        self.consumer = kafka.consumer(s, group=None)
        await self.consumer.start()
        tps = await kafka.assign_all(self.consumer, s.membership_topic, s.segment_topic, s.results_topic, s.dlq_topic)
        await self.consumer.seek_to_beginning(*tps)
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            try:
                async for msg in self.consumer:
                    self.messages[msg.topic].append((msg, decoded(msg)))
            except KafkaError as exc:  # the broker went away (a chaos fault): read on where it stopped
                self.errors.append(exc)
                await asyncio.sleep(0.5)

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


def decoded(msg):
    """A record's value as JSON, or its bytes when it does not parse."""
    try:
        return json.loads(msg.value)
    except ValueError:
        return msg.value


async def read_to_end(settings, *topics: str, quiet: float = 1.0, timeout: float = 120.0) -> dict[str, list]:
    """Every record of `topics`, read afresh from the beginning by a new consumer until each partition is past the
    end listed at the start and nothing more comes for `quiet` seconds (on the embedded broker that end is only a
    lower bound: see `producers.dlq._until_end`): (record, value) pairs per topic, in partition and offset order
    (the value as `Collector` decodes it). For topics nobody writes any more."""
    consumer = kafka.consumer(settings, group=None)
    await consumer.start()
    try:
        tps = await kafka.assign_all(consumer, *topics)
        ends = await consumer.end_offsets(tps)
        await consumer.seek_to_beginning(*tps)
        by_partition: dict = defaultdict(list)
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            batch = await consumer.getmany(*tps, timeout_ms=int(quiet * 1000))
            for tp, records in batch.items():
                by_partition[tp] += records
            if not batch and not [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
                break
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"{topics} not read to their ends {ends} in {timeout} s")
        out: dict[str, list] = {topic: [] for topic in topics}
        for tp in tps:
            out[tp.topic] += [(r, decoded(r)) for r in by_partition[tp]]
        return out
    finally:
        await consumer.stop()


async def read_all(settings, topic: str) -> list:
    """Every record of `topic`, from the beginning until nothing more comes for 2 s."""
    return [record for record, _ in (await read_to_end(settings, topic, quiet=2.0))[topic]]


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
