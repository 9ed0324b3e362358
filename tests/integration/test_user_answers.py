"""Answers kept in the API's memory (service/read/answers.py) against a real PostgreSQL: every kind of write drops
them at once (migration 012's triggers), and no fault of the listener serves a stale one."""
import asyncio
import time

import asyncpg
import pytest

from service.infra.settings import Settings
from service.read import api, views, waiters
from service.read.answers import LIVENESS_SECONDS, UserAnswers
from service.read.waiters import APPLICATION_NAME
from tests.support.batch import Feeder, create, update_user
from tests.support.helpers import api_client, wait_until

FRESH_WITHIN = 1.0  # the contract's freshness bound; a notification takes milliseconds


@pytest.fixture
async def http(database_url):
    async with api_client(Settings(database_url=database_url)) as client:
        await wait_until(lambda: _listening(client), message="the listener")
        yield client


async def _listening(http) -> bool:
    return http.server.app[api.WAITERS].listening.is_set()


def kept(http):
    return http.server.app[api.ANSWERS]


async def served_from_memory(http, user_id: int, monkeypatch) -> bool:
    """Whether the API answers `user_id` without a query (one would raise)."""
    async def no_query(*_):
        raise AssertionError("queried")

    with monkeypatch.context() as m:
        m.setattr(views, "user_segments", no_query)
        resp = await http.get(f"/api/v1/users/{user_id}/segments")
    return resp.status == 200


async def body(http, user_id: int) -> bytes:
    resp = await http.get(f"/api/v1/users/{user_id}/segments")
    assert resp.status == 200, await resp.text()
    return await resp.read()


async def truth(conn, user_id: int) -> bytes:
    """The answer straight from the database, as the API writes it."""
    return api.user_segments_body(user_id, await views.user_segments(conn, user_id))


async def answers_agree(http, conn, users) -> None:
    async def agree():
        return all([await body(http, u) == await truth(conn, u) for u in users])
    await wait_until(agree, timeout=FRESH_WITHIN, interval=0.01, message="the API's answers equal the database's")


async def test_every_kind_of_write_drops_the_kept_answers_it_changes(conn, http, monkeypatch):
    f = Feeder(conn)
    users = [5, 7, 8, 9]  # 5 is in no command: its rollouts are computed, never stored
    steps = [
        [create("A"), create("B"), create("R", percent=100)],
        [update_user("add", 7, add=["A", "B"])],  # inserts
        [update_user("ttl", 7, add=[{"slug": "A", "ttl_seconds": 3600}])],  # an upsert that updates
        [update_user("exclude", 8, remove=["R"])],  # an exclusion
        [update_user("include", 8, add=["R"])],  # the exclusion deleted, an explicit member
        [update_user("remove", 7, remove=["B"])],  # a delete
        [{"type": "UpdateSegmentMembers", "command_id": "bulk", "slug": "B", "add": [9]}],
        [{"type": "UpdateSegment", "command_id": "percent", "slug": "R", "auto_percent": 0}],  # a segment: everyone
        [{"type": "DeleteSegment", "command_id": "delete", "slug": "A"}],
    ]
    changed_by = []
    for i, step in enumerate(steps):
        await answers_agree(http, conn, users)
        for u in users:
            assert await served_from_memory(http, u, monkeypatch), f"step {i}: {u} read from memory before it"
        before = {u: await body(http, u) for u in users}
        await f.apply(*step)
        await answers_agree(http, conn, users)
        changed_by.append({u for u in users if await body(http, u) != before[u]})
        assert changed_by[-1] or i == 0, f"step {i} changed nobody's answer: it tests nothing"
    assert 5 in changed_by[7]  # the percent's: only the trigger on segments could drop 5's answer


