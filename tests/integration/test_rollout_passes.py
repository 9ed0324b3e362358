"""A rollout is committed a pass at a time (the relay publishes while it runs), resumed after a crash from where it
stopped, and nothing else changes the segment's users while it is in progress."""
import asyncio
import logging

import asyncpg
import pytest

from service.bucket import bucket, segment_salt
from service.infra import errors
from service.read import views
from tests.support.batch import Feeder, create, update_user
from tests.support.helpers import wait_until

USERS = 20_000


def update(cid: str, percent) -> dict:
    return {"type": "UpdateSegment", "command_id": cid, "slug": "R", "auto_percent": percent}


def between(low: int, high: int) -> set[int]:
    """The known users a move from `low` to `high` buckets concerns (segment R is the database's first)."""
    return {u for u in range(1, USERS + 1) if low <= bucket(segment_salt("R", 1), u) < high}


async def rollout_of(database_url, percent: int):
    """Segment R at 0 % over USERS known users; its UpdateSegment to `percent` on a connection of its own, a slice
    of 200 users per statement and a commit after each."""
    executor = await asyncpg.connect(database_url)
    f = Feeder(executor, fan_out_slice=200, fan_out_pass_seconds=0)
    await f.apply(create("R"))
    await executor.execute("INSERT INTO users (user_id, registered_at) SELECT g, now() FROM generate_series(1, $1) g",
                           USERS)
    return executor, f


async def frozen_between_passes(conn) -> asyncpg.Record:
    """Inside a transaction of `conn`: wait for a rollout's first pass, then hold its progress row so that its next
    pass waits. Returns the row (how far it got)."""
    await wait_until(lambda: conn.fetchval("SELECT count(*) FROM fan_outs"), interval=0.001, message="a first pass")
    row = await conn.fetchrow("SELECT * FROM fan_outs FOR UPDATE")
    assert row is not None, "the rollout ended before it could be held"
    return row


async def test_a_rollout_commits_pass_by_pass_and_its_result_comes_with_the_last(database_url, conn, caplog):
    executor, f = await rollout_of(database_url, 30)
    try:
        with caplog.at_level(logging.INFO, "segmentation.worker"):
            report = await f.apply(update("to-30", 30))
    finally:
        await executor.close()
    f = Feeder(conn)  # what was written, read on the test's connection
    passes = [r for r in caplog.records if r.getMessage() == "rollout pass"]
    assert len(passes) >= 10 and all(r.command_id == "to-30" for r in passes)  # one per slice of 200
    joined = between(0, 3000)
    assert report.events == len(joined) and dict(report.outcomes) == {("UpdateSegment", "applied"): 1}
    results = await f.results()
    assert [r["events"] for r in results["to-30"]] == [len(joined)]  # one result, with every event
    events = await f.events()
    assert sorted(u for _, u, _, _ in events) == sorted(joined)  # one event per user, none twice
    assert await f.members("R") == joined
    assert await conn.fetchval("SELECT count(*) FROM membership_history") == len(joined)
    assert await conn.fetchval("SELECT count(*) FROM fan_outs") == 0
    assert await conn.fetchval("SELECT next_offset FROM consumer_offsets") == 2


async def test_a_rollout_cut_off_between_passes_is_resumed_where_it_stopped(database_url, conn):
    executor, f = await rollout_of(database_url, 30)
    record = f.record(update("to-30", 30))
    running = asyncio.create_task(f.processor.process(executor, [record]))
    async with conn.transaction():
        held = await frozen_between_passes(conn)
        await conn.execute("SELECT pg_terminate_backend($1)", executor.get_server_pid())  # the worker is gone
        with pytest.raises(errors.DATABASE_FAILURE):  # what the worker retries
            await running
    f = Feeder(conn)  # what was written, read on the test's connection
    done = {e[1] for e in await f.events()}
    assert 0 < len(done) < len(between(0, 3000)) and max(done) <= held["after_user"]
    assert "to-30" not in await f.results() and await conn.fetchval("SELECT next_offset FROM consumer_offsets") == 1

    other = Feeder(conn)  # the same id with another body, meanwhile: a conflict, and the rollout stays as it was
    await other.apply(update("to-30", 50), partition=1)
    assert (await other.result("to-30"))["error"]["code"] == "IDEMPOTENCY_CONFLICT"

    again = Feeder(conn)  # the partition's next owner reads the command again
    report = await again.processor.process(conn, [record])
    joined = between(0, 3000)
    assert report.events == len(joined)
    assert [r["events"] for r in (await f.results())["to-30"] if r["status"] == "applied"] == [len(joined)]
    users = [e[1] for e in await f.events()]
    assert sorted(users) == sorted(joined)  # the slices before the cut are not done twice, none is left out
    assert await f.members("R") == joined
    assert await conn.fetchval("SELECT count(*) FROM membership_history") == len(joined)
    assert await conn.fetchval("SELECT count(*) FROM fan_outs") == 0
    assert await conn.fetchval("SELECT next_offset FROM consumer_offsets WHERE partition = 0") == 2


