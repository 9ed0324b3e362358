"""Answers kept in the API's memory (service/read/answers.py) against a real PostgreSQL: every kind of write drops
them at once (migration 012's triggers), and no fault of the listener serves a stale one."""
import asyncio
import os
import signal
from datetime import UTC, datetime

import pytest

from service.infra.settings import Settings
from service.read import api, views
from service.read.answers import LIVENESS_SECONDS
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


async def test_every_kind_of_write_drops_the_kept_answers_it_changes_and_only_those(conn, http):
    f = Feeder(conn)
    users = [7, 8, 9]
    steps = [
        [create("A"), create("B"), create("R", percent=100)],
        [update_user("add", 7, add=["A", "B"])],  # inserts
        [update_user("ttl", 7, add=[{"slug": "A", "ttl_seconds": 3600}])],  # an upsert that updates
        [update_user("exclude", 8, remove=["R"])],  # an exclusion
        [update_user("include", 8, add=["R"])],  # the exclusion deleted, an explicit member
        [update_user("remove", 7, remove=["B"])],  # a delete
        [{"type": "UpdateSegmentMembers", "command_id": "bulk", "slug": "B",
          "add": list(range(10, 12_010)) + [9]}],  # 12 001 rows in one statement: everyone's answer dropped
        [{"type": "UpdateSegment", "command_id": "percent", "slug": "R", "auto_percent": 0}],  # a segment: everyone
        [{"type": "DeleteSegment", "command_id": "delete", "slug": "A"}],
    ]
    for i, step in enumerate(steps):
        await answers_agree(http, conn, users)
        assert all(u in kept(http).entries for u in users), "read from memory before the change"
        before = {u: await body(http, u) for u in users}
        await f.apply(*step)
        await answers_agree(http, conn, users)
        changed = {u for u in users if await body(http, u) != before[u]}
        assert changed or i == 0, f"step {i} changed nobody's answer: it tests nothing"


async def test_a_user_not_named_keeps_its_answer_in_memory(conn, http):
    f = Feeder(conn)
    await f.apply(create("A"), update_user("seven", 7, add=["A"]), update_user("eight", 8, add=["A"]))
    await answers_agree(http, conn, [7, 8])
    await f.apply(update_user("seven-out", 7, remove=["A"]))
    await answers_agree(http, conn, [7])
    assert 8 in kept(http).entries


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
    """Its backend stopped (SIGSTOP): the connection stays open but delivers nothing, as over a link that died
    without a reset. The heartbeat goes unanswered, and within LIVENESS_SECONDS answers come from the database."""
    f = Feeder(conn)
    await f.apply(create("A"), update_user("in", 7, add=["A"]))
    await answers_agree(http, conn, [7])
    pid = await conn.fetchval("SELECT pid FROM pg_stat_activity WHERE application_name = $1", APPLICATION_NAME)
    os.kill(pid, signal.SIGSTOP)
    try:
        await f.apply(update_user("out", 7, remove=["A"]))
        changed_at = datetime.now(UTC)
        await answers_agree(http, conn, [7])  # within FRESH_WITHIN
        assert (datetime.now(UTC) - changed_at).total_seconds() <= LIVENESS_SECONDS + 0.5
    finally:
        os.kill(pid, signal.SIGCONT)
    await wait_until(lambda: _listening(http), timeout=15, message="listening again")
    await answers_agree(http, conn, [7])
