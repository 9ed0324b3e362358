"""Dead letters read back and replayed (`segmentation dlq list|replay`).

A replay publishes each letter's original key and bytes to its `source.topic` with a `replayed-from` header. It
first reads every partition of the dead-letter topic to its end and only then publishes: letters that the replayed
messages produce again (still broken) do not exist yet while it reads, so a replay never loops on what it adds,
whatever the clocks of the hosts.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from service.infra import kafka
from service.infra.settings import Settings

REPLAYED_FROM = "replayed-from"
TRUNCATION_HEADERS = ("error.truncated", "error.key_truncated")


@dataclass(frozen=True)
class Letter:
    """One dead letter: where it sits, why it is there, and the original key and bytes."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, str]

    @property
    def position(self) -> str:
        return f"{self.topic}/{self.partition}@{self.offset}"

    @property
    def code(self) -> str | None:
        return self.headers.get("error.code")

    @property
    def truncated(self) -> bool:
        """Cut to fit the dead-letter topic: not the original any more, so never replayed."""
        return any(h in self.headers for h in TRUNCATION_HEADERS)

    def summary(self, width: int = 120) -> dict:
        """What `dlq list` prints: position, code, message, key and the start of the value."""
        value = None if self.value is None else self.value[:width].decode(errors="replace")
        return {"position": self.position, "code": self.code, "message": self.headers.get("error.message"),
                "key": None if self.key is None else self.key.decode(errors="replace"), "value": value,
                "truncated": self.truncated, "source_topic": self.headers.get("source.topic")}


async def letters(settings: Settings, code: str | None = None, limit: int = 0) -> AsyncIterator[Letter]:
    """The dead letters present now (each partition read until nothing more comes), oldest first per partition,
    those with error code `code` only if given, at most `limit` (0: all)."""
    consumer = kafka.consumer(settings, group=None)
    await consumer.start()
    try:
        tps = await kafka.assign_all(consumer, settings.dlq_topic)
        ends: dict[TopicPartition, int] = await consumer.end_offsets(tps)
        await consumer.seek_to_beginning(*tps)
        found = 0
        for tp in tps:  # partition by partition: a key's letters stay in their order
            consumer.pause(*tps)
            consumer.resume(tp)
            async for msg in _until_end(consumer, tp, ends[tp]):
                letter = Letter(msg.topic, msg.partition, msg.offset, msg.key, msg.value,
                                {k: v.decode(errors="replace") for k, v in msg.headers})
                if code is not None and letter.code != code:
                    continue
                yield letter
                found += 1
                if limit and found >= limit:
                    return
    finally:
        await consumer.stop()


async def _until_end(consumer: AIOKafkaConsumer, tp: TopicPartition, end: int) -> AsyncIterator[ConsumerRecord]:
    """The records of `tp` until none comes for 1 s past `end`: Tansu reports the base offset of the last batch
    plus one as the end, not its last offset plus one, so the end taken at the start is only a lower bound."""
    while True:
        batch = (await consumer.getmany(tp, timeout_ms=1000)).get(tp, [])
        if not batch and await consumer.position(tp) >= end:
            return
        for msg in batch:
            yield msg


@dataclass
class ReplayReport:
    """What a replay did (or, on a dry run, would do)."""

    sent: int = 0
    truncated: int = 0  # listed, not replayed
    no_source: int = 0  # without a source.topic header: nowhere to send it


async def replay(settings: Settings, code: str | None = None, limit: int = 0, dry_run: bool = False,
                 on_letter: Callable[[Letter], None] | None = None) -> ReplayReport:
    """Publish the dead letters again to their source topic, original key and bytes, with `replayed-from`."""
    report = ReplayReport()
    producer = None if dry_run else kafka.producer(settings)
    if producer is not None:
        await producer.start()
    try:
        pending: list[asyncio.Future] = []
        found = [letter async for letter in letters(settings, code, limit)]  # all read before the first send
        for letter in found:
            source = letter.headers.get("source.topic")
            if letter.truncated:
                report.truncated += 1
            elif not source:
                report.no_source += 1
            else:
                if producer is not None:
                    pending.append(await producer.send(
                        source, letter.value, key=letter.key,
                        headers=[(REPLAYED_FROM, letter.position.encode())]))
                report.sent += 1
            if on_letter is not None:
                on_letter(letter)
        await asyncio.gather(*pending)  # every send acknowledged before we say how many were sent
    finally:
        if producer is not None:
            await producer.stop()
    return report