async def test_users_commands_between_two_passes_are_applied_at_the_new_percent(database_url, conn):
    """Lowering the percent: two users above the new line whose rollout memberships the rollout has not reached yet.
    Their commands do not wait for it (a wait in a part of a batch before the rollout's own would wait for itself):
    an explicit add takes the rollout membership over, a remove deletes it; the rollout leaves both alone."""
    executor, f = await rollout_of(database_url, 30)
    await f.apply(update("to-30", 30))
    user_conn = await asyncpg.connect(database_url)
    try:
        lowering = asyncio.create_task(f.apply(update("to-10", 10)))
        async with conn.transaction():
            held = await frozen_between_passes(conn)
            kept, dropped = sorted(u for u in between(1000, 3000) if u > held["after_user"])[:2]  # not reached yet
            # The read side answers the new percent already: a rollout membership counts inside the line only.
            assert await conn.fetchval("SELECT source FROM memberships WHERE user_id = $1", kept) == "auto_percent"
            assert [r["slug"] for r in await conn.fetch(views.USER_SEGMENTS, kept)] == []
            users = Feeder(user_conn)
            await asyncio.wait_for(users.apply(update_user("add", kept, add=["R"]),  # while the rollout is held
                                               update_user("drop", dropped, remove=["R"]), partition=1), 30)
        await asyncio.wait_for(lowering, 60)
    finally:
        await executor.close()
        await user_conn.close()
    f = Feeder(conn)  # what was written, read on the test's connection
    assert await f.members("R") == between(0, 1000) | {kept}
    assert await conn.fetchval("SELECT source FROM memberships WHERE user_id = $1", kept) == "manual"
    assert [e[0] for e in await f.events(kept)] == ["added"]  # still a member, now an explicit one: no event
    assert [(e[0], e[3]) for e in await f.events(dropped)] == [("added", "auto_percent"), ("removed", "command")]
    assert await conn.fetchval("SELECT count(*) FROM exclusions WHERE user_id = $1", dropped) == 1
    assert [r["slug"] for r in await conn.fetch(views.USER_SEGMENTS, kept)] == ["R"]


async def test_a_wait_for_a_rollout_lasts_while_it_progresses_and_gives_up_when_it_stalls(conn):
    from service.write.rollouts import poll

    await conn.execute("SET lock_timeout = '300ms'")
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def progressing() -> object:  # a pass every 0.1 s, done after 1 s: three times the lock_timeout
        elapsed = loop.time() - started
        return True if elapsed > 1.0 else int(elapsed * 10)
    await poll(conn, progressing, "the rollout made no progress")
    assert loop.time() - started > 1.0

    async def stalled() -> object:
        return "the same pass"
    started = loop.time()
    with pytest.raises(asyncpg.exceptions.LockNotAvailableError, match="the rollout made no progress"):
        await poll(conn, stalled, "the rollout made no progress")
    assert 0.3 <= loop.time() - started < 1.0


async def test_a_command_reusing_the_id_of_a_rollout_in_progress_is_a_conflict(database_url, conn):
    executor, f = await rollout_of(database_url, 30)
    await f.apply(create("X"))
    running = asyncio.create_task(f.apply(update("to-30", 30)))
    other = Feeder(await asyncpg.connect(database_url))
    try:
        async with conn.transaction():
            await frozen_between_passes(conn)
            await other.apply(update_user("to-30", 5, add=["X"]), partition=1)  # a publisher's bug
        await asyncio.wait_for(running, 60)
    finally:
        await executor.close()
        await other.conn.close()
    f = Feeder(conn)
    results = (await f.results())["to-30"]
    assert [(r["type"], r["status"], r["error"] and r["error"]["code"]) for r in results] == [
        ("UpdateUserSegments", "rejected", "IDEMPOTENCY_CONFLICT"), ("UpdateSegment", "applied", None)]
    assert results[1]["events"] == len(between(0, 3000)) and await f.members("R") == between(0, 3000)
    assert await f.members("X") == set() and await conn.fetchval("SELECT count(*) FROM fan_outs") == 0
    assert await conn.fetchval("SELECT type FROM processed_commands WHERE command_id = 'to-30'") == "UpdateSegment"


