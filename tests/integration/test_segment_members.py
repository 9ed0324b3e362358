"""UpdateSegmentMembers: for each user exactly what an UpdateUserSegments naming only that slug does."""
import asyncio
from datetime import timedelta

import asyncpg
import pytest

from tests.support.batch import Feeder, create, update_user
from tests.support.helpers import new_database, wait_until

ADD, REMOVE = list(range(1, 121)), list(range(121, 241))


def bulk(cid: str, slug: str = "S", add=(), remove=(), **extra) -> dict:
    return {"type": "UpdateSegmentMembers", "command_id": cid, "slug": slug, "add": list(add),
            "remove": list(remove)} | extra


async def life_so_far(f: Feeder) -> None:
    """Every kind of prior state: explicit members with and without expiry, expired ones not yet removed,
    rollout members, excluded users, scheduled starts, and users never seen."""
    await f.apply(create("S", percent=40), create("R", percent=100), create("T"))
    await f.apply({"type": "RegisterUsers", "command_id": "reg", "user_ids": list(range(1, 200, 3))})
    await f.apply(*[update_user(f"ttl-{u}", u, add=[{"slug": "S", "ttl_seconds": 10}]) for u in range(2, 240, 5)])
    await f.apply(*[update_user(f"keep-{u}", u, add=["S", "T"]) for u in range(4, 240, 7)])
    await f.apply(*[update_user(f"out-{u}", u, remove=["S"]) for u in range(5, 240, 11)])
    later = (f.now + timedelta(hours=2)).isoformat()
    await f.apply(*[update_user(f"sch-{u}", u, add=[{"slug": "S", "starts_at": later}]) for u in range(6, 240, 13)])
    f.now += timedelta(seconds=60)  # the 10 s memberships are expired, their ExpireMembership not applied yet


async def two_lives(conn, pg_admin_url) -> tuple[Feeder, Feeder]:
    """The same life so far on `conn` and on a new database (whose connection the caller closes)."""
    one, many = Feeder(conn), Feeder(await asyncpg.connect(await new_database(pg_admin_url)))
    many.now = one.now
    await life_so_far(one)
    await life_so_far(many)
    return one, many


async def state(conn) -> dict:
    async def rows(query: str) -> list[tuple]:
        return [tuple(r) for r in await conn.fetch(query)]
    return {
        "memberships": await rows("SELECT user_id, segment_id, source, added_at, expires_at FROM memberships "
                                  "ORDER BY 1, 2"),
        "exclusions": await rows("SELECT user_id, segment_id FROM exclusions ORDER BY 1, 2"),
        "scheduled": await rows("SELECT user_id, segment_id, starts_at, expires_at FROM scheduled_memberships "
                                "ORDER BY 1, 2"),
        "users": await rows("SELECT user_id FROM users ORDER BY 1"),
        "history": await rows("SELECT user_id, slug, operation, occurred_at, reason FROM membership_history "
                              "WHERE command_id IN ('bulk') OR command_id LIKE 'one-%' ORDER BY user_id, id"),
    }


async def events_by_user(f: Feeder, ids) -> dict[int, list[tuple]]:
    out: dict[int, list[tuple]] = {}
    for e in await f.outbox("membership"):
        if e["command_id"] in ids:
            out.setdefault(e["user_id"], []).append(
                (e["change"], e["slug"], e["reason"], e["expires_at"] and e["expires_at"][:19], e["occurred_at"][:19]))
    return out


async def test_a_bulk_command_does_for_each_user_what_its_own_command_would(conn, pg_admin_url):
    one, many = await two_lives(conn, pg_admin_url)
    try:
        await one.apply(bulk("bulk", add=ADD, remove=REMOVE, ttl_seconds=3600))
        singles = [update_user(f"one-{u}", u, add=[{"slug": "S"}], ttl_seconds=3600) for u in ADD]
        singles += [update_user(f"one-{u}", u, remove=["S"]) for u in REMOVE]
        await many.apply(*singles)
        assert (await one.result("bulk"))["status"] == "applied"
        assert await state(conn) == await state(many.conn)
        bulk_events = await events_by_user(one, {"bulk"})
        assert bulk_events == await events_by_user(many, {f"one-{u}" for u in ADD + REMOVE})
        assert (await one.result("bulk"))["events"] == sum(map(len, bulk_events.values())) > 0
    finally:
        await many.conn.close()


