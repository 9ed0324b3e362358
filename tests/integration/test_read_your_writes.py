"""Read your writes: `after=<command_id>` answers once the command is processed, woken by LISTEN/NOTIFY."""
import asyncio
import time

import pytest
from aiohttp.test_utils import TestClient, TestServer

from schemas import CreateSegment, UpdateUserSegments
from service.read.api import WAITERS, create_app
from service.read.waiters import APPLICATION_NAME
from tests.support.harness import Stack, cid
from tests.support.helpers import fast_settings, new_database, wait_until


@pytest.fixture(scope="module")
async def stack(pg_admin_url, template_db, broker_bootstrap):
    settings = fast_settings(await new_database(pg_admin_url), broker_bootstrap)
    async with Stack(settings) as s:
        await s.request(CreateSegment(command_id=cid(), slug="RYW"))  # every test of the module uses it
        yield s


@pytest.fixture(scope="module")
async def http(stack):
    client = TestClient(TestServer(create_app(stack.settings)))
    await client.start_server()
    await wait_until(lambda: _listening(client), message="the command listener")
    yield client
    await client.close()


async def _listening(client) -> bool:
    return client.app[WAITERS].listening.is_set()


@pytest.mark.timeout(600)
async def test_a_thousand_publish_then_read_pairs_never_see_the_old_state(stack, http):
    stale = []

    async def pair(user_id: int) -> None:
        command_id = cid()
        await stack.client.send(UpdateUserSegments(command_id=command_id, user_id=user_id, add=["RYW"]))
        resp = await http.get(f"/api/v1/users/{user_id}/segments", params={"after": command_id, "wait_ms": "10000"})
        assert resp.status == 200, await resp.text()
        if [s["slug"] for s in (await resp.json())["segments"]] != ["RYW"]:
            stale.append(user_id)

    for start in range(1, 1001, 50):  # 50 pairs in flight at a time
        await asyncio.gather(*[pair(u) for u in range(start, start + 50)])
    assert stale == []
    assert not http.app[WAITERS].waiting  # every waiter cleaned up


async def test_a_command_never_sent_is_a_409_after_wait_ms(http):
    started = time.monotonic()
    resp = await http.get("/api/v1/users/1/segments", params={"after": "never-sent", "wait_ms": "300"})
    elapsed = time.monotonic() - started
    assert resp.status == 409 and (await resp.json())["error"]["code"] == "NOT_YET_APPLIED"
    assert 0.3 <= elapsed < 5
    resp = await http.get("/api/v1/users/1/segments", params={"after": "never-sent", "wait_ms": "0"})
    assert resp.status == 409


async def test_an_already_processed_command_answers_at_once(stack, http):
    command_id = cid()
    await stack.request(UpdateUserSegments(command_id=command_id, user_id=77, add=["RYW"]))
    resp = await http.get("/api/v1/users/77/segments", params={"after": command_id, "wait_ms": "0"})
    assert resp.status == 200 and [s["slug"] for s in (await resp.json())["segments"]] == ["RYW"]


@pytest.mark.parametrize("query", ["after=c&wait_ms=10001", "after=c&wait_ms=-1", "after=c&wait_ms=x", "after=",
                                   f"after={'x' * 129}"])
async def test_bad_after_or_wait_ms_is_a_400(http, query):
    resp = await http.get(f"/api/v1/users/1/segments?{query}")
    assert resp.status == 400


async def test_the_listener_comes_back_after_its_connection_is_killed(stack, http):
    waiters = http.app[WAITERS]
    rows = await stack.query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
                             APPLICATION_NAME)
    assert rows

    async def down() -> bool:
        return not waiters.listening.is_set()

    await wait_until(down, timeout=10, message="the listener to notice")
    await wait_until(lambda: _listening(http), message="the listener back")
    command_id = cid()
    await stack.client.send(UpdateUserSegments(command_id=command_id, user_id=78, add=["RYW"]))
    resp = await http.get("/api/v1/users/78/segments", params={"after": command_id, "wait_ms": "10000"})
    assert resp.status == 200 and [s["slug"] for s in (await resp.json())["segments"]] == ["RYW"]
    assert waiters.listening.is_set()