async def test_a_duplicate_of_a_rollout_read_during_its_first_pass_joins_it(database_url, conn):
    """The same CreateSegment on another partition, decided while the first pass had not committed: it waits for
    the rollout lock, then finds the segment. Stored as SEGMENT_EXISTS it would have left the rollout half done."""
    await conn.execute("INSERT INTO users (user_id, registered_at) SELECT g, now() FROM generate_series(1, $1) g",
                       USERS)
    first, second, blocker = [await asyncpg.connect(database_url) for _ in range(3)]
    try:
        a = Feeder(first, fan_out_slice=200, fan_out_pass_seconds=0)
        b = Feeder(second, fan_out_slice=200, fan_out_pass_seconds=0)
        body = create("S", "c-S", 30)
        held = blocker.transaction()  # the first pass waits at its progress row, uncommitted
        await held.start()
        try:
            await blocker.execute(
                "INSERT INTO fan_outs (command_id, body_hash, segment_id, slug, salt, joining, low_line, occurred_at, "
                "after_user, events) VALUES ('c-S', '', 0, '', '', true, 0, now(), 0, 0)")
            applying = asyncio.create_task(a.apply(body))
            await wait_until(lambda: conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND "
                                                   "wait_event_type = 'Lock'", first.get_server_pid()),
                             message="the first pass at its progress row")
            duplicate = asyncio.create_task(b.apply(body, partition=1))
            await wait_until(lambda: conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND "
                                                   "query LIKE '%pg_try_advisory_xact_lock%'", second.get_server_pid()),
                             interval=0.001, message="the duplicate waiting for the rollout lock")
        finally:
            await held.rollback()
        await asyncio.wait_for(asyncio.gather(applying, duplicate), 60)
    finally:
        for c in (first, second, blocker):
            await c.close()
    f = Feeder(conn)
    joined = {u for u in range(1, USERS + 1) if bucket(segment_salt("S", 1), u) < 3000}
    results = (await f.results())["c-S"]
    assert [(r["status"], r["events"]) for r in results] == [("applied", len(joined))] * 2  # the result, and again
    assert await f.members("S") == joined and sorted(e[1] for e in await f.events()) == sorted(joined)
    assert await conn.fetchval("SELECT count(*) FROM fan_outs") == 0


async def test_a_range_a_lowered_segment_frees_in_its_layer_is_free_once_its_rollout_is_done(database_url, conn):
    executor = await asyncpg.connect(database_url)
    other = await asyncpg.connect(database_url)
    try:
        await conn.execute("INSERT INTO users (user_id, registered_at) SELECT g, now() FROM generate_series(1, $1) g",
                           USERS)
        f = Feeder(executor, fan_out_slice=200, fan_out_pass_seconds=0)
        await f.apply({"type": "CreateSegment", "command_id": "cA", "slug": "A", "layer": "L", "auto_percent": 30})
        lowering = asyncio.create_task(f.apply({"type": "UpdateSegment", "command_id": "lowA", "slug": "A",
                                                "auto_percent": 10}))
        async with conn.transaction():
            await frozen_between_passes(conn)
            creating = asyncio.create_task(Feeder(other).apply(
                {"type": "CreateSegment", "command_id": "cB", "slug": "B", "layer": "L", "auto_percent": 20},
                partition=1))

            async def waiting() -> bool:
                if creating.done():
                    return True
                await conn.execute("SELECT pg_stat_clear_snapshot()")
                return await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND "
                                           "query LIKE '%fan_outs f JOIN segments%'", other.get_server_pid())
            await wait_until(waiting, message="B waiting for A's rollout (or done)")
        await asyncio.wait_for(asyncio.gather(lowering, creating), 60)
    finally:
        await executor.close()
        await other.close()
    changes: dict[int, list[tuple]] = {}
    for change, user, slug, _ in await Feeder(conn).events():
        changes.setdefault(user, []).append((change, slug))
    moved = [u for u, c in changes.items() if ("added", "B") in c]
    assert moved and all(changes[u].index(("removed", "A")) < changes[u].index(("added", "B")) for u in moved)


async def test_a_failure_of_a_later_pass_is_retried_never_rejected(database_url, conn, monkeypatch):
    from service.write import rollouts

    executor, f = await rollout_of(database_url, 30)
    real, calls = rollouts.run, []

    async def failing_third_pass(*args):
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("a bug met in a later pass")
        return await real(*args)
    monkeypatch.setattr(rollouts, "run", failing_third_pass)
    record = f.record(update("to-30", 30))
    try:
        with pytest.raises(errors.UnfinishedWorkError):  # what the worker retries (errors.RETRIED), whatever it was
            await f.processor.process(executor, [record])
        assert "to-30" not in await f.results() and await f.outbox("dlq") == []
        report = await f.processor.process(executor, [record])  # the worker's retry
    finally:
        await executor.close()
    assert report.events == len(between(0, 3000)) and await Feeder(conn).members("R") == between(0, 3000)


