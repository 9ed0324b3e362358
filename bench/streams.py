"""Bench helpers on top of Kafka: tail a topic from its end, publish a burst of commands and wait for their results."""
from __future__ import annotations

import asyncio
import json
import time

from aiokafka import AIOKafkaConsumer
from common import dumps

from service.infra import kafka

# The bench consumer's own fetch wait: small, so that what is measured is the service, not the bench's polling.
FETCH_WAIT_MS = 20


async def tail(settings, topic: str) -> AIOKafkaConsumer:
    """A group-less consumer of every partition of `topic`, positioned at its end: it sees only what comes next."""
    consumer = kafka.consumer(settings, group=None, fetch_max_wait_ms=FETCH_WAIT_MS)
    await consumer.start()
    await kafka.seek_to_end_now(consumer, await kafka.assign_all(consumer, topic))
    return consumer


async def run_commands(settings, commands: list[tuple[bytes, dict]], timeout: float = 240.0
                       ) -> tuple[dict[str, dict], float, float]:
    """Publish (key, command) pairs in one burst; wait until every result is out. Returns the results by command id,
    and the perf_counter() of the first publish (clients already connected) and of the last result's arrival."""
    results = await tail(settings, settings.results_topic)
    producer = kafka.producer(settings, linger_ms=20 if len(commands) > 1 else 0)
    await producer.start()
    wanted = {c["command_id"] for _, c in commands}
    got: dict[str, dict] = {}
    timing: list[float] = []

    async def collect() -> None:
        while wanted:
            for recs in (await results.getmany(timeout_ms=200, max_records=10_000)).values():
                for r in recs:
                    result = json.loads(r.value)
                    if result["command_id"] in wanted:
                        wanted.discard(result["command_id"])
                        got[result["command_id"]] = result
        timing.append(time.perf_counter())

    try:
        collector = asyncio.create_task(collect())
        sent_at = time.perf_counter()
        for key, command in commands:
            await producer.send(settings.commands_topic, dumps(command), key=key)
        await producer.flush()
        await asyncio.wait_for(collector, timeout)
    finally:
        await producer.stop()
        await results.stop()
    rejected = [r for r in got.values() if r["status"] != "applied"]
    if rejected:
        raise RuntimeError(f"{len(rejected)} commands rejected, e.g. {rejected[0]}")
    return got, sent_at, timing[-1]
