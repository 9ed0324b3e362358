"""Processes that lead under PostgreSQL advisory locks (the relay, the TTL producer); standbys take over when the
leader dies or steps down. Every wait on the broker is bounded: a leader that cannot publish steps down."""
from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from prometheus_client import Gauge

from producers import sql
from service.infra import errors, kafka
from service.infra.settings import Settings

log = logging.getLogger("segmentation.leader")

# The lock lives as long as the connection. If the leader's host vanishes, PostgreSQL notices through TCP
# keepalive (ignored on Unix sockets) and frees the lock; a leader cut off notices through the command timeout.
KEEPALIVE = {"tcp_keepalives_idle": "10", "tcp_keepalives_interval": "5", "tcp_keepalives_count": "3",
             "tcp_user_timeout": "30000"}
COMMAND_TIMEOUT = 60.0

# After failing to publish, a leader stays away longer than a standby takes to notice the free lock.
STEP_DOWN_SECONDS = 5.0
# Stopping a producer flushes what it holds; a producer whose broker never answers would wait for ever.
PRODUCER_STOP_SECONDS = 5.0


class PublishStalled(KafkaError):
    """The broker did not acknowledge a send within the bound (unreachable, or answering nothing)."""

    retriable = True


async def acquire(url: str, try_lock: str, lock_id: int, name: str, stopping: asyncio.Event,
                  retry_seconds: float = 1.0) -> asyncpg.Connection | None:
    """Connect and wait until `try_lock` (a pg_try_advisory_lock* call) succeeds; the connection holds the lock
    until closed. None if stopping."""
    announced = False
    while not stopping.is_set():
        conn = None
        try:
            conn = await asyncpg.connect(url, timeout=10, command_timeout=COMMAND_TIMEOUT, server_settings={
                "application_name": f"segmentation-{name.replace(' ', '-')}-{os.getpid()}", **KEEPALIVE})
            while not stopping.is_set():
                if await conn.fetchval(try_lock, lock_id):
                    log.info(f"{name} is active", extra={"lock": lock_id})
                    return conn
                if not announced:
                    log.info(f"{name} is on standby: another instance holds the lock", extra={"lock": lock_id})
                    announced = True
                await wait(stopping, retry_seconds)
        except errors.DATABASE_FAILURE as exc:
            log.warning(f"{name}: cannot reach PostgreSQL", extra={"error": repr(exc)})
            await wait(stopping, retry_seconds)
        if conn is not None:
            await conn.close()
    return None


async def wait(event: asyncio.Event, seconds: float) -> None:
    """Wait for `event` at most `seconds`."""
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        pass


async def settle(futures: Iterable[asyncio.Future], timeout: float) -> list:
    """Wait at most `timeout` s for every send; the outcome of each (its result or its exception), in order.
    Raises PublishStalled if one is still pending: with the idempotent producer aiokafka never expires a batch."""
    futures = list(futures)
    if not futures:
        return []
    _, pending = await asyncio.wait(futures, timeout=timeout)
    if pending:
        raise PublishStalled(f"{len(pending)} of {len(futures)} sends not acknowledged within {timeout} s")
    return [f.exception() or f.result() for f in futures]


async def close_producer(producer: AIOKafkaProducer) -> None:
    """Stop a producer, giving up on what its broker does not take within PRODUCER_STOP_SECONDS."""
    try:
        await asyncio.wait_for(producer.stop(), PRODUCER_STOP_SECONDS)
    except TimeoutError:
        # aiokafka has no way to abandon pending batches: end its sender task and its connections by hand.
        sender = getattr(producer, "_sender", None)
        if sender is not None and sender.sender_task is not None:
            sender.sender_task.cancel()
        await producer.client.close()
        log.warning("producer stopped with sends the broker never acknowledged (the outbox keeps their rows)")


class Message(Protocol):
    """What goes into a producer batch."""

    @property
    def key(self) -> bytes | None: ...
    @property
    def payload(self) -> bytes | None: ...
    @property
    def headers(self) -> list[tuple[str, bytes]]: ...


M = TypeVar("M", bound=Message)


@dataclass
class Partition(Generic[M]):
    """The messages bound for one topic partition, in order; `single`: one per batch (after a size refusal)."""

    topic: str
    number: int
    rows: deque[M] = field(default_factory=deque)
    single: bool = False


def partition_of(key: bytes | None, numbers: list[int]) -> int:
    """The partition aiokafka's default partitioner (murmur2, the Java client's) picks for `key` among `numbers`
    (the topic's partitions, sorted); a message without a key goes to the first."""
    return numbers[(kafka.murmur2(key) & 0x7FFFFFFF) % len(numbers)] if key is not None else numbers[0]


