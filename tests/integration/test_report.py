"""The monthly history report: streamed CSV of every membership change in a UTC month."""
from datetime import UTC, datetime, timedelta

import pytest
from aiohttp.test_utils import TestClient, TestServer

from service.infra.settings import Settings
from service.read.api import create_app
from tests.support.batch import Feeder, create, update_user
from tests.support.helpers import api_client

NOV = datetime(2026, 11, 3, 10, 0, tzinfo=UTC)


@pytest.fixture
async def http(database_url):
    async with api_client(Settings(database_url=database_url, public_base_url="http://reports")) as client:
        yield client


async def csv(http, query: str) -> list[list[str]]:
    resp = await http.get(f"/api/v1/reports/history.csv?{query}")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/csv")
    lines = (await resp.text()).splitlines()
    assert lines[0] == "user_id;segment;operation;timestamp;reason"
    return [line.split(";") for line in lines[1:]]


async def test_a_month_with_adds_removes_expiries_and_a_deleted_segment(conn, http):
    f = Feeder(conn, now=datetime(2026, 10, 31, 23, 59, tzinfo=UTC))
    await f.apply(create("A"), create("B"), update_user("october", 1, add=["A"]))  # not in November
    f.now = NOV
    await f.apply(update_user("c1", 1, add=["B", {"slug": "A", "ttl_seconds": 3600}]),
                  update_user("c2", 2, add=["A", "B"]))
    f.now = NOV + timedelta(hours=2)
    await f.apply({"type": "ExpireMembership", "command_id": "exp", "user_id": 1, "slug": "A",
                   "expires_at": "2026-11-03T11:00:00Z"})
    f.now = NOV + timedelta(days=1)
    await f.apply(update_user("c3", 2, remove=["A"]), {"type": "DeleteSegment", "command_id": "del", "slug": "B"})
    f.now = datetime(2026, 12, 1, 0, 0, tzinfo=UTC)
    await f.apply(update_user("december", 3, add=["A"]))

    rows = await csv(http, "year=2026&month=11")
    assert [(r[0], r[1], r[2], r[4]) for r in rows] == [
        ("1", "B", "added", "command"), ("1", "A", "added", "command"),  # a changed expiry is an `added`
        ("2", "A", "added", "command"), ("2", "B", "added", "command"),
        ("1", "A", "removed", "expired"),
        ("2", "A", "removed", "command"),
        ("1", "B", "removed", "segment_deleted"), ("2", "B", "removed", "segment_deleted"),
    ]
    assert rows[4][3] == "2026-11-03T11:00:00.000000Z"  # an expiry is dated at the expiry time itself
    assert [r[0] for r in await csv(http, "year=2026&month=11&user_id=2")] == ["2"] * 4
    assert await csv(http, "year=2026&month=10") == [["1", "A", "added", "2026-10-31T23:59:00.000000Z", "command"]]


async def test_an_empty_month_is_just_the_header(http):
    assert await csv(http, "year=2025&month=2") == []


async def test_the_link_points_at_the_csv(http):
    resp = await http.get("/api/v1/reports/history?year=2026&month=11&user_id=7")
    assert await resp.json() == {"url": "http://reports/api/v1/reports/history.csv?year=2026&month=11&user_id=7"}


async def test_the_month_is_the_utc_month_whatever_the_servers_time_zone(conn):
    from service.read import views

    await conn.execute("SET TimeZone = 'America/New_York'")
    await conn.execute(
        "INSERT INTO membership_history (user_id, slug, segment_id, operation, occurred_at, reason) VALUES "
        "(1, 'A', 1, 'added', '2026-05-31T12:00:00Z', 'command'), (1, 'A', 1, 'removed', '2026-06-01T00:00:00Z', 'command')")
    chunks: list[bytes] = []

    async def write(b):
        chunks.append(bytes(b))

    await views.stream_history_csv(conn, datetime(2026, 5, 1, tzinfo=UTC), datetime(2026, 6, 1, tzinfo=UTC), None, None, write)
    lines = b"".join(chunks).decode().splitlines()
    assert lines[1:] == ["1;A;added;2026-05-31T12:00:00.000000Z;command"]


async def test_december_9999_is_a_400_not_a_broken_stream(http):
    resp = await http.get("/api/v1/reports/history.csv?year=9999&month=12")
    assert resp.status == 400


async def test_slow_report_readers_do_not_starve_the_read_api(conn, database_url):
    import asyncio

    await conn.execute("""
        INSERT INTO membership_history (user_id, slug, segment_id, operation, occurred_at, reason)
        SELECT g, 'AVITO_VOICE_MESSAGES', 1, 'added', timestamptz '2026-11-01' + g * interval '1 ms', 'command'
        FROM generate_series(1, 400000) g""")
    client = TestClient(TestServer(create_app(Settings(database_url=database_url, db_pool_max=2))))
    await client.start_server()
    readers = []
    try:
        for _ in range(2):  # two downloads over a slow link (here: nobody reads)
            _, w = await asyncio.open_connection(client.host, client.port)
            w.write(b"GET /api/v1/reports/history.csv?year=2026&month=11 HTTP/1.1\r\nHost: x\r\n\r\n")
            readers.append(w)
        await asyncio.sleep(2)
        resp = await asyncio.wait_for(client.get("/api/v1/users/1000/segments"), 10)
        assert resp.status == 200, await resp.text()
    finally:
        for w in readers:
            w.transport.abort()
        await client.close()


async def test_a_failing_query_is_a_500_not_a_503(http, monkeypatch):
    import asyncpg

    from service.read import views

    async def broken(*args):
        raise asyncpg.exceptions.FeatureNotSupportedError("invalid UNION/INTERSECT/EXCEPT ORDER BY clause")

    monkeypatch.setattr(views, "user_segments", broken)
    resp = await http.get("/api/v1/users/1/segments")
    assert resp.status == 500 and (await resp.json())["error"]["code"] == "INTERNAL"
