"""Layers against the real PostgreSQL: exclusive rollouts on one hash, first-fit ranges, exact deltas, LAYER_FULL."""
import uuid

from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from service.bucket import bucket
from service.read.api import create_app
from tests.support.batch import Feeder, create

USERS = range(1, 2001)


def in_layer(slug: str, percent, layer: str = "L", cid: str | None = None) -> dict:
    return create(slug, cid or f"create-{slug}", percent) | {"layer": layer}


def update(slug: str, percent, cid: str) -> dict:
    return {"type": "UpdateSegment", "command_id": cid, "slug": slug, "auto_percent": percent}


async def register(f: Feeder) -> None:
    await f.apply({"type": "RegisterUsers", "command_id": "reg", "user_ids": list(USERS)})


async def rollout_members(f: Feeder, slug: str) -> set[int]:
    return await f.members(slug)


async def test_a_layer_at_100_percent_split_among_three_segments_puts_every_user_in_exactly_one(conn, settings):
    f = Feeder(conn)
    await register(f)
    await f.apply(in_layer("D30", 33.34), in_layer("D50", 33.33), in_layer("D70", 33.33))
    members = {s: await rollout_members(f, s) for s in ("D30", "D50", "D70")}
    assert set().union(*members.values()) == set(USERS)
    assert sum(map(len, members.values())) == len(USERS)
    assert members["D50"] == {u for u in USERS if 3334 <= bucket("layer:L", u) < 6667}
    rows = await conn.fetch("SELECT slug, bucket_start, bucket_end FROM segments ORDER BY bucket_start")
    assert [tuple(r) for r in rows] == [("D30", 0, 3334), ("D50", 3334, 6667), ("D70", 6667, 10_000)]
    segments = [e for e in await f.outbox("segment")]
    assert [(e["slug"], e["layer"], e["bucket_start"], e["bucket_end"]) for e in segments] == [
        ("D30", "L", 0, 3334), ("D50", "L", 3334, 6667), ("D70", "L", 6667, 10_000)]

    await f.apply(in_layer("D90", 0.01, cid="full"))
    result = await f.result("full")
    assert result["status"] == "rejected" and result["error"]["code"] == "LAYER_FULL"

    client = TestClient(TestServer(create_app(settings)))
    await client.start_server()
    try:
        listed = {s["slug"]: s for s in (await (await client.get("/api/v1/segments")).json())["segments"]}
        assert (listed["D70"]["layer"], listed["D70"]["bucket_start"], listed["D70"]["bucket_end"]) == ("L", 6667, 10_000)
        for user in (5, 10**12, 2**63 - 1):  # known and unknown users: exactly one segment of the layer
            answer = await (await client.get(f"/api/v1/users/{user}/segments")).json()
            assert len(answer["segments"]) == 1
    finally:
        await client.close()


async def test_percent_changes_keep_the_start_move_exactly_the_users_between_and_refuse_a_neighbours_space(conn):
    f = Feeder(conn)
    await register(f)
    await f.apply(in_layer("A", 20), in_layer("B", 30))
    assert await conn.fetchval("SELECT bucket_start FROM segments WHERE slug = 'B'") == 2000
    before = await rollout_members(f, "A")
    await f.apply(update("A", 10, "a-down"))
    after = await rollout_members(f, "A")
    assert after == {u for u in USERS if bucket("layer:L", u) < 1000}
    removed = [e for e in await f.outbox("membership") if e["command_id"] == "a-down"]
    assert {e["user_id"] for e in removed} == before - after and all(e["change"] == "removed" for e in removed)

    await f.apply(update("A", 20.01, "a-into-b"))
    assert (await f.result("a-into-b"))["error"]["code"] == "LAYER_FULL"
    assert await rollout_members(f, "A") == after  # rejected whole
    await f.apply(in_layer("C", 10))  # first fit: the gap A left at [1000, 2000)
    assert await conn.fetchval("SELECT bucket_start FROM segments WHERE slug = 'C'") == 1000
    await f.apply({"type": "DeleteSegment", "command_id": "del-b", "slug": "B"}, update("C", 60, "c-up"))
    assert (await f.result("c-up"))["status"] == "applied"  # B's range is free again
    c = await rollout_members(f, "C")
    assert c == {u for u in USERS if 1000 <= bucket("layer:L", u) < 7000}
    assert c.isdisjoint(await rollout_members(f, "A"))
    await f.apply(update("C", 0, "c-zero"), update("C", 5, "c-again"))
    assert await conn.fetchval("SELECT (bucket_start, bucket_end)::text FROM segments WHERE slug = 'C' "
                               "AND deleted_at IS NULL") == "(1000,1500)"