async def test_a_worker_letting_its_partitions_go_stops_a_rollout_between_two_passes(database_url, conn):
    """A rebalance or a shutdown does not wait for a long rollout: the partition's next owner resumes it."""
    executor, f = await rollout_of(database_url, 30)
    passes = []
    f.processor.should_stop = lambda: len(passes) >= 3
    record = f.record(update("to-30", 30))
    real_run = f.processor._apply_in_transaction

    async def counted(*args):
        passes.append(1)
        return await real_run(*args)
    f.processor._apply_in_transaction = counted
    try:
        with pytest.raises(errors.UnfinishedWorkError):  # the worker gives the batch up (it is revoking)
            await f.processor.process(executor, [record])
        assert len(passes) == 3 and await conn.fetchval("SELECT events FROM fan_outs") > 0
        again = Feeder(conn)
        report = await again.processor.process(conn, [record])
    finally:
        await executor.close()
    assert report.events == len(between(0, 3000)) and await again.members("R") == between(0, 3000)


async def test_a_batch_resumes_its_rollouts_before_the_segment_commands_that_wait_for_them(database_url, conn):
    """A lowering in a layer cut between passes; the next owner's batch holds a creation in that layer on a
    partition sorted before the lowering's: it must not wait for a part of its own batch."""
    executor = await asyncpg.connect(database_url)
    await conn.execute("INSERT INTO users (user_id, registered_at) SELECT g, now() FROM generate_series(1, $1) g",
                       USERS)
    f = Feeder(executor, fan_out_slice=200, fan_out_pass_seconds=0)
    await f.apply({"type": "CreateSegment", "command_id": "cA", "slug": "A", "layer": "L", "auto_percent": 30},
                  partition=1)
    lowering = f.record({"type": "UpdateSegment", "command_id": "lowA", "slug": "A", "auto_percent": 10}, partition=1)
    running = asyncio.create_task(f.processor.process(executor, [lowering]))
    async with conn.transaction():
        await frozen_between_passes(conn)
        await conn.execute("SELECT pg_terminate_backend($1)", executor.get_server_pid())
        with pytest.raises(errors.DATABASE_FAILURE):
            await running
    again = Feeder(conn)
    creating = again.record({"type": "CreateSegment", "command_id": "cB", "slug": "B", "layer": "L",
                             "auto_percent": 20}, partition=0)
    await conn.execute("SET lock_timeout = '2s'")  # a wait for its own batch would end in LockNotAvailableError
    await again.processor.process(conn, [creating, lowering])
    await conn.execute("RESET lock_timeout")
    results = await again.results()
    assert [results[c][-1]["status"] for c in ("lowA", "cB")] == ["applied", "applied"]
    assert await conn.fetchval(
        "SELECT count(*) FROM memberships a JOIN memberships b USING (user_id) "
        "WHERE a.segment_id = 1 AND b.segment_id = 2") == 0


async def test_a_users_remove_committed_during_a_pass_is_not_lost(database_url, conn):
    """A raise: a user's remove (its exclusion written, not committed yet) while the rollout's next pass starts.
    The pass waits for the user's command (it holds the segment's row for update, as a fan-out always did): a
    slice that read the exclusions before the remove committed would have added the user anyway."""
    executor, f = await rollout_of(database_url, 30)
    running = asyncio.create_task(f.apply(update("to-30", 30)))
    remover = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            held = await frozen_between_passes(conn)
            user = min(between(0, 3000) - set(range(held["after_user"] + 1)))  # the next slice's first joiner
            removing = remover.transaction()
            await removing.start()  # as a user's command does: the segment for share, then its writes
            await remover.execute("SELECT 1 FROM segments WHERE id = 1 FOR SHARE")
            await remover.execute("INSERT INTO exclusions (user_id, segment_id, excluded_at) VALUES ($1, 1, now())",
                                  user)
        # The rollout goes on: it waits for the remove, or (without the row lock) adds the user meanwhile.
        await wait_until(lambda: conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND wait_event_type = 'Lock'",
            executor.get_server_pid()) if not running.done() else asyncio.sleep(0, True),
            message="the pass waiting for the user's command")
        await removing.commit()
        await asyncio.wait_for(running, 60)
    finally:
        await executor.close()
        await remover.close()
    assert user not in await Feeder(conn).members("R")
