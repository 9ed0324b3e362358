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


async def _send_members(settings, ids_file, **env) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service.cli", "send", "update-segment-members", "S", "--add-file", str(ids_file),
        "--no-wait", env=settings_env(settings) | env, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode, err.decode()


async def test_the_cli_sends_a_contract_sized_bulk_and_names_the_size_of_one_too_large(settings, tmp_path):
    """100 000 ten-digit ids are about 1.1 MB: over aiokafka's default 1 MiB request, which applies to the
    uncompressed size."""
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join(str(1_000_000_000 + i) for i in range(100_000)))
    code, err = await _send_members(settings, ids)
    assert code == 0, err
    code, err = await _send_members(settings, ids, KAFKA_MAX_REQUEST_SIZE="1000000")
    assert code == 2 and "too large" in err and "KAFKA_MAX_REQUEST_SIZE" in err and "cannot reach" not in err, err


async def test_the_commands_and_dlq_topics_accept_the_producers_largest_request(settings):
    configs = kafka.topic_configs(settings)
    for topic in (settings.commands_topic, settings.dlq_topic):
        assert configs[topic] == {"max.message.bytes": str(settings.kafka_max_request_size)}