async def test_a_layer_segment_created_at_0_percent_gets_its_range_when_first_given_a_percent(conn):
    f = Feeder(conn)
    await f.apply(in_layer("A", 0), in_layer("B", 50))
    assert await conn.fetchval("SELECT bucket_start FROM segments WHERE slug = 'A'") is None
    await f.apply(update("A", 50, "a-up"))
    assert await conn.fetchval("SELECT (bucket_start, bucket_end)::text FROM segments WHERE slug = 'A'") == "(5000,10000)"
    await f.apply({"type": "UpdateUserSegments", "command_id": "u", "user_id": 1, "add": ["A", "B"]})
    assert await f.members("A") == {1} and await f.members("B") == {1}  # explicit memberships ignore layers


PROPERTY_USERS = range(1, 401)
steps = st.lists(st.tuples(st.sampled_from(["create", "update", "delete"]), st.integers(0, 3),
                           st.decimals(min_value=0, max_value=60, places=2, allow_nan=False, allow_infinity=False)),
                 min_size=1, max_size=12)


@hypothesis_settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(script=steps)
async def test_random_layer_scripts_never_put_a_user_in_two_rollouts_and_every_delta_is_exact(conn, script):
    f = Feeder(conn)
    tag = uuid.uuid4().hex[:8]  # every example its own layer and slugs, on the same database
    layer = f"L{tag}"
    await f.apply({"type": "RegisterUsers", "command_id": f"reg-{tag}", "user_ids": list(PROPERTY_USERS)})
    for i, (action, n, percent) in enumerate(script):
        slug, command_id = f"S{n}_{tag}", f"{tag}-{i}"
        before = await layer_members(conn, layer)
        body = {"create": in_layer(slug, float(percent), layer, command_id),
                "update": update(slug, float(percent), command_id),
                "delete": {"type": "DeleteSegment", "command_id": command_id, "slug": slug}}[action]
        await f.apply(body)
        after = await layer_members(conn, layer)
        events = {(e["user_id"], e["slug"], e["change"]) for e in await f.outbox("membership")
                  if e["command_id"] == command_id}
        assert events == {(u, s, "removed") for u, s in before - after} | {(u, s, "added") for u, s in after - before}
        ranges = await conn.fetch("SELECT slug, bucket_start, bucket_end FROM segments WHERE layer = $1 "
                                  "AND deleted_at IS NULL AND bucket_start IS NOT NULL", layer)
        expected = {(u, r["slug"]) for r in ranges for u in PROPERTY_USERS
                    if r["bucket_start"] <= bucket(f"layer:{layer}", u) < r["bucket_end"]}
        assert after == expected
        users = [u for u, _ in after]
        assert len(users) == len(set(users))  # nobody in two rollouts of the layer


async def layer_members(conn, layer: str) -> set[tuple[int, str]]:
    rows = await conn.fetch("SELECT m.user_id, s.slug FROM memberships m JOIN segments s ON s.id = m.segment_id "
                            "WHERE s.layer = $1 AND s.deleted_at IS NULL", layer)
    return {(r["user_id"], r["slug"]) for r in rows}
