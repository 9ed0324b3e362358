"""UpdateSegmentMembers: for each user exactly what an UpdateUserSegments naming only that slug does."""
from datetime import timedelta

import asyncpg

from tests.support.batch import Feeder, create, update_user
from tests.support.helpers import new_database

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
    other = await asyncpg.connect(await new_database(pg_admin_url))
    try:
        one, many = Feeder(conn), Feeder(other)
        many.now = one.now
        await life_so_far(one)
        await life_so_far(many)
        await one.apply(bulk("bulk", add=ADD, remove=REMOVE, ttl_seconds=3600))
        singles = [update_user(f"one-{u}", u, add=[{"slug": "S"}], ttl_seconds=3600) for u in ADD]
        singles += [update_user(f"one-{u}", u, remove=["S"]) for u in REMOVE]
        await many.apply(*singles)
        assert (await one.result("bulk"))["status"] == "applied"
        assert await state(conn) == await state(other)
        bulk_events = await events_by_user(one, {"bulk"})
        assert bulk_events == await events_by_user(many, {f"one-{u}" for u in ADD + REMOVE})
        assert (await one.result("bulk"))["events"] == sum(map(len, bulk_events.values())) > 0
    finally:
        await other.close()


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

