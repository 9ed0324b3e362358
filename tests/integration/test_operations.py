"""Operations: metrics that move, the TTL producer's failover."""
import asyncio
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import aiohttp
import psutil
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import REGISTRY

from schemas import CreateSegment, UpdateUserSegments
from service.infra import db
from service.read.api import create_app
from tests.support.harness import FakeProducer, Stack, cid, read_all
from tests.support.helpers import ROOT, fast_settings, new_database, settings_env, wait_until


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_metrics_are_present_and_move(pg_admin_url, template_db, broker_bootstrap):
    settings = fast_settings(await new_database(pg_admin_url), broker_bootstrap)
    before = sample("segmentation_commands_total", type="UpdateUserSegments", status="applied")
    rejected = sample("segmentation_commands_total", type="UpdateUserSegments", status="rejected")
    batches = sample("segmentation_batch_size_count")
    published = sample("segmentation_outbox_published_total", kind="membership")
    async with Stack(settings) as stack:
        await stack.request(CreateSegment(command_id=cid(), slug="M"))
        for user in range(1, 4):
            await stack.request(UpdateUserSegments(command_id=cid(), user_id=user, add=["M"]))
        await stack.request(UpdateUserSegments(command_id=cid(), user_id=9, add=["NOPE"]))
        await wait_until(lambda: _grew("segmentation_outbox_published_total", published + 3, kind="membership"),
                         message="published events counted")
        client = TestClient(TestServer(create_app(settings)))
        await client.start_server()
        try:
            await client.get("/api/v1/users/1/segments")
            await client.get("/api/v1/users/x/segments")
            text = await (await client.get("/metrics")).text()
        finally:
            await client.close()
    assert sample("segmentation_commands_total", type="UpdateUserSegments", status="applied") == before + 3
    assert sample("segmentation_commands_total", type="UpdateUserSegments", status="rejected") == rejected + 1
    assert sample("segmentation_batch_size_count") > batches
    assert sample("segmentation_command_latency_seconds_count") > 0
    assert sample("segmentation_outbox_publish_latency_seconds_count") > 0
    for name in ("segmentation_http_requests_total", "segmentation_http_request_seconds_bucket",
                 "segmentation_outbox_backlog", "segmentation_ttl_lag_seconds"):
        assert name in text, name
    assert f'segmentation_consumer_lag{{partition="0",topic="{settings.commands_topic}"}}' in text
    assert 'route="/api/v1/users/{user_id}/segments"' in text and 'status="400"' in text


async def _grew(name, at_least, **labels):
    return sample(name, **labels) >= at_least