@pytest.mark.parametrize("microsecond", [0, 120000], ids=["whole-second", "fraction"])
async def test_the_bulk_and_the_users_own_commands_write_expires_at_with_the_same_bytes(conn, pg_admin_url,
                                                                                      microsecond):
    one, many = await two_lives(conn, pg_admin_url)
    try:
        expires = (one.now + timedelta(hours=5)).replace(microsecond=microsecond).isoformat()
        await one.apply(bulk("bulk", add=ADD, remove=REMOVE, expires_at=expires))
        await many.apply(*[update_user(f"one-{u}", u, add=[{"slug": "S", "expires_at": expires}]) for u in ADD],
                         *[update_user(f"one-{u}", u, remove=["S"]) for u in REMOVE])

        async def texts(f: Feeder, ids) -> list[tuple]:
            return sorted((e["user_id"], e["change"], e["reason"], e["expires_at"], e["occurred_at"])
                          for e in await f.outbox("membership") if e["command_id"] in ids)
        from_bulk = await texts(one, {"bulk"})
        assert from_bulk == await texts(many, {f"one-{u}" for u in ADD + REMOVE})
        assert any(e[3] is not None and e[3].endswith("Z") for e in from_bulk)
    finally:
        await many.conn.close()


async def test_a_scheduled_bulk_add_replaces_schedules_and_leaves_todays_memberships(conn):
    f = Feeder(conn)
    await f.apply(create("S"), update_user("u", 1, add=["S"]))
    starts = f.now + timedelta(minutes=5)
    await f.apply(bulk("b", add=[1, 2], remove=[3], starts_at=starts.isoformat(), ttl_seconds=60))
    assert (await f.result("b"))["events"] == 0
    assert await f.members("S") == {1}
    rows = await conn.fetch("SELECT user_id, starts_at, expires_at FROM scheduled_memberships ORDER BY 1")
    assert [tuple(r) for r in rows] == [(1, starts, starts + timedelta(seconds=60)),
                                        (2, starts, starts + timedelta(seconds=60))]
    await f.apply(bulk("c", remove=[2]))
    assert await conn.fetchval("SELECT count(*) FROM scheduled_memberships") == 1  # the remove cancelled it


async def test_bulk_rejections(conn):
    f = Feeder(conn)
    await f.apply(create("S"), {"type": "DeleteSegment", "command_id": "d", "slug": "S"},
                  bulk("gone", add=[1]), bulk("nope", slug="NOPE", add=[1]), bulk("twice", add=[1, 1]),
                  bulk("both", add=[1], remove=[1]), bulk("none"))
    codes = {c: (await f.result(c))["error"]["code"] for c in ("gone", "nope", "twice", "both", "none")}
    assert codes == {"gone": "SEGMENT_NOT_FOUND", "nope": "SEGMENT_NOT_FOUND", "twice": "INVALID_COMMAND",
                     "both": "INVALID_COMMAND", "none": "INVALID_COMMAND"}
    assert await conn.fetchval("SELECT count(*) FROM users") == 0  # a rejected command registers no one



async def test_a_users_own_command_on_another_partition_waits_for_the_bulk_and_applies_on_its_result(
        conn, database_url):
    f = Feeder(conn)
    await f.apply(create("S"), update_user("first", 7, add=["S"]), partition=9)
    blocker, conn2, conn3 = [await asyncpg.connect(database_url) for _ in range(3)]

    async def waiting_on_locks() -> int:
        return await blocker.fetchval("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                      "AND datname = current_database()")
    try:
        # Hold segment S for update: the bulk locks its users, then waits here for S.
        hold = blocker.transaction()
        await hold.start()
        await blocker.execute("SELECT 1 FROM segments WHERE slug = 'S' FOR UPDATE")
        bulk_task = asyncio.create_task(Feeder(conn2).apply(bulk("bulk", remove=[7, 8]), partition=0))
        await wait_until(lambda: _at_least(waiting_on_locks(), 1), 10, message="the bulk waiting for S")
        own = asyncio.create_task(Feeder(conn3).apply(update_user("own", 7, add=[{"slug": "S", "ttl_seconds": 60}]),
                                                      partition=1))
        await wait_until(lambda: _at_least(waiting_on_locks(), 2), 10, message="user 7's command waiting")
        await hold.rollback()
        await asyncio.wait_for(asyncio.gather(bulk_task, own), 20)
    finally:
        for c in (blocker, conn2, conn3):
            await c.close()
    assert [(c, u, r) for c, u, _, r in await f.events(7)] == [
        ("added", 7, "command"), ("removed", 7, "command"), ("added", 7, "command")]
    assert await f.members("S") == {7}  # the fold of those events
    assert await conn.fetchval("SELECT count(*) FROM exclusions WHERE user_id = 7") == 0
    assert await conn.fetchval("SELECT count(*) FROM exclusions WHERE user_id = 8") == 1


async def _at_least(value, n: int) -> bool:
    return await value >= n