async def test_a_user_not_named_keeps_its_answer_in_memory(conn, http, monkeypatch):
    f = Feeder(conn)
    await f.apply(create("A"), update_user("seven", 7, add=["A"]), update_user("eight", 8, add=["A"]))
    await answers_agree(http, conn, [7, 8])
    await f.apply(update_user("seven-out", 7, remove=["A"]))
    await wait_until(lambda: _dropped(http, 7), timeout=FRESH_WITHIN, interval=0.01, message="7's answer dropped")
    assert await served_from_memory(http, 8, monkeypatch)


async def _dropped(http, user_id: int) -> bool:
    return user_id not in kept(http).entries


async def test_a_statement_of_more_than_ten_thousand_rows_drops_every_answer(conn, http, monkeypatch):
    """Named, 10 001 users would take 34 notifications; one '*' drops everyone's, the users not named too."""
    f = Feeder(conn)
    await f.apply(create("A"), create("B"), update_user("seven", 7, add=["A"]))
    segment_id = await conn.fetchval("SELECT id FROM segments WHERE slug = 'B'")
    bulk = "INSERT INTO memberships (user_id, segment_id, source, added_at) " \
           "SELECT u, $1, 'manual', now() FROM generate_series($2::bigint, $3::bigint) u"
    await answers_agree(http, conn, [7])
    await conn.execute(bulk, segment_id, 100_000, 100_009)  # 10 rows: 7 keeps its answer
    await wait_until(lambda: _dropped(http, 100_000), timeout=FRESH_WITHIN, message="a named user dropped")
    await body(http, 100_000)  # kept again
    assert await served_from_memory(http, 7, monkeypatch)
    await conn.execute(bulk, segment_id, 200_000, 210_000)  # 10 001 rows
    await wait_until(lambda: _dropped(http, 7), timeout=FRESH_WITHIN, message="everyone's dropped")
    assert not kept(http).entries


async def test_an_after_request_that_waited_reads_the_database_not_memory(conn, http, monkeypatch):
    """Its command's commit is visible a moment before its notifications are sent: memory may still hold the
    answer from before when the waiter wakes. Here the users' notification is held back for good."""
    f = Feeder(conn)
    await f.apply(create("A"), update_user("in", 7, add=["A"]))
    await answers_agree(http, conn, [7])
    monkeypatch.setattr(UserAnswers, "changed", lambda self, payload: None)  # the users' notification not there yet
    request = asyncio.create_task(http.get("/api/v1/users/7/segments", params={"after": "out", "wait_ms": "5000"}))
    await wait_until(lambda: _waiting(http, "out"), message="the request waiting")
    await f.apply(update_user("out", 7, remove=["A"]))
    resp = await request
    assert resp.status == 200 and await resp.read() == await truth(conn, 7)
    assert b'"A"' not in await resp.read()


async def _waiting(http, command_id: str) -> bool:
    return command_id in http.server.app[api.WAITERS].waiting
async def test_an_answer_read_before_a_commit_and_back_after_its_notification_is_not_kept(conn, http, monkeypatch):
    """The race the epoch closes: the query's snapshot misses a commit whose notification has come by the time
    the answer would be stored; kept, the old answer would be served until the user's next change."""
    f = Feeder(conn)
    await f.apply(create("A"), update_user("in", 7, add=["A"]))
    read, notified = asyncio.Event(), asyncio.Event()
    original = views.user_segments

    async def read_then_wait(c, user_id, *args):
        rows = await original(c, user_id, *args)
        read.set()
        await notified.wait()
        return rows

    monkeypatch.setattr(views, "user_segments", read_then_wait)
    request = asyncio.create_task(body(http, 7))
    await read.wait()  # the snapshot is taken: 7 is in A
    epoch = kept(http).epoch
    await f.apply(update_user("out", 7, remove=["A"]))
    await wait_until(lambda: _moved(http, epoch), timeout=FRESH_WITHIN, message="the notification")
    notified.set()
    assert b'"A"' in await request  # the old answer, right for its snapshot
    monkeypatch.setattr(views, "user_segments", original)
    assert 7 not in kept(http).entries
    assert await body(http, 7) == await truth(conn, 7) and b'"A"' not in await body(http, 7)