def start_ttl(settings) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "service.cli", "ttl"], env=settings_env(settings), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def active_ttl_pid(stack) -> int | None:
    rows = await stack.query(
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.objid = $1 AND l.granted", db.TTL_LOCK)
    return int(rows[0]["application_name"].rsplit("-", 1)[1]) if rows else None


async def test_ttl_producer_failover(pg_admin_url, template_db, broker_bootstrap):
    settings = fast_settings(await new_database(pg_admin_url), broker_bootstrap)
    async with Stack(settings) as stack:
        producers = [start_ttl(settings), start_ttl(settings)]
        try:
            await stack.request(CreateSegment(command_id=cid(), slug="T"))
            pid = await wait_until(lambda: active_ttl_pid(stack), message="an active TTL producer")
            active = next(p for p in producers if p.pid == pid)
            expires = datetime.now(UTC) + timedelta(seconds=10)
            for user in range(1, 6):
                added = await stack.request(UpdateUserSegments(
                    command_id=cid(), user_id=user, add=[{"slug": "T", "expires_at": expires.isoformat()}]))
                assert added.status == "applied"
            assert datetime.now(UTC) < expires  # the active one dies before the memberships are due
            active.send_signal(signal.SIGKILL)
            active.wait(10)

            async def expired():
                events = [e for e in stack.collector.membership_events() if e["reason"] == "expired"]
                return events if len({e["user_id"] for e in events}) == 5 else None

            events = await wait_until(expired, timeout=30, message="expiry after failover")
            assert all(e["slug"] == "T" and e["change"] == "removed" for e in events)
            new_pid = await active_ttl_pid(stack)
            assert new_pid is not None and new_pid != pid
        finally:
            for p in producers:
                if p.poll() is None:
                    p.terminate()
            for p in producers:
                p.wait(15)


async def test_postgres_outage_the_service_waits_and_goes_on(pg_admin_url, template_db, broker_bootstrap, tmp_path):
    from tests.support.faults import FaultProxy

    proxy = await FaultProxy.for_postgres(await new_database(pg_admin_url), tmp_path).start()
    settings = fast_settings(proxy.url, broker_bootstrap)
    api = TestClient(TestServer(create_app(settings)))
    await api.start_server()
    try:
        await _outage(settings, proxy, api)
    finally:
        await api.close()
        await proxy.stop()
    assert sample("segmentation_batch_retries_total") > 0


async def test_readyz_and_reads_answer_503_in_time_when_postgres_stops_answering(pg_admin_url, template_db,
                                                                                 broker_bootstrap, tmp_path):
    """The pool's connections cut, new ones accepted and never answered (a partition, a failover in progress): a
    checkout that must connect again is bounded like any other wait, so readyz says 503 within its second and a read
    within ACQUIRE_TIMEOUT, instead of hanging on asyncpg's 60 s connect."""
    from service.read import api as read_api
    from tests.support.faults import FaultProxy

    proxy = await FaultProxy.for_postgres(await new_database(pg_admin_url), tmp_path).start()
    settings = fast_settings(proxy.url, broker_bootstrap)
    client = TestClient(TestServer(create_app(settings)))
    await client.start_server()
    loop = asyncio.get_running_loop()
    try:
        assert (await client.get("/readyz")).status == 200
        await proxy.set_mode("reset")
        await proxy.set_mode("blackhole")
        started = loop.time()
        ready = await asyncio.wait_for(client.get("/readyz"), 15)
        assert ready.status == 503 and loop.time() - started < 3
        assert (await ready.json())["checks"]["postgres"].startswith("unreachable")
        started = loop.time()
        read = await asyncio.wait_for(client.get("/api/v1/users/7/segments"), 20)
        assert read.status == 503 and loop.time() - started < read_api.ACQUIRE_TIMEOUT + 3
        assert (await read.json())["error"]["code"] == "UNAVAILABLE"
    finally:
        await proxy.set_mode("pass")
        await client.close()
        await proxy.stop()


async def _outage(settings, proxy, api) -> None:
    async with Stack(settings) as stack:
        await stack.request(CreateSegment(command_id=cid(), slug="OUT"))
        assert (await api.get("/readyz")).status == 200
        await proxy.set_mode("refuse")
        ready = await api.get("/readyz")
        assert ready.status == 503 and (await ready.json())["checks"]["postgres"].startswith("unreachable")
        ids = [cid() for _ in range(20)]
        waiting = [await stack.client.expect(i) for i in ids]
        for n, command_id in enumerate(ids):
            await stack.client.send(UpdateUserSegments(command_id=command_id, user_id=100 + n, add=["OUT"]))
        await asyncio.sleep(3)  # the worker retries with backoff meanwhile; nothing can be applied
        assert not any(w.done() for w in waiting)
        await proxy.set_mode("pass")
        results = await asyncio.wait_for(asyncio.gather(*waiting), 60)
        assert all(r.status == "applied" and r.events == 1 for r in results)
        history = await stack.query("SELECT count(*) AS n FROM membership_history")
        assert history[0]["n"] == 20  # each applied once
        assert (await api.get("/readyz")).status == 200


async def test_an_expiry_the_broker_did_not_take_is_sent_again(conn, database_url):
    from aiokafka.errors import KafkaTimeoutError

    from producers.ttl import EXPIRIES, ORIGIN, TtlProducer
    from service.infra.settings import Settings
    from tests.support.batch import Feeder, create, update_user

    f = Feeder(conn)
    await f.apply(create("A"), update_user("u1", 1, add=[{"slug": "A", "ttl_seconds": 1}]))
    expires_at = await conn.fetchval("SELECT expires_at FROM memberships")
    ttl = TtlProducer(Settings(database_url=database_url), producer=FakeProducer(fail=True))
    now = expires_at + timedelta(seconds=1)
    try:
        await ttl.publish_due(conn, EXPIRIES, now, ORIGIN, {})
    except KafkaTimeoutError:
        pass  # the leader loop starts over
    ttl.producer.fail = False
    await ttl.publish_due(conn, EXPIRIES, now, ORIGIN, {})
    assert len(ttl.producer.sent) == 1


async def test_stored_offsets_beyond_a_recreated_topics_end_start_again_at_its_beginning(settings, conn, caplog):
    # The database remembers positions of an earlier incarnation of the commands topic (recreated, emptied).
    await conn.execute("INSERT INTO consumer_offsets (consumer_group, topic, partition, next_offset) "
                       "SELECT $1, $2, p, 1000 FROM generate_series(0, $3 - 1) p",
                       settings.consumer_group, settings.commands_topic, settings.commands_partitions)
    before = sample("segmentation_offset_resets_total", reason="beyond_log_end")
    async with Stack(settings) as stack:
        result = await stack.request(CreateSegment(command_id=cid(), slug="AFTER_RECREATE"), timeout=60)
    assert result.status == "applied"  # not skipped as "already applied"
    assert sample("segmentation_offset_resets_total", reason="beyond_log_end") >= before + 1
    assert any("beyond the end of the log" in r.getMessage() for r in caplog.records)


async def test_a_worker_taking_over_resumes_at_the_stored_offset_though_the_listed_end_is_short(settings, caplog):
    """The embedded broker lists a partition's end as its last producer batch's base offset + 1, short of the
    records that batch holds. A stored offset past that listed end is not a recreated topic: the log holds the
    record before it, so the next worker resumes there (it started again at the log's beginning and
    dead-lettered the bad commands a second time)."""
    before = sample("segmentation_offset_resets_total", reason="beyond_log_end")
    async with Stack(settings) as stack:
        producer = stack.client.producer
        batch = producer.create_batch()
        for i in range(10):
            batch.append(key=b"1", value=b"not json %d" % i, timestamp=None)
        batch.close()
        await (await producer.send_batch(batch, settings.commands_topic, partition=0))
        await wait_until(lambda: _stored_offset(stack, 0, 10), message="the batch applied")
        await wait_until(lambda: _grew_to(stack, settings.dlq_topic, 10), message="10 dead letters")
    async with Stack(settings) as stack:
        assert (await stack.request(CreateSegment(command_id=cid(), slug="RESUMED"), timeout=60)).status == "applied"
        assert await _stored_offset(stack, 0, 10)
    assert len(await read_all(settings, settings.dlq_topic)) == 10
    assert sample("segmentation_offset_resets_total", reason="beyond_log_end") == before
    assert not any("beyond the end of the log" in r.getMessage() for r in caplog.records)


async def _stored_offset(stack: Stack, partition: int, offset: int) -> bool:
    rows = await stack.query("SELECT next_offset FROM consumer_offsets WHERE consumer_group = $1 AND topic = $2 "
                             "AND partition = $3", stack.settings.consumer_group, stack.settings.commands_topic,
                             partition)
    return bool(rows) and rows[0]["next_offset"] == offset


async def _grew_to(stack: Stack, topic: str, n: int) -> bool:
    return len(stack.collector.values(topic)) >= n


async def test_api_processes_share_one_port_count_requests_together_and_are_started_again(settings, conn):
    """`segmentation api --processes 2`: both children bind the port (SO_REUSEPORT); /metrics of whichever
    answers sums the requests of both (prometheus_client's multiprocess mode); a child that dies is replaced."""
    from service.dev import embedded
    from tests.support.batch import Feeder, create, update_user

    await Feeder(conn).apply(create("P"), update_user("p1", 7, add=["P"]))
    port = embedded.free_port()
    parent = start_api(settings.model_copy(update={"http_port": port}), 2)
    base = f"http://127.0.0.1:{port}"

    async def api_pids() -> set[int]:
        rows = await conn.fetch("SELECT application_name FROM pg_stat_activity WHERE application_name ~ "
                                "'^segmentation-api-[0-9]+$' AND datname = current_database()")
        return {int(r["application_name"].rsplit("-", 1)[1]) for r in rows}

    async def children() -> set[int]:
        return {p.pid for p in psutil.Process(parent.pid).children() if p.status() != psutil.STATUS_ZOMBIE}

    async def answers(n: int) -> list[int]:
        statuses = []
        for _ in range(n):  # a connection each: the kernel spreads connections, not requests
            async with aiohttp.ClientSession() as session, session.get(f"{base}/api/v1/users/7/segments") as r:
                assert [s["slug"] for s in (await r.json())["segments"]] == ["P"]
                statuses.append(r.status)
        return statuses

    async def counted() -> float:
        async with aiohttp.ClientSession() as session, session.get(f"{base}/metrics") as r:
            text = await r.text()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("segmentation_http_requests_total{")
                   and 'route="/api/v1/users/{user_id}/segments"' in line)

    try:
        first = await wait_until(lambda: _two(children, None), message="two API children")
        assert await wait_until(lambda: _same(api_pids, first), message="both children connected")
        assert await answers(30) == [200] * 30
        assert [await counted() for _ in range(4)] == [30.0] * 4  # whichever process answers the scrape
        os.kill(dead := min(first), signal.SIGKILL)
        healed = await wait_until(lambda: _two(children, dead), timeout=30, message="the dead child replaced")
        assert max(first) in healed
        await wait_until(lambda: _same(api_pids, healed), message="the new child connected")
        assert await answers(10) == [200] * 10
        assert await counted() == 40.0  # the dead child's requests still counted
    finally:
        parent.terminate()
        assert parent.wait(30) == 0
    assert not any(psutil.pid_exists(pid) for pid in healed)


def start_api(settings, processes: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "service.cli", "api", "--processes", str(processes)], cwd=ROOT,
                            env=settings_env(settings))


async def _two(children, dead: int | None) -> set[int] | None:
    found = await children()
    return found if len(found) == 2 and dead not in found else None


async def _same(api_pids, pids: set[int]) -> bool:
    return await api_pids() == pids
