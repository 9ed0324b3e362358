"""Crash safety: workers killed mid-run lose nothing and apply nothing twice; events stay in order per user."""
import asyncio
import json
import signal
import subprocess
import sys
from contextlib import asynccontextmanager, contextmanager

import pytest

from schemas import CreateSegment
from tests.support.harness import Stack, cid
from tests.support.helpers import ROOT, fast_settings, new_database, settings_env, wait_until

USERS = 1000
# Five commands per user; each changes something, so every user gets exactly these seven events in order.
ROUNDS = [
    (["A", "B"], []),
    ([], ["A"]),
    (["A"], ["B"]),
    ([], ["A"]),
    (["B"], []),
]
EXPECTED = [("added", "A"), ("added", "B"), ("removed", "A"), ("added", "A"), ("removed", "B"),
            ("removed", "A"), ("added", "B")]


def start_worker(settings) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "service.cli", "worker"], env=settings_env(settings), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def processed(stack) -> int:
    return (await stack.query("SELECT count(*) AS n FROM processed_commands"))[0]["n"]


async def publish_commands(stack, slugs: dict[str, str]) -> int:
    producer = stack.client.producer
    sent = 0
    for r, (add, remove) in enumerate(ROUNDS):
        for user in range(1, USERS + 1):
            body = {"type": "UpdateUserSegments", "command_id": f"r{r}-u{user}", "user_id": user,
                    "add": [slugs[a] for a in add], "remove": [slugs[x] for x in remove]}
            await producer.send(stack.settings.commands_topic, json.dumps(body).encode(),
                                key=str(user).encode())
            sent += 1
    await producer.flush()
    return sent


async def check_exactly_once(stack, slugs: dict[str, str], total: int) -> None:
    names = {v: k for k, v in slugs.items()}
    await wait_until(lambda: _at_least(processed(stack), total + 2), timeout=120, message="every command applied")
    rows = await stack.query("SELECT status, count(*) AS n FROM (SELECT result::jsonb->>'status' AS status "
                             "FROM processed_commands) r GROUP BY status")
    assert {r["status"]: r["n"] for r in rows} == {"applied": total + 2}
    history = await stack.query("SELECT count(*) AS n FROM membership_history")
    assert history[0]["n"] == USERS * len(EXPECTED)  # no double rows
    members = await stack.query("SELECT s.slug, count(*) AS n FROM memberships m JOIN segments s ON s.id = m.segment_id "
                                "GROUP BY s.slug")
    assert {names[r["slug"]]: r["n"] for r in members} == {"B": USERS}

    async def all_events():
        events = stack.collector.membership_events()
        return events if len({e["event_id"] for e in events}) >= USERS * len(EXPECTED) else None

    events = await wait_until(all_events, timeout=60, message="every event published")
    seen, per_user = set(), {}
    for e in events:  # consumers deduplicate by event_id
        if e["event_id"] in seen:
            continue
        seen.add(e["event_id"])
        per_user.setdefault(e["user_id"], []).append((e["change"], names[e["slug"]]))
    assert len(per_user) == USERS
    # No double events written either: a second write of a change would be another event_id in a user's list.
    assert all(seq == EXPECTED for seq in per_user.values()), "events of a user out of order, missing or doubled"


async def _at_least(coro, n):
    return (await coro) >= n


async def _setup(stack) -> dict[str, str]:
    slugs = {k: f"{k}_{cid()[:8]}" for k in ("A", "B")}
    for s in slugs.values():
        assert (await stack.request(CreateSegment(command_id=cid(), slug=s))).status == "applied"
    return slugs


@pytest.fixture
async def crash_settings(pg_admin_url, template_db, broker_bootstrap):
    return fast_settings(await new_database(pg_admin_url), broker_bootstrap, worker_batch_max=100)


@contextmanager
def workers(settings, count: int):
    """Worker processes; whatever still runs at the end is stopped."""
    procs = [start_worker(settings) for _ in range(count)]
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()


@asynccontextmanager
async def _run_until_progress(stack):
    """Segments, then the 5 000 commands; yields (slugs, total, the publishing task) once some of them are applied,
    the rest maybe still being published: waiting for the whole burst to be out first let the workers finish it
    before the fault. A publish that fails fails the test; the task never outlives the block."""
    slugs = await _setup(stack)
    publishing = asyncio.create_task(publish_commands(stack, slugs))

    async def progress() -> bool:
        if publishing.done():
            publishing.result()  # raises what the publishing raised
        return await _at_least(processed(stack), 300)

    try:
        await wait_until(progress, timeout=60, message="progress")
        yield slugs, USERS * len(ROUNDS), publishing
    finally:
        publishing.cancel()


async def test_sigkill_of_the_worker_mid_run_loses_nothing_and_doubles_nothing(crash_settings):
    async with Stack(crash_settings, workers=0) as stack:
        with workers(crash_settings, 1) as (first,):
            async with _run_until_progress(stack) as (slugs, total, publishing):
                first.send_signal(signal.SIGKILL)
                first.wait(10)
                assert await processed(stack) < total + 2, "the worker finished before it was killed"
                assert await publishing == total
        with workers(crash_settings, 1):
            await check_exactly_once(stack, slugs, total)


async def test_two_workers_one_killed_mid_run(crash_settings):
    async with Stack(crash_settings, workers=0) as stack:
        with workers(crash_settings, 2) as (first, _second):
            async with _run_until_progress(stack) as (slugs, total, publishing):
                first.send_signal(signal.SIGKILL)
                first.wait(10)
                assert await processed(stack) < total + 2, "the work was done before one worker was killed"
                assert await publishing == total
            await check_exactly_once(stack, slugs, total)


async def test_sigterm_mid_stream_finishes_the_batch_and_loses_nothing(crash_settings):
    async with Stack(crash_settings, workers=0) as stack:
        with workers(crash_settings, 1) as (first,):
            async with _run_until_progress(stack) as (slugs, total, publishing):
                first.send_signal(signal.SIGTERM)
                started = asyncio.get_running_loop().time()
                code = await asyncio.get_running_loop().run_in_executor(None, first.wait, 15)
                assert code == 0
                assert asyncio.get_running_loop().time() - started < 10
                done = await processed(stack)
                assert done < total + 2, "the worker finished before it was stopped"
                assert await publishing == total
                # No half-applied batch: the stored offsets account for exactly the commands applied.
                offsets = await stack.query("SELECT sum(next_offset) AS n FROM consumer_offsets")
                assert offsets[0]["n"] == done
        with workers(crash_settings, 1):
            await check_exactly_once(stack, slugs, total)
