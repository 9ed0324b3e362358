"""The outbox relay: order per key when a producer batch fails, no stall on a refused row, purge."""
import asyncio
import json

import asyncpg
from aiokafka.errors import RequestTimedOutError
from aiokafka.producer import sender as aiokafka_sender
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from producers.relay import OutboxRelay
from schemas.commands import CreateSegment
from service.infra import db, kafka
from tests.support.harness import Stack, cid
from tests.support.helpers import wait_until

N = 3000


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


async def test_a_failed_batch_does_not_reorder_a_users_events(conn, settings, monkeypatch):
    # 3 000 events of user 1 (about 3 MB: several producer batches of the same partition), in seq order.
    await conn.execute("""
        INSERT INTO outbox (kind, key, payload, event_id)
        SELECT 'membership', '1'::bytea, convert_to(json_build_object('n', g, 'pad', repeat('x', 1000))::text, 'UTF8'),
               'e' || g FROM generate_series(1, $1) g""", N)

    # What aiokafka does with a batch whose produce request timed out after the batch expired (request_timeout_ms,
    # idempotence off, the default): batch.failure() -- and the partition is unmuted, so the next batch goes out.
    original, calls = aiokafka_sender.SendProduceReqHandler.do, {"n": 0}

    async def do(self, node_id):
        calls["n"] += 1
        if calls["n"] == 1:
            for batch in self._batches.values():
                batch.failure(exception=RequestTimedOutError())
            return
        return await original(self, node_id)

    monkeypatch.setattr(aiokafka_sender.SendProduceReqHandler, "do", do)

    relay = OutboxRelay(settings)
    task = asyncio.create_task(relay.run())
    await wait_until(lambda: conn.fetchval("SELECT count(*) = 0 FROM outbox WHERE published_at IS NULL"), 60)
    relay.stop()
    await task

    seen, order = set(), []
    for r in await read_all(settings, settings.membership_topic):
        eid = dict(r.headers)["event_id"]
        if eid not in seen:  # the README's consumer: deduplicate by event_id
            seen.add(eid)
            order.append(json.loads(r.value)["n"])
    assert len(order) == N
    assert order == sorted(order)  # after deduplication by event_id, the events of user 1 in order


async def test_purge_keeps_up_with_published_rows(conn, settings):
    # 120 000 rows published two hours ago: far past the 1 h retention.
    await conn.execute("""
        INSERT INTO outbox (kind, key, payload, event_id, published_at)
        SELECT 'membership', 'k', 'v', g::text, now() - interval '2 hours' FROM generate_series(1, 120000) g""")
    relay = OutboxRelay(settings, producer=object())   # nothing unpublished: the producer is never used
    leader_conn = await asyncpg.connect(settings.database_url)
    try:
        task = asyncio.create_task(relay.lead(leader_conn))
        await wait_until(lambda: conn.fetchval("SELECT count(*) = 0 FROM outbox"), 30, message="the purge")
        relay.stop()
        await task
    finally:
        await leader_conn.close()
    left = await conn.fetchval("SELECT count(*) FROM outbox")
    assert left == 0


async def test_a_refused_row_neither_floods_nor_stalls(conn, settings):
    # One ordinary event, then a dead letter the producer refuses (key + value + headers > max_request_size).
    await conn.execute("INSERT INTO outbox (kind, key, payload, event_id) VALUES ('membership', '1', '{\"n\": 1}', 'e1')")
    await conn.execute("""INSERT INTO outbox (kind, key, payload, event_id, headers)
        VALUES ('dlq', convert_to(repeat('k', 148600), 'UTF8'), convert_to(repeat('x', 900000), 'UTF8'), 'e2',
                '{"error.code": "INVALID_JSON", "error.message": "value is not JSON"}')""")
    relay = OutboxRelay(settings)
    task = asyncio.create_task(relay.run())
    await wait_until(lambda: conn.fetchval("SELECT count(*) = 0 FROM outbox WHERE published_at IS NULL"), 30,
                     message="both rows handled")
    await asyncio.sleep(1)  # a relay stuck in a loop would publish e1 again meanwhile
    relay.stop()
    await task
    got = len(await read_all(settings, settings.membership_topic))
    unpublished = await conn.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL")
    assert got == 1 and unpublished == 0


LIMIT = 1048576  # aiokafka's default max_request_size (the relay does not change it)


async def test_an_oversized_dead_letter_does_not_stall_the_relay(settings):
    value = b"x" * 900_000                       # not JSON -> INVALID_JSON; exactly DLQ_MAX_BYTES, so not truncated
    key_len = LIMIT - DefaultRecordBatchBuilder.estimate_size_in_bytes(b"", value, []) - 100
    key = b"k" * key_len                         # the original record fits the limit with 100 bytes to spare
    async with Stack(settings) as stack:
        await stack.send_raw(value, key)         # accepted by the broker and consumed
        await wait_until(lambda: stack.query("SELECT 1 FROM outbox WHERE kind = 'dlq'"), message="the dead letter")
        # The dead letter is the same key and value plus ~250 bytes of headers: over the producer's limit.
        result = await stack.request(CreateSegment(command_id=cid(), slug="AFTER_POISON"), timeout=20)
        assert result["status"] == "applied"


async def _insert_row(conn, event_id: str) -> None:
    await conn.execute("INSERT INTO outbox (kind, key, payload, event_id) VALUES ('membership', '1', '{}', $1)",
                       event_id)
    await conn.execute("SELECT pg_notify('segmentation_outbox', '')")


async def _published(conn, event_id: str) -> bool:
    return await conn.fetchval("SELECT published_at IS NOT NULL FROM outbox WHERE event_id = $1", event_id)


async def test_notify_wakes_the_relay_long_before_its_polling_fallback(conn, settings):
    relay = OutboxRelay(settings.model_copy(update={"relay_poll_seconds": 60}))
    task = asyncio.create_task(relay.run())
    try:
        await wait_until(lambda: conn.fetchval(
            "SELECT count(*) > 0 FROM pg_stat_activity WHERE application_name LIKE 'segmentation-relay-%'"), 10)
        await asyncio.sleep(0.5)  # it has made its first pass and sleeps (up to 60 s) until woken
        await _insert_row(conn, "wake-me")
        await wait_until(lambda: _published(conn, "wake-me"), 5, message="the NOTIFY wake-up")
    finally:
        relay.stop()
        await task


async def test_a_standby_relay_takes_over_when_the_active_one_dies(conn, settings):
    relays = [OutboxRelay(settings), OutboxRelay(settings)]
    tasks = [asyncio.create_task(r.run()) for r in relays]
    try:
        await _insert_row(conn, "first")
        await wait_until(lambda: _published(conn, "first"), 10, message="the active relay")
        # The active one's session dies as if its process had: PostgreSQL drops the lock with the connection.
        await conn.execute(
            "SELECT pg_terminate_backend(l.pid) FROM pg_locks l WHERE l.locktype = 'advisory' AND l.objid = $1 "
            "AND l.granted", db.RELAY_LOCK)
        await _insert_row(conn, "second")
        await wait_until(lambda: _published(conn, "second"), 15, message="the standby taking over")
    finally:
        for r in relays:
            r.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
