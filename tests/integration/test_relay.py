"""The outbox relay: order per key when a producer batch fails, no stall on a refused row or topic, shards shared
by relays, bounded waits."""
import asyncio
import json

from aiokafka.errors import MessageSizeTooLargeError, RequestTimedOutError, TopicAuthorizationFailedError
from aiokafka.producer import sender as aiokafka_sender
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from producers.relay import SHARDS, OutboxRelay, claim
from schemas.commands import CreateSegment
from service.infra import db, kafka, metrics
from tests.support.harness import Stack, cid, read_all
from tests.support.helpers import wait_until

N = 3000


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
    await wait_until(lambda: conn.fetchval("SELECT count(*) = 0 FROM outbox"), 60)
    relay.stop()
    await task

    seen, order = set(), []
    for r in await read_all(settings, settings.membership_topic):
        eid = _event_id(r)
        if eid not in seen:  # the README's consumer: deduplicate by event_id
            seen.add(eid)
            order.append(json.loads(r.value)["n"])
    assert len(order) == N
    assert order == sorted(order)  # after deduplication by event_id, the events of user 1 in order


async def test_a_refused_row_neither_floods_nor_stalls(conn, settings):
    # One ordinary event, then a dead letter the producer refuses (key + value + headers > max_request_size).
    await conn.execute("INSERT INTO outbox (kind, key, payload, event_id) VALUES ('membership', '1', '{\"n\": 1}', 'e1')")
    await conn.execute("""INSERT INTO outbox (kind, key, payload, event_id, headers)
        VALUES ('dlq', convert_to(repeat('k', 148600), 'UTF8'), convert_to(repeat('x', 900000), 'UTF8'), 'e2',
                '{"error.code": "INVALID_JSON", "error.message": "value is not JSON"}')""")
    relay = OutboxRelay(settings)
    task = asyncio.create_task(relay.run())
    await wait_until(lambda: conn.fetchval("SELECT count(*) = 0 FROM outbox"), 30,
                     message="both rows handled")
    await asyncio.sleep(1)  # a relay stuck in a loop would publish e1 again meanwhile
    relay.stop()
    await task
    got = len(await read_all(settings, settings.membership_topic))
    left = await conn.fetchval("SELECT count(*) FROM outbox")
    assert got == 1 and left == 0


LIMIT = 1048576  # aiokafka's default max_request_size (the relay does not change it)


async def test_an_oversized_dead_letter_does_not_stall_the_relay(settings):
    value = b"x" * 900_000                       # not JSON -> INVALID_JSON; exactly DLQ_MAX_BYTES, so not truncated
    key_len = LIMIT - DefaultRecordBatchBuilder.estimate_size_in_bytes(b"", value, []) - 100
    key = b"k" * key_len                         # the original record fits the limit with 100 bytes to spare
    async with Stack(settings) as stack:
        await stack.send_raw(value, key)         # accepted by the broker and consumed
        # Its dead letter is committed with the consumed offset (the relay deletes the outbox row once published).
        await wait_until(lambda: stack.query("SELECT 1 FROM consumer_offsets WHERE next_offset > 0"),
                         message="the dead letter written")
        # The dead letter is the same key and value plus ~250 bytes of headers: over the producer's limit.
        result = await stack.request(CreateSegment(command_id=cid(), slug="AFTER_POISON"), timeout=20)
        assert result.status == "applied"


async def _insert_row(conn, event_id: str) -> None:
    await conn.execute("INSERT INTO outbox (kind, key, payload, event_id) VALUES ('membership', '1', '{}', $1)",
                       event_id)
    await conn.execute("SELECT pg_notify('segmentation_outbox', '')")


async def _published(conn, event_id: str) -> bool:
    return not await conn.fetchval("SELECT count(*) FROM outbox WHERE event_id = $1", event_id)  # deleted once published


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


async def _shards_led(conn) -> list[int]:
    """Shards led per relay session, by backend pid order."""
    rows = await conn.fetch("SELECT pid, count(*) AS n FROM pg_locks WHERE locktype = 'advisory' AND granted "
                            "AND objsubid = 2 AND classid = $1 GROUP BY pid ORDER BY pid", db.RELAY_LOCK)
    return [r["n"] for r in rows]


async def test_relays_share_the_shards_and_a_survivor_takes_the_dead_ones(conn, settings):
    relays = [OutboxRelay(settings), OutboxRelay(settings)]
    tasks = [asyncio.create_task(r.run()) for r in relays]
    try:
        await wait_until(lambda: _even(conn), 15, message="the shards shared")
        await _insert_row(conn, "first")
        await wait_until(lambda: _published(conn, "first"), 10, message="a relay publishing")
        # One relay's session dies as if its process had: PostgreSQL drops its locks with the connection.
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2 "
            "AND classid = $1 LIMIT 1", db.RELAY_LOCK)
        # Rows of every shard, each key's in order.
        await conn.execute("""INSERT INTO outbox (kind, key, payload, event_id)
            SELECT 'membership', convert_to((g % 100)::text, 'UTF8'), convert_to(json_build_object('n', g)::text, 'UTF8'),
                   'e' || g FROM generate_series(1, 2000) g""")
        await wait_until(lambda: conn.fetchval("SELECT count(*) = 0 FROM outbox"), 30, message="every shard published")
    finally:
        for r in relays:
            r.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
    per_key: dict[bytes, list[int]] = {}
    for r in await consume(settings, settings.membership_topic, 2001, timeout=30):
        if r.key != b"1" or json.loads(r.value):  # skip the row "first"
            per_key.setdefault(r.key, []).append(json.loads(r.value)["n"])
    assert sum(len(v) for v in per_key.values()) >= 2000
    for numbers in per_key.values():
        firsts = list(dict.fromkeys(numbers))  # deduplicated, first delivery kept
        assert firsts == sorted(firsts)


