"""Two workers at once: commands about one user on different partitions, rollouts against registrations,
segment commands against user commands. Each test holds one transaction open to make the race certain."""
import asyncio

import asyncpg
import pytest

from service.read import views
from service.write import batch as batch_module
from tests.support.batch import Feeder, create, update_user
from tests.support.helpers import wait_until


@pytest.fixture
async def conn2(database_url):
    c = await asyncpg.connect(database_url)
    yield c
    await c.close()


@pytest.mark.parametrize("first", [
    update_user("own", 42, add=[{"slug": "R", "ttl_seconds": 60}]),
    update_user("own", 42, remove=["R"]),
])
async def test_a_registration_on_another_partition_waits_for_the_users_own_command(conn, conn2, first):
    await Feeder(conn).apply(create("R", percent=100), partition=9)
    open_batch = conn.transaction()
    await open_batch.start()
    await Feeder(conn).apply(first, partition=0)  # user 42's first command, not committed yet
    other = asyncio.create_task(Feeder(conn2).apply(
        {"type": "RegisterUsers", "command_id": "reg", "user_ids": [7, 42]}, partition=1))  # keyed "7"
    await asyncio.sleep(0.5)
    assert not other.done()  # it waits for user 42's row
    await open_batch.commit()
    await other
    rows = await conn.fetch("SELECT source, expires_at FROM memberships WHERE user_id = 42")
    if first["remove"]:
        assert rows == []  # the explicit removal holds
    else:
        assert [(r["source"], r["expires_at"] is not None) for r in rows] == [("manual", True)]


async def test_a_user_first_seen_during_a_rollout_fan_out_joins_it(conn, conn2):
    fan_out = conn.transaction()
    await fan_out.start()
    await Feeder(conn).apply(create("R", percent=100), partition=0)  # a long fan-out, not committed yet
    first_seen = asyncio.create_task(Feeder(conn2).apply(update_user("first", 42), partition=1))
    await asyncio.sleep(0.5)
    assert not first_seen.done()  # registrations wait for the fan-out
    await fan_out.commit()
    await first_seen
    f = Feeder(conn)
    assert [r["slug"] for r in await views.user_segments(conn, 42)] == ["R"]
    assert 42 in await f.members("R")
    assert await f.events(42) == [("added", 42, "R", "auto_percent")]


async def test_a_known_users_command_does_not_wait_for_an_unrelated_rollout_change(conn, conn2):
    await Feeder(conn).apply(create("S", percent=10), create("B"), update_user("known", 5), partition=9)
    fan_out = conn.transaction()
    await fan_out.start()
    await Feeder(conn).apply({"type": "UpdateSegment", "command_id": "up", "slug": "S", "auto_percent": 20},
                             partition=0)
    try:
        await asyncio.wait_for(Feeder(conn2).apply(update_user("b", 5, add=["B"]), partition=1), 2)
    finally:
        await fan_out.rollback()


async def test_segment_commands_in_two_batches_do_not_deadlock(conn, conn2, monkeypatch):
    await Feeder(conn).apply(create("S", percent=10), create("R", percent=10), partition=9)
    both_ran_their_user_commands = asyncio.Barrier(2)
    original = batch_module._Part.apply_segment_command

    async def paused(self, d):
        await asyncio.wait_for(both_ran_their_user_commands.wait(), 10)
        return await original(self, d)

    monkeypatch.setattr(batch_module._Part, "apply_segment_command", paused)
    results = await asyncio.gather(
        Feeder(conn).apply(update_user("a", 1), {"type": "UpdateSegment", "command_id": "us", "slug": "S",
                                                  "description": "s"}, partition=0),
        Feeder(conn2).apply(update_user("b", 2), {"type": "UpdateSegment", "command_id": "ur", "slug": "R",
                                                   "description": "r"}, partition=1),
        return_exceptions=True)
    assert [r for r in results if isinstance(r, BaseException)] == []