async def _moved(http, epoch: int) -> bool:
    return kept(http).epoch != epoch


async def test_a_lost_listener_drops_everything_and_a_change_made_meanwhile_shows(conn, http):
    f = Feeder(conn)
    await f.apply(create("A"), update_user("in", 7, add=["A"]))
    await answers_agree(http, conn, [7])
    assert 7 in kept(http).entries
    await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
                       APPLICATION_NAME)
    await wait_until(lambda: _not_listening(http), timeout=5, message="the loss noticed")
    await f.apply(update_user("out", 7, remove=["A"]))  # its notification reaches nobody
    assert await body(http, 7) == await truth(conn, 7) and b'"A"' not in await body(http, 7)
    await wait_until(lambda: _listening(http), timeout=10, message="listening again")
    await answers_agree(http, conn, [7])
    assert 7 in kept(http).entries


async def _not_listening(http) -> bool:
    return not await _listening(http)


async def test_a_listener_that_goes_silent_stops_serving_from_memory_within_the_freshness_bound(conn, http):
    """Nothing more is read from its connection (as over a link that died without a reset): notifications and
    the heartbeat's answer wait in the socket. Answers lapse LIVENESS_SECONDS after the last heartbeat left, long
    before the heartbeat's timeout gives the connection up."""
    f = Feeder(conn)
    await f.apply(create("A"), update_user("in", 7, add=["A"]))
    await answers_agree(http, conn, [7])
    listener = http.server.app[api.WAITERS].connection
    listener._transport.pause_reading()
    try:
        await f.apply(update_user("out", 7, remove=["A"]))
        changed_at = time.monotonic()
        await answers_agree(http, conn, [7])  # within FRESH_WITHIN
        assert time.monotonic() - changed_at <= LIVENESS_SECONDS + 0.3
        assert http.server.app[api.WAITERS].connection is listener  # not given up: only the answers lapsed
    finally:
        listener._transport.resume_reading()
    await wait_until(lambda: _served_again(http, conn, 7), timeout=5, message="answers kept again")


async def _served_again(http, conn, user_id: int) -> bool:
    return await body(http, user_id) == await truth(conn, user_id) and user_id in kept(http).entries


async def test_with_the_triggers_disabled_nothing_is_kept(database_url, conn):
    await conn.execute("ALTER TABLE memberships DISABLE TRIGGER memberships_notify_out")
    f = Feeder(conn)
    await f.apply(create("A"), update_user("in", 7, add=["A"]))
    async with api_client(Settings(database_url=database_url)) as http:
        await wait_until(lambda: _listening(http), message="the listener")
        await body(http, 7)
        assert not kept(http).entries
        await f.apply(update_user("out", 7, remove=["A"]))  # notifies nobody
        assert await body(http, 7) == await truth(conn, 7) and b'"A"' not in await body(http, 7)


async def test_a_filling_notify_queue_ends_the_listeners_that_stopped_heartbeating(http, database_url, monkeypatch):
    """A frozen API process's listener pins PostgreSQL's NOTIFY queue, and once it is full every commit that
    notifies fails. Here the queue counts as filling from the first byte."""
    monkeypatch.setattr(waiters, "QUEUE_ALARM", 0.0)
    monkeypatch.setattr(waiters, "STUCK_LISTENER_SECONDS", 1)
    frozen = await asyncpg.connect(database_url, server_settings={"application_name": APPLICATION_NAME})
    try:
        await frozen.execute("LISTEN segmentation_users")
        await asyncio.sleep(1.2)  # no heartbeat since
        await wait_until(lambda: _ended(frozen), timeout=5, message="the frozen listener ended")
        assert await _listening(http)  # the live one, heartbeating, is not
    finally:
        await frozen.close()


async def _ended(conn) -> bool:
    return conn.is_closed() or not await _alive(conn)


async def _alive(conn) -> bool:
    try:
        await conn.fetchval("SELECT 1", timeout=1)
        return True
    except (asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError, TimeoutError):
        return False
