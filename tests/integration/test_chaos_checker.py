"""The chaos checker's own reading of the topics (tests/chaos/invariants.py): it judges what a new consumer reads
from the beginning, and counts what the load's live reader missed (the embedded broker's live tail can skip a
record while several producers write one partition)."""
import json

from service.infra import kafka
from tests.chaos.invariants import missed
from tests.support.harness import Collector, read_to_end
from tests.support.helpers import wait_until


async def test_a_fresh_read_has_every_record_up_to_the_ends_in_offset_order_and_counts_what_the_live_reader_lacks(
        settings):
    producer = kafka.producer(settings)
    await producer.start()
    collector = Collector(settings)
    await collector.start()
    try:
        for n in range(40):
            await producer.send(settings.results_topic, json.dumps({"n": n}).encode(), key=str(n % 5).encode())
        await producer.send(settings.dlq_topic, b"not json", key=b"1")
        await producer.flush()

        async def all_live() -> bool:
            return len(collector.values(settings.results_topic)) == 40

        await wait_until(all_live, timeout=30, interval=0.1, message="the live reader got all 40")

        fresh = await read_to_end(settings, settings.results_topic, settings.dlq_topic)

        assert sorted(v["n"] for _, v in fresh[settings.results_topic]) == list(range(40))
        assert [v for _, v in fresh[settings.dlq_topic]] == [b"not json"]
        for records in fresh.values():
            keys = [(m.partition, m.offset) for m, _ in records]
            assert keys == sorted(keys)
        assert missed(collector.messages, fresh) == []
        skipped = collector.messages[settings.results_topic].pop(7)[0]  # as the broker's live tail did
        assert missed(collector.messages, fresh) == [(skipped.topic, skipped.partition, skipped.offset)]
    finally:
        await collector.stop()
        await producer.stop()


async def test_a_fresh_read_of_empty_topics_returns_at_once(settings):
    assert await read_to_end(settings, settings.membership_topic, settings.segment_topic, timeout=10) == {
        settings.membership_topic: [], settings.segment_topic: []}
