"""Topic creation that Kafka refuses, and `watch` on a dead-lettered tombstone."""
import asyncio
import sys

import pytest
from aiokafka.protocol.admin import CreateTopicsResponse_v3

from service.infra import kafka
from tests.support.helpers import ROOT, fast_settings, settings_env


async def test_create_topics_fails_when_kafka_refuses_a_topic(monkeypatch, broker_bootstrap, database_url):
    """Kafka answers a refused topic (no Create ACL, replication factor above the brokers) with an error code
    per topic in a normal response; aiokafka does not raise it."""
    s = fast_settings(database_url, broker_bootstrap, replication_factor=3)

    async def refuse(self, new_topics, timeout_ms=None, validate_only=False):
        return CreateTopicsResponse_v3(throttle_time_ms=0, topic_errors=[
            (t.name, 38, "Replication factor: 3 larger than available brokers: 1.") for t in new_topics])

    monkeypatch.setattr(kafka.AIOKafkaAdminClient, "create_topics", refuse)
    with pytest.raises(RuntimeError, match="error 38"):
        await kafka.create_topics(s)


async def test_watch_prints_a_dead_lettered_tombstone(settings):
    producer = kafka.producer(settings)
    await producer.start()
    try:
        await producer.send_and_wait(settings.dlq_topic, None, key=b"1000", headers=[("error.code", b"INVALID_JSON")])
    finally:
        await producer.stop()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service.cli", "watch", "--topic", "dlq", "--from-beginning", "--limit", "1",
        env=settings_env(settings), cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0 and b'"value": null' in out
