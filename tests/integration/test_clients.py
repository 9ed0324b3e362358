"""Clients other than aiokafka against the service on the embedded broker: the rows of the README's compatibility
table that can be tried here (confluent-kafka, i.e. librdkafka). Its calls block, so they run in threads while the
worker and the relay run in this loop."""
import asyncio
import json
import time
import uuid

import pytest
from aiokafka.partitioner import DefaultPartitioner
from cloudevents.core.bindings.kafka import KafkaMessage, from_binary_event
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from schemas import CommandResult, CreateSegment, UpdateUserSegments
from tests.support.harness import Stack, cid
from tests.support.helpers import fast_settings, new_database, wait_until


@pytest.fixture(scope="module")
async def stack(pg_admin_url, template_db, broker_bootstrap):
    settings = fast_settings(await new_database(pg_admin_url), broker_bootstrap)
    async with Stack(settings) as s:
        yield s


def slug(name: str) -> str:
    return f"{name}_{uuid.uuid4().hex[:6]}"


async def produce(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]], **config) -> list[int]:
    """Publish (key, value) pairs with librdkafka; the partition each one landed on."""
    producer = Producer({"bootstrap.servers": bootstrap, **config})
    landed: dict[bytes, int] = {}

    def delivered(err, msg) -> None:
        assert err is None, err
        landed[msg.key()] = msg.partition()

    for key, value in messages:
        producer.produce(topic, value, key=key, on_delivery=delivered)
    assert await asyncio.to_thread(producer.flush, 30) == 0
    return [landed[key] for key, _ in messages]


async def consume(consumer: Consumer, found, timeout: float = 60.0):
    """Poll until `found(message)` is true; that message."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            msg = await asyncio.to_thread(consumer.poll, 0.5)
            if msg is not None and msg.error() is None and found(msg):
                return msg
        raise AssertionError(f"nothing found in {timeout} s")
    finally:
        await asyncio.to_thread(consumer.close)


async def test_confluent_kafka_with_murmur2_random_publishes_on_our_partitions_and_the_worker_applies_it(stack):
    s = slug("LIBRDKAFKA")
    await stack.request(CreateSegment(command_id=cid(), slug=s))
    commands = [UpdateUserSegments(command_id=cid(), user_id=user, add=[s]) for user in range(3001, 3013)]
    messages = [(str(c.user_id).encode(), c.model_dump_json().encode()) for c in commands]
    landed = await produce(stack.settings.kafka_bootstrap_servers, stack.settings.commands_topic, messages,
                           partitioner="murmur2_random")
    partitions = list(range(stack.settings.commands_partitions))
    assert landed == [DefaultPartitioner()(key, partitions, partitions) for key, _ in messages]  # aiokafka's pick
    results = await wait_until(lambda: _results(stack, commands), message="every result")
    assert [(r["status"], r["events"]) for r in results] == [("applied", 1)] * len(commands)


async def _results(stack, commands):
    found = [(stack.collector.results().get(c.command_id) or [None])[0] for c in commands]
    return found if None not in found else None


async def test_librdkafkas_default_partitioner_is_not_murmur2(stack):
    topic = f"scratch-{uuid.uuid4().hex[:8]}"
    bootstrap = stack.settings.kafka_bootstrap_servers
    admin = AdminClient({"bootstrap.servers": bootstrap})  # kept: its futures fail once it is collected
    await asyncio.to_thread(admin.create_topics([NewTopic(topic, 4, 1)])[topic].result, 30)
    messages = [(str(user).encode(), b"{}") for user in range(1000, 1032)]
    landed = await produce(bootstrap, topic, messages)  # consistent_random: CRC32 of the key
    ours = [DefaultPartitioner()(key, [0, 1, 2, 3], [0, 1, 2, 3]) for key, _ in messages]
    assert landed != ours and len(set(landed)) > 1


async def test_confluent_kafka_reads_events_with_assign_and_joins_a_group_with_a_short_session_timeout(stack):
    s = slug("LIBRDKAFKA_READ")
    await stack.request(CreateSegment(command_id=cid(), slug=s))
    result = await stack.request(UpdateUserSegments(command_id=cid(), user_id=3100, add=[s]))
    settings = stack.settings
    common = {"bootstrap.servers": settings.kafka_bootstrap_servers, "enable.auto.commit": False}
    assigned = Consumer(common | {"group.id": f"unused-{uuid.uuid4().hex[:8]}"})
    assigned.assign([TopicPartition(settings.membership_topic, p, OFFSET_BEGINNING)
                     for p in range(settings.events_partitions)])
    msg = await consume(assigned, lambda m: json.loads(m.value())["slug"] == s)
    event = from_binary_event(KafkaMessage(headers=dict(msg.headers()), key=msg.key(), value=msg.value()))
    assert (event.get_type(), event.get_subject()) == ("segmentation.membership-changed.v1", "3100")
    # The broker answers a group's first join after about half the session timeout (librdkafka's default: 45 s).
    grouped = Consumer(common | {"group.id": f"g-{uuid.uuid4().hex[:8]}", "auto.offset.reset": "earliest",
                                 "session.timeout.ms": 6000, "heartbeat.interval.ms": 500})
    grouped.subscribe([settings.results_topic])
    msg = await consume(grouped, lambda m: m.key() == result.command_id.encode())
    assert CommandResult.model_validate_json(msg.value()) == result