# What a round's sends came to: each partition, the messages of its batch, and the batch's outcome (its
# RecordMetadata, whose offset is the first message's, or the exception).
Round = list[tuple[Partition, list, Any]]


class LeaderLoop:
    """A process that works while it holds its lock (the relay, the TTL producer): a Kafka producer, `lead(conn)`
    while the lock is held. Subclasses set LOCK, NAME and ACTIVE and write `lead`; TRY_LOCK may take it shared.

    A failure starts over with a new connection (the lock is released). A leader whose sends are not acknowledged
    within `publish_timeout_seconds` steps down: it releases the lock, replaces its producer (whose pending sends
    may never complete) and stays away STEP_DOWN_SECONDS, so a standby with a working path to Kafka takes over."""

    LOCK: int
    NAME: str
    ACTIVE: Gauge
    TRY_LOCK = sql.TRY_LOCK

    def __init__(self, settings: Settings, producer: AIOKafkaProducer | None = None):
        self.settings = settings
        self.own_producer = producer is None
        self.producer = producer or kafka.producer(settings)
        self.stopping = asyncio.Event()
        self.wake = asyncio.Event()
        self.published = 0

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    async def settle(self, futures: Iterable[asyncio.Future]) -> list:
        """The outcomes of `futures`, waited for at most the publish timeout (see `settle`)."""
        return await settle(futures, self.settings.publish_timeout_seconds)

    async def acknowledged(self, futures: Iterable[asyncio.Future]) -> list:
        """Wait for every send (bounded); raise the first failure, else return what the broker answered."""
        outcomes = await self.settle(futures)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return outcomes

    async def send_rounds(self, partitions: Iterable[Partition[M]], settled: Callable[[Round], None],
                          unsendable: Callable[[M], None]) -> None:
        """Send in rounds of one producer batch per partition, each round acknowledged (bounded) before the next: a
        partition never has two batches in flight, so a failed batch cannot be overtaken (without the idempotent
        producer Kafka would not keep them in order). `settled` takes each round's outcomes (it may put messages
        back at the head of their partition, or raise); `unsendable` a message larger than a whole batch."""
        waiting = list(partitions)
        while waiting:
            sends = []
            for part in waiting:
                batch, taken = self.producer.create_batch(), list[M]()
                while part.rows and not (part.single and taken):
                    r = part.rows[0]
                    if batch.append(key=r.key, value=r.payload, timestamp=None, headers=r.headers) is None:
                        break
                    taken.append(part.rows.popleft())
                if not taken:  # larger than a whole producer batch: no broker would take it either
                    unsendable(part.rows.popleft())
                    continue
                sends.append((part, taken, await self.producer.send_batch(batch, part.topic, partition=part.number)))
            outcomes = await self.settle(future for *_, future in sends)
            settled([(part, taken, outcome) for (part, taken, _), outcome in zip(sends, outcomes, strict=True)])
            waiting = [p for p in waiting if p.rows]

    async def run(self) -> None:
        await self.producer.start()
        try:
            while not self.stopping.is_set():
                conn = await acquire(self.settings.database_url, self.TRY_LOCK, self.LOCK, self.NAME, self.stopping)
                if conn is None:
                    return
                pause = 0.5
                self.ACTIVE.set(1)
                try:
                    await self.lead(conn)
                except PublishStalled as exc:
                    log.error(f"{self.NAME} cannot publish; stepping down", extra={"error": str(exc)})
                    pause = STEP_DOWN_SECONDS
                except (*errors.DATABASE_FAILURE, KafkaError) as exc:
                    log.warning(f"{self.NAME} lost its footing; starting over", extra={"error": repr(exc)})
                finally:
                    self.ACTIVE.set(0)
                    if not conn.is_closed():
                        await conn.close()  # releases the lock
                await wait(self.stopping, pause)
                if pause == STEP_DOWN_SECONDS and self.own_producer:
                    await self.renew_producer()
        finally:
            await close_producer(self.producer)  # flushes what is in flight, within a bound
            log.info(f"{self.NAME} stopped", extra={"published": self.published})

    async def renew_producer(self) -> None:
        """A fresh producer instead of one whose sends may never complete; retried until the broker answers."""
        await close_producer(self.producer)
        while True:
            self.producer = kafka.producer(self.settings)
            try:
                await self.producer.start()
                return
            except KafkaError as exc:
                await close_producer(self.producer)
                log.warning(f"{self.NAME}: cannot reach Kafka", extra={"error": repr(exc)})
                if self.stopping.is_set():
                    return
                await wait(self.stopping, STEP_DOWN_SECONDS)

    async def lead(self, conn: asyncpg.Connection) -> None:
        raise NotImplementedError
