"""Every wait on PostgreSQL is bounded: pool timeouts and keepalive, lock and statement timeouts, sliced fan-outs."""
import asyncio

import asyncpg
import pytest

from service.infra import db
from service.infra.settings import Settings


async def test_the_pools_bound_every_wait(database_url):
    settings = Settings(database_url=database_url, db_command_timeout_seconds=1.0, db_statement_timeout_ms=30_000,
                        db_lock_timeout_ms=2_000, db_idle_in_transaction_timeout_ms=40_000)
    pool = await db.create_pool(settings, "test", 1, 2)
    try:
        async with pool.acquire() as c:
            shown = [await c.fetchval(f"SHOW {name}") for name in
                     ("statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout")]
            assert shown == ["30s", "2s", "40s"]
            with pytest.raises(asyncio.TimeoutError):  # a connection that answers nothing hangs no one
                await c.fetchval("SELECT pg_sleep(5)")
    finally:
        await pool.close()
    keepalive = db.server_settings(settings, "test")  # a Unix socket shows 0 for them: checked as sent
    assert {k: keepalive[k] for k in ("tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count")} \
        == {"tcp_keepalives_idle": "10", "tcp_keepalives_interval": "5", "tcp_keepalives_count": "3"}


async def test_a_timeout_set_to_minus_one_keeps_the_servers(database_url):
    conn = await asyncpg.connect(database_url)
    try:
        name = await conn.fetchval("SELECT current_database()")
        await conn.execute(f"ALTER DATABASE \"{name}\" SET lock_timeout = '7s'")
    finally:
        await conn.close()
    pool = await db.create_pool(Settings(database_url=database_url, db_lock_timeout_ms=-1), "test", 1, 1)
    try:
        assert await pool.fetchval("SHOW lock_timeout") == "7s"
    finally:
        await pool.close()


async def test_a_fan_out_longer_than_the_statement_timeout_goes_through_in_slices(conn):
    from tests.support.batch import Feeder, create

    f = Feeder(conn, fan_out_slice=2_000)
    await f.apply(create("X"))
    await conn.execute("INSERT INTO users (user_id, registered_at) SELECT g, now() FROM generate_series(1, 100000) g")
    commands = [{"type": "UpdateSegment", "command_id": f"to-{p}", "slug": "X", "auto_percent": p}
                for p in (100, 50, 0, 99)] + [{"type": "DeleteSegment", "command_id": "del", "slug": "X"}]
    reports = []
    for command in commands:
        await conn.execute("SET statement_timeout = '1s'")  # as a managed database sets it: one statement is not enough
        reports.append(await f.apply(command))
        await conn.execute("RESET statement_timeout")  # for the checks below
        if command["command_id"] == "to-100":
            assert await conn.fetchval("SELECT count(*) FROM memberships") == 100_000
    assert [sum(r.outcomes.values()) for r in reports] == [1] * 5
    results = await f.results()
    assert [results[c["command_id"]][0]["status"] for c in commands] == ["applied"] * 5
    assert await conn.fetchval("SELECT count(*) FROM memberships") == 0
    events = [results[c["command_id"]][0]["events"] for c in commands]
    assert events[0] == 100_000 and events[3] == events[4]  # every member of 99 % left at the deletion
    assert await conn.fetchval("SELECT count(*) FROM outbox WHERE kind = 'membership'") == sum(events)