async def test_a_user_whose_commands_are_all_rejected_stays_unknown(conn):
    f = Feeder(conn)
    await f.apply(update_user("nope", 9, add=["MISSING"]))
    assert (await f.result("nope"))["error"]["code"] == "SEGMENT_NOT_FOUND"
    assert await conn.fetchval("SELECT count(*) FROM users WHERE user_id = 9") == 0


async def test_a_run_registering_a_user_and_a_rollout_start_do_not_deadlock(conn, conn2, monkeypatch):
    await Feeder(conn).apply(create("S"), update_user("k", 1), partition=9)
    holding = asyncio.Event()
    release = asyncio.Event()
    original = batch_module._Part.load_run

    async def paused(self, run):
        ctx = await original(self, run)
        if any(d.command_id == "new" for d in run):
            holding.set()
            await asyncio.wait_for(release.wait(), 10)
        return ctx

    monkeypatch.setattr(batch_module._Part, "load_run", paused)
    # A run that share-locks S (user 1) and registers user 77, around a dead letter.
    run = asyncio.create_task(Feeder(conn).apply(update_user("a1", 1, add=["S"]), b"garbage",
                                                 update_user("new", 77), partition=0))
    await asyncio.wait_for(holding.wait(), 10)
    start = asyncio.create_task(Feeder(conn2).apply(
        {"type": "UpdateSegment", "command_id": "up", "slug": "S", "auto_percent": 50}, partition=1))
    await asyncio.sleep(0.3)
    release.set()
    results = await asyncio.gather(run, start, return_exceptions=True)
    assert [r for r in results if isinstance(r, BaseException)] == []


async def _while_a_fan_out_is_open(conn, conn2, fan_out: dict, command: dict):
    """Apply `fan_out` on `conn` without committing, `command` on `conn2` meanwhile; commit; return both done."""
    open_batch = conn.transaction()
    await open_batch.start()
    await Feeder(conn).apply(fan_out, partition=0)
    other = asyncio.create_task(Feeder(conn2).apply(command, partition=1))
    await asyncio.sleep(0.5)
    assert not other.done()  # it waits for the segment's row lock
    await open_batch.commit()
    await asyncio.wait_for(other, 30)


async def test_an_explicit_remove_during_a_percent_raise_holds(conn, conn2):
    await Feeder(conn).apply(create("X", percent=0), update_user("known", 42), partition=9)
    await _while_a_fan_out_is_open(
        conn, conn2, {"type": "UpdateSegment", "command_id": "raise", "slug": "X", "auto_percent": 100},
        update_user("out", 42, remove=["X"]))
    f = Feeder(conn)
    assert 42 not in await f.members("X")
    assert [r["slug"] for r in await views.user_segments(conn, 42)] == []
    assert await f.events(42) == [("added", 42, "X", "auto_percent"), ("removed", 42, "X", "command")]
    assert (await f.result("out"))["events"] == 1


async def test_an_add_during_a_percent_cut_is_a_membership_with_its_added_event(conn, conn2):
    await Feeder(conn).apply(create("X", percent=100), update_user("known", 42), partition=9)
    assert 42 in await Feeder(conn).members("X")
    await _while_a_fan_out_is_open(
        conn, conn2, {"type": "UpdateSegment", "command_id": "cut", "slug": "X", "auto_percent": 0},
        update_user("in", 42, add=["X"]))
    f = Feeder(conn)
    assert 42 in await f.members("X")
    assert (await f.events(42))[-2:] == [("removed", 42, "X", "auto_percent"), ("added", 42, "X", "command")]
    assert await conn.fetchval("SELECT source FROM memberships WHERE user_id = 42") == "manual"


async def test_a_lock_timeout_is_a_retry_not_a_rejection(conn, conn2):
    await Feeder(conn).apply(create("X"), partition=9)
    await conn2.execute("SET lock_timeout = '200ms'")
    holder = conn.transaction()
    await holder.start()
    await Feeder(conn).apply({"type": "UpdateSegment", "command_id": "long", "slug": "X", "description": "d"},
                             partition=0)  # holds X's row lock
    waiting = Feeder(conn2)
    record = waiting.record(update_user("valid", 42, add=["X"]), partition=1)
    with pytest.raises(asyncpg.exceptions.LockNotAvailableError):
        await waiting.processor.process(conn2, [record])
    assert await conn2.fetchval("SELECT count(*) FROM processed_commands WHERE command_id = 'valid'") == 0
    await holder.commit()
    await waiting.processor.process(conn2, [record])  # the worker's retry
    assert (await waiting.result("valid"))["status"] == "applied"
    assert 42 in await waiting.members("X")