async def _even(conn) -> bool:
    return await _shards_led(conn) == [SHARDS // 2, SHARDS // 2]


# --- faults the broker brings (issue 8) -------------------------------------------------------------------

async def consume(settings, topic: str, want: int, timeout: float) -> list:
    """Records of `topic` from the beginning until `want` have arrived; fails after `timeout` s."""
    consumer = kafka.consumer(settings, group=None, fetch_max_wait_ms=50)
    await consumer.start()
    try:
        await consumer.seek_to_beginning(*await kafka.assign_all(consumer, topic))
        records: list = []
        deadline = asyncio.get_running_loop().time() + timeout
        while len(records) < want:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{len(records)} of {want} records on {topic} after {timeout} s")
            batch = await consumer.getmany(timeout_ms=200)
            records += [r for recs in batch.values() for r in recs]
        return records
    finally:
        await consumer.stop()


def _event_id(record) -> str:
    return dict(record.headers)["event_id"].decode()


def broker_answers(monkeypatch, refuse) -> None:
    """The broker answers a batch with `refuse(topic_partition, batch)` (an exception, or None to accept it): what
    aiokafka's sender does with a produce response that carries a non-retriable error code."""
    original = aiokafka_sender.SendProduceReqHandler.do

    async def do(self, node_id):
        kept = {}
        for tp, batch in self._batches.items():
            error = refuse(tp, batch)
            if error is None:
                kept[tp] = batch
            else:
                batch.failure(exception=error)
        self._batches = kept  # the caller still unmutes every partition of the request
        if kept:
            return await original(self, node_id)

    monkeypatch.setattr(aiokafka_sender.SendProduceReqHandler, "do", do)


async def test_a_topic_the_broker_refuses_does_not_stall_the_other_topics(conn, settings, monkeypatch):
    refusing = {"on": True}
    broker_answers(monkeypatch, lambda tp, _: TopicAuthorizationFailedError(tp.topic)
                   if refusing["on"] and tp.topic == settings.dlq_topic else None)
    await conn.execute("INSERT INTO outbox (kind, key, payload, event_id) VALUES ('dlq', 'k', 'not json', 'd1')")
    await conn.execute("""INSERT INTO outbox (kind, key, payload, event_id)
        SELECT 'membership', convert_to(g::text, 'UTF8'), '{}', 'e' || g FROM generate_series(1, 20) g""")
    relay = OutboxRelay(settings)
    task = asyncio.create_task(relay.run())
    try:
        await wait_until(lambda: conn.fetchval("SELECT count(*) = 0 FROM outbox WHERE kind = 'membership'"), 30,
                         message="the other topics published and done")
        events = await consume(settings, settings.membership_topic, 20, timeout=30)
        assert {_event_id(r) for r in events} == {f"e{g}" for g in range(1, 21)}
        assert await conn.fetchval("SELECT count(*) FROM outbox WHERE kind = 'dlq'") == 1  # kept, not lost
        refusing["on"] = False  # permission granted: the held row goes out
        dead = await consume(settings, settings.dlq_topic, 1, timeout=90)
        assert _event_id(dead[0]) == "d1"
    finally:
        relay.stop()
        await task


async def test_a_row_over_the_topics_size_limit_is_dropped_alone(conn, settings, monkeypatch):
    limit = 100_000  # the topic's max.message.bytes, below the producer's batch size
    broker_answers(monkeypatch, lambda tp, batch: MessageSizeTooLargeError()
                   if len(batch.get_data_buffer()) > limit else None)
    await conn.execute("""INSERT INTO outbox (kind, key, payload, event_id)
        SELECT 'membership', '1', convert_to(repeat('x', CASE WHEN g = 2 THEN 150000 ELSE 10 END), 'UTF8'), 'e' || g
        FROM generate_series(1, 3) g""")
    dropped = metrics.OUTBOX_DROPPED._value.get()
    relay = OutboxRelay(settings)
    task = asyncio.create_task(relay.run())
    try:
        events = await consume(settings, settings.membership_topic, 2, timeout=30)
    finally:
        relay.stop()
        await task
    assert [_event_id(r) for r in events] == ["e1", "e3"]  # in order, the refused one left out
    assert metrics.OUTBOX_DROPPED._value.get() == dropped + 1


async def test_a_leader_that_cannot_publish_steps_down(conn, settings, monkeypatch):
    # The idempotent producer (the production setting) never expires a batch: a broker that takes the connection
    # but never answers leaves every send pending for ever. Here the first relay's sends hang like that.
    original, hung = aiokafka_sender.SendProduceReqHandler.do, set()

    async def do(self, node_id):
        if self._sender in hung:
            await asyncio.sleep(3600)
        return await original(self, node_id)

    monkeypatch.setattr(aiokafka_sender.SendProduceReqHandler, "do", do)
    settings = settings.model_copy(update={"publish_timeout_seconds": 3.0})
    first, standby = OutboxRelay(settings), OutboxRelay(settings)
    hung.add(first.producer._sender)
    tasks = [asyncio.create_task(first.run())]
    try:
        await wait_until(lambda: conn.fetchval(
            "SELECT count(*) > 0 FROM pg_locks WHERE locktype = 'advisory' AND granted"), 10, message="the first relay")
        tasks.append(asyncio.create_task(standby.run()))
        await conn.execute("""INSERT INTO outbox (kind, key, payload, event_id)
            SELECT 'membership', convert_to(g::text, 'UTF8'), '{}', 'e' || g FROM generate_series(1, 20) g""")
        events = await consume(settings, settings.membership_topic, 20, timeout=60)
        assert {_event_id(r) for r in events} >= {f"e{g}" for g in range(1, 21)}
    finally:
        first.stop()
        standby.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)  # stopping is bounded too


