"""Issue 10 end to end on the real stack (broker, workers, relay, scheduler, HTTP): bulk membership racing users'
own commands on other partitions, a layer split three ways, and the bulk CLI."""
import asyncio
import sys
from collections import defaultdict
from datetime import datetime

import pytest
from aiohttp.test_utils import TestClient, TestServer

from schemas import CreateSegment, RegisterUsers, UpdateSegmentMembers, UpdateUserSegments
from service.read.api import create_app
from tests.support.harness import Stack, cid
from tests.support.helpers import ROOT, fast_settings, new_database, settings_env, wait_until

USERS = list(range(1, 401))
ROUNDS = 6


@pytest.fixture(scope="module")
async def stack(pg_admin_url, template_db, broker_bootstrap):
    settings = fast_settings(await new_database(pg_admin_url), broker_bootstrap)
    async with Stack(settings, workers=2) as s:
        async def balanced() -> bool:
            return all(w.consumer is not None and w.consumer.assignment() for w in s.workers)
        await wait_until(balanced, 60, message="both workers own partitions")
        yield s


def fold(events: list[dict]) -> dict[int, dict[str, str | None]]:
    """Each user's memberships as its events say, applied in the order they were published."""
    state: dict[int, dict[str, str | None]] = defaultdict(dict)
    for e in events:
        if e["change"] == "added":
            state[e["user_id"]][e["slug"]] = e["expires_at"]
        else:
            assert e["slug"] in state[e["user_id"]], f"removed without being a member: {e}"
            del state[e["user_id"]][e["slug"]]
    return state


def moment(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text.replace("Z", "+00:00"))


async def test_bulk_commands_racing_the_users_own_commands_keep_each_users_events_in_commit_order(stack):
    slug = f"RACE_{cid()[:8]}"
    assert (await stack.request(CreateSegment(command_id=cid(), slug=slug))).status == "applied"
    waiting = []
    for r in range(ROUNDS):  # everything in flight at once: the bulk (keyed by slug) and users (keyed by id)
        bulk = UpdateSegmentMembers(command_id=cid(), slug=slug, **({"add": USERS, "ttl_seconds": 1000 + r}
                                                                   if r % 2 == 0 else {"remove": USERS}))
        own = [UpdateUserSegments(command_id=cid(), user_id=u, **({"remove": [slug]} if r % 2 == 0 else
                                                                  {"add": [{"slug": slug, "ttl_seconds": 5000 + r}]}))
               for u in USERS[::7]]
        for c in [bulk, *own]:
            waiting.append(await stack.client.expect(c.command_id))
            await stack.client.send(c)
    results = await asyncio.wait_for(asyncio.gather(*waiting), 120)
    assert {r.status for r in results} == {"applied"}
    expected_events = sum(r.events for r in results)

    def ours() -> list[dict]:
        return [e for e in stack.collector.membership_events() if e["slug"] == slug]

    async def all_out() -> bool:
        return len(ours()) >= expected_events
    await wait_until(all_out, 60, message="every event published")
    folded = fold(ours())
    rows = await stack.query("SELECT m.user_id, m.expires_at FROM memberships m JOIN segments s "
                             "ON s.id = m.segment_id WHERE s.slug = $1", slug)
    assert {r["user_id"]: r["expires_at"] for r in rows} == {
        u: moment(m[slug]) for u, m in folded.items() if slug in m}
    # The last round: the bulk removed everyone; a user's own add kept it only if it was applied after the bulk.
    assert {r["user_id"] for r in rows} <= set(USERS[::7])


async def test_a_layer_at_100_percent_split_among_three_segments_through_kafka(stack):
    layer, slugs = f"L{cid()[:8]}", [f"D{n}_{cid()[:6]}" for n in (30, 50, 70)]
    users = list(range(10_001, 10_601))
    assert (await stack.request(RegisterUsers(command_id=cid(), user_ids=users))).status == "applied"
    for slug, percent in zip(slugs, ("33.34", "33.33", "33.33"), strict=True):
        r = await stack.request(CreateSegment(command_id=cid(), slug=slug, auto_percent=percent, layer=layer))
        assert r.status == "applied"
    full = await stack.request(CreateSegment(command_id=cid(), slug=f"X_{cid()[:6]}", auto_percent=1, layer=layer))
    assert full.error.code == "LAYER_FULL"

    async def all_out() -> bool:
        return sum(e["slug"] in slugs for e in stack.collector.membership_events()) >= len(users)
    await wait_until(all_out, 60, message="the rollout events")
    per_user = fold([e for e in stack.collector.membership_events() if e["slug"] in slugs])
    assert all(len(per_user[u]) == 1 for u in users)  # every known user in exactly one of the three
    changed = [e for e in stack.collector.values(stack.settings.segment_topic) if e["slug"] in slugs]
    assert sorted((e["bucket_start"], e["bucket_end"]) for e in changed) == [(0, 3334), (3334, 6667), (6667, 10_000)]
    client = TestClient(TestServer(create_app(stack.settings)))
    await client.start_server()
    try:
        for u in (users[0], 987_654_321):  # a known user and one never seen
            segments = (await (await client.get(f"/api/v1/users/{u}/segments")).json())["segments"]
            assert len([s for s in segments if s["slug"] in slugs]) == 1
            if u in per_user:
                assert [s["slug"] for s in segments if s["slug"] in slugs] == list(per_user[u])
    finally:
        await client.close()


async def test_the_cli_sends_a_bulk_command_from_a_file(stack, tmp_path):
    slug = f"CLI_{cid()[:8]}"
    await stack.request(CreateSegment(command_id=cid(), slug=slug))
    ids = tmp_path / "ids.txt"
    ids.write_text("".join(f"{u}\n" for u in range(20_001, 25_001)))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service.cli", "send", "update-segment-members", slug, "--add-file", str(ids),
        "--add", "1", "2", "--remove", "3", "--ttl", "3600", "--timeout", "120", env=settings_env(stack.settings),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 180)
    assert proc.returncode == 0, (out.decode(), err.decode()[-2000:])
    assert '"status": "applied"' in out.decode()  # (its events: 5 002, plus the new users' rollout joins)
    rows = await stack.query("SELECT count(*) FROM memberships m JOIN segments s ON s.id = m.segment_id "
                             "WHERE s.slug = $1 AND m.expires_at IS NOT NULL", slug)
    assert rows[0][0] == 5002