@pytest.mark.parametrize("alone", [False, True])  # alone: the record's part is redone, not split record by record
async def test_one_command_id_on_two_partitions_at_once_rejects_nothing_else(conn, conn2, alone):
    await Feeder(conn).apply(create("A"), partition=9)
    dup = update_user("dup", 7, add=["A"])
    open_batch = conn.transaction()
    await open_batch.start()
    await Feeder(conn).apply(dup, partition=0)  # stored in the inbox, not committed yet
    bodies = [dup] if alone else [update_user("other", 5, add=["A"]), dup]
    other = asyncio.create_task(Feeder(conn2).apply(*bodies, partition=1))
    await asyncio.sleep(0.5)
    assert not other.done()
    await open_batch.commit()
    report = await asyncio.wait_for(other, 30)
    f = Feeder(conn)
    assert await f.members("A") == ({7} if alone else {5, 7})
    assert alone or (await f.result("other"))["status"] == "applied"
    assert [r["status"] for r in (await f.results())["dup"]] == ["applied", "applied"]  # the stored one again
    assert report.outcomes[("UpdateUserSegments", "duplicate")] == 1
    assert report.dead_letters == 0 and await f.outbox("dlq") == []
    assert await f.events(7) == [("added", 7, "A", "command")]


async def test_one_command_id_for_two_users_on_two_partitions_at_once(conn, conn2):
    await Feeder(conn).apply(create("A"), partition=9)
    open_batch = conn.transaction()
    await open_batch.start()
    await Feeder(conn).apply(update_user("same", 7, add=["A"]), partition=0)
    other = asyncio.create_task(Feeder(conn2).apply(
        update_user("other", 5, add=["A"]), update_user("same", 8, add=["A"]), partition=1))
    await asyncio.sleep(0.5)
    assert not other.done()  # it waits on the inbox row of "same"
    await open_batch.commit()
    await asyncio.wait_for(other, 30)
    f = Feeder(conn)
    assert (await f.result("other"))["status"] == "applied"
    assert (await f.result("same"))["error"]["code"] == "IDEMPOTENCY_CONFLICT"
    assert await f.members("A") == {5, 7}


async def test_a_rollout_start_waiting_behind_a_bulk_does_not_hold_up_a_new_users_command(conn, database_url):
    """A bulk with new users holds the rollout lock shared for its transaction; a rollout start must not queue
    for it exclusively, or every new user's own command would wait behind the queued request."""
    from tests.integration.test_segment_members import bulk

    await Feeder(conn).apply(create("S"), create("R", percent=10), create("T"))
    a, b, c = [await asyncpg.connect(database_url) for _ in range(3)]
    try:
        fa, fb, fc = Feeder(a), Feeder(b), Feeder(c)
        big = asyncio.create_task(fa.apply(bulk("bulk", add=list(range(1, 100_001))), partition=5))
        shared = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND mode = 'ShareLock'"
        await wait_until(lambda: c.fetchval(shared), 120, message="the bulk holding the rollout lock")
        start = asyncio.create_task(fb.apply({"type": "UpdateSegment", "command_id": "u", "slug": "R",
                                              "auto_percent": 20}, partition=6))
        await asyncio.sleep(0.5)  # the rollout start is trying for the lock
        assert not big.done() and not start.done()
        await asyncio.wait_for(fc.apply(update_user("own", 9_000_000_002, add=["T"]), partition=3), 3)
        assert (await fc.result("own"))["status"] == "applied" and not big.done()
        await asyncio.wait_for(asyncio.gather(big, start), 200)
        assert (await fa.result("bulk"))["status"] == (await fb.result("u"))["status"] == "applied"
    finally:
        for x in (a, b, c):
            await x.close()