# --- what the relay reports for the alerts (deploy/prometheus/alerts.yml) ---------------------------------------

def _gauge(gauge) -> float:
    return gauge._value.get()


async def test_the_relay_reports_its_backlog_and_its_oldest_row_and_a_relay_that_stops_reports_none(
        conn, settings, monkeypatch):
    broker_answers(monkeypatch, lambda tp, _: TopicAuthorizationFailedError(tp.topic)
                   if tp.topic == settings.dlq_topic else None)
    await conn.execute("INSERT INTO outbox (kind, key, payload, event_id, created_at) "
                       "VALUES ('dlq', 'k', 'not json', 'd1', now() - interval '20 seconds')")
    relay = OutboxRelay(settings)
    task = asyncio.create_task(relay.run())
    try:
        async def reported() -> bool:
            return _gauge(metrics.OUTBOX_BACKLOG) == 1 and _gauge(metrics.OUTBOX_OLDEST) >= 20
        await wait_until(reported, 15, message="the refused row reported as waiting")
        assert _gauge(metrics.RELAY_SHARDS) == _gauge(metrics.OUTBOX_SHARDS) == SHARDS
    finally:
        relay.stop()
        await task
    # The row still waits, but no longer in shards this relay leads: what it said must not count any more.
    assert [_gauge(g) for g in (metrics.OUTBOX_BACKLOG, metrics.OUTBOX_OLDEST, metrics.RELAY_SHARDS)] == [0, 0, 0]


async def test_a_claim_reads_the_outbox_by_its_primary_key_though_its_plan_was_made_on_an_empty_table(conn, settings):
    """A queue table is often empty when the relay's claim is planned: a VACUUM of a drained outbox truncates it to
    0 pages, and a relay polls it idle. The plan made then (and kept: inserts do not invalidate it) read the whole
    outbox at each claim once a backlog came (a rollout's 100 000 events): the delete as a sequential scan comparing
    every row with each claimed seq, the oldest rows as a sort of the table. 0.3-1 s a claim of 5 000 under a
    100 000-row backlog, 10x the relay's CPU in `make bench` (found by a probe of a slow rollout)."""
    await conn.execute("""INSERT INTO outbox (kind, key, payload, event_id)
        SELECT 'membership', convert_to(g::text, 'UTF8'), '{}', 'e' || g FROM generate_series(1, 2000) g""")
    await conn.execute("DELETE FROM outbox")
    await conn.execute("VACUUM outbox")  # as autovacuum does: 0 pages

    scans = "SELECT seq_scan FROM pg_stat_xact_user_tables WHERE relname = 'outbox'"  # this backend's, not flushed

    async def claim_under(mode: str) -> tuple[list, int]:
        async with conn.transaction():
            await conn.execute(f"SET LOCAL plan_cache_mode = {mode}")  # whichever the server picks
            before = await conn.fetchval(scans)
            rows = await claim(conn, list(range(SHARDS)), ["membership"], 100)
            return rows, await conn.fetchval(scans) - before

    await claim_under("force_generic_plan")  # idle: the generic plan is made on the empty table, and cached
    await conn.execute("""INSERT INTO outbox (kind, key, payload, event_id)
        SELECT 'membership', convert_to(g::text, 'UTF8'), '{}', 'f' || g FROM generate_series(1, 20000) g""")
    claimed, seq_scans = [], 0
    for mode in ["force_generic_plan", "force_custom_plan"] * 2:
        rows, scanned = await claim_under(mode)
        claimed += rows
        seq_scans += scanned
    assert [r["event_id"] for r in sorted(claimed, key=lambda r: r["seq"])] == [f"f{g}" for g in range(1, 401)]
    assert seq_scans == 0
