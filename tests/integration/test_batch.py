"""The write path against a real PostgreSQL: rules, idempotency, dead letters, fan-outs, history."""
import asyncio
import uuid
from datetime import timedelta

import orjson
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from schemas.common import MAX_USER_ID, SLUG_PATTERN
from schemas.events import MembershipChanged
from service.bucket import bucket, layer_salt, segment_salt
from service.domain import Change, Segment
from service.write import sql
from service.write.change_set import ChangeSet
from service.write.decoding import InboundRecord
from service.write.outbox import membership_event
from tests.support.batch import Feeder, create, update_user


async def test_rejection_codes(conn):
    f = Feeder(conn)
    await f.apply(create("A"), create("A", cid="again"),
                  update_user("nf", 1, add=["A", "NOPE"], remove=["GONE"]),
                  update_user("inv", 1, add=["A"], remove=["A"]),
                  {"type": "DeleteSegment", "command_id": "del-missing", "slug": "NOPE"},
                  {"type": "UpdateSegment", "command_id": "upd-missing", "slug": "NOPE", "description": "x"})
    codes = {cid: (r[-1]["status"], r[-1]["error"] and r[-1]["error"]["code"]) for cid, r in (await f.results()).items()}
    assert codes == {
        "create-A": ("applied", None), "again": ("rejected", "SEGMENT_EXISTS"),
        "nf": ("rejected", "SEGMENT_NOT_FOUND"), "inv": ("rejected", "INVALID_COMMAND"),
        "del-missing": ("rejected", "SEGMENT_NOT_FOUND"), "upd-missing": ("rejected", "SEGMENT_NOT_FOUND"),
    }
    assert (await f.result("nf"))["error"]["details"] == {"slugs": ["GONE", "NOPE"]}
    assert await f.members("A") == set()  # nothing half-applied
    assert await conn.fetchval("SELECT count(*) FROM users") == 0


async def test_duplicate_republishes_the_stored_result_and_a_changed_body_conflicts(conn):
    f = Feeder(conn)
    await f.apply(create("A"), update_user("u1", 7, add=["A"]))
    first = await f.result("u1")
    await f.apply(update_user("u1", 7, add=["A"]), update_user("u1", 7, add=["A"], remove=[]),
                  update_user("u1", 7, remove=["A"]))
    results = (await f.results())["u1"]
    assert results[1] == first and results[2] == first  # the same stored result, again
    assert results[3]["status"] == "rejected" and results[3]["error"]["code"] == "IDEMPOTENCY_CONFLICT"
    assert await f.members("A") == {7}
    assert await f.events(7) == [("added", 7, "A", "command")]
    stored = await conn.fetchval("SELECT result::text FROM processed_commands WHERE command_id = 'u1'")
    assert '"applied"' in stored


async def test_duplicates_inside_one_batch(conn):
    f = Feeder(conn)
    await f.apply(create("A"), update_user("u1", 7, add=["A"]), update_user("u1", 7, add=["A"]))
    assert [r["status"] for r in (await f.results())["u1"]] == ["applied", "applied"]
    assert len(await f.events(7)) == 1


async def test_poison_messages_go_to_the_dlq_and_the_partition_goes_on(conn):
    f = Feeder(conn)
    await f.apply(create("A"), b"not json", b"[1]", {"type": "Explode", "command_id": "boom"},
                  {"type": "UpdateUserSegments", "command_id": "bad-field", "user_id": "x"},
                  update_user("good", 3, add=["A"]))
    dlq = await f.outbox("dlq")
    assert [h["error.code"] for _, h, _ in dlq] == ["INVALID_JSON", "NOT_AN_OBJECT", "UNKNOWN_TYPE", "INVALID_FIELDS"]
    payload, headers, _ = dlq[0]
    assert bytes(payload) == b"not json"
    assert headers["source.topic"] == "commands" and headers["source.partition"] == "0"
    assert headers["source.offset"] == "1" and headers["error.message"]
    results = await f.results()
    assert results["boom"][0]["status"] == "rejected" and results["boom"][0]["type"] == "Explode"
    assert results["bad-field"][0]["error"]["code"] == "INVALID_COMMAND"
    assert results["good"][0]["status"] == "applied"
    assert await f.members("A") == {3}
    # A dead letter's result is published, not stored: the same bad message again is rejected again, and the
    # corrected command is applied under that id.
    assert await conn.fetchval("SELECT count(*) FROM processed_commands WHERE command_id IN ('boom', 'bad-field')") == 0
    await f.apply({"type": "Explode", "command_id": "boom"})
    assert [h["error.code"] for _, h, _ in await f.outbox("dlq")][-1] == "UNKNOWN_TYPE"
    assert [r["status"] for r in (await f.results())["boom"]] == ["rejected", "rejected"]
    await f.apply(update_user("bad-field", 4, add=["A"]))
    assert (await f.result("bad-field"))["status"] == "applied" and await f.members("A") == {3, 4}


async def test_a_batch_is_applied_once_even_when_redelivered(conn):
    f = Feeder(conn)
    records = [f.record(create("A")), f.record(update_user("u1", 1, add=["A"]))]
    await f.processor.process(conn, records)
    report = await f.processor.process(conn, records)
    assert report.skipped == 2
    assert len(await f.events()) == 1
    assert await conn.fetchval("SELECT next_offset FROM consumer_offsets") == 2


async def test_delete_segment_removes_every_member_and_the_slug_can_come_back(conn):
    f = Feeder(conn)
    await f.apply(create("A"), *[update_user(f"u{u}", u, add=["A"]) for u in range(1, 6)])
    await f.apply({"type": "DeleteSegment", "command_id": "del", "slug": "A"})
    removed = [e for e in await f.events() if e[0] == "removed"]
    assert sorted(removed) == [("removed", u, "A", "segment_deleted") for u in range(1, 6)]
    assert (await f.result("del"))["events"] == 5
    await f.apply(create("A", cid="again"), update_user("u9", 9, add=["A"]))
    assert await f.members("A") == {9}
    assert (await f.result("again"))["status"] == "applied"
    history = await conn.fetch("SELECT operation, reason FROM membership_history WHERE user_id = 1 ORDER BY id")
    assert [tuple(r) for r in history] == [("added", "command"), ("removed", "segment_deleted")]
    segments = await conn.fetch("SELECT salt, deleted_at FROM segments WHERE slug = 'A' ORDER BY id")
    assert segments[0]["deleted_at"] is not None and segments[1]["deleted_at"] is None
    assert segments[0]["salt"] != segments[1]["salt"]  # a re-created slug draws anew


async def test_ttl_expiry_is_applied_only_when_still_due(conn):
    f = Feeder(conn)
    await f.apply(create("A"), update_user("u1", 1, add=[{"slug": "A", "ttl_seconds": 60}]))
    expires_at = await conn.fetchval("SELECT expires_at FROM memberships")
    expire = {"type": "ExpireMembership", "command_id": "exp-early", "user_id": 1, "slug": "A",
              "expires_at": expires_at.isoformat()}
    await f.apply(expire)
    assert await f.members("A") == {1}  # not due yet
    f.now += timedelta(seconds=61)
    await f.apply(expire | {"command_id": "exp"})
    assert await f.members("A") == set()
    assert (await f.events(1))[-1] == ("removed", 1, "A", "expired")
    row = await conn.fetchrow("SELECT occurred_at, reason FROM membership_history ORDER BY id DESC LIMIT 1")
    assert row["occurred_at"] == expires_at and row["reason"] == "expired"


async def test_rollout_deltas_are_exact(conn):
    f = Feeder(conn)
    users = list(range(1, 2001))
    await f.apply({"type": "RegisterUsers", "command_id": "reg", "user_ids": users})
    await f.apply(create("R", percent=10))
    salt = await conn.fetchval("SELECT salt FROM segments WHERE slug = 'R'")
    expected = {u for u in users if bucket(salt, u) < 1000}
    assert await f.members("R") == expected
    excluded = min(expected)
    await f.apply(update_user("ex", excluded, remove=["R"]))
    explicit = next(u for u in users if 1000 <= bucket(salt, u) < 2000)
    await f.apply(update_user("explicit", explicit, add=["R"]))
    before = len(await f.events())
    await f.apply({"type": "UpdateSegment", "command_id": "up", "slug": "R", "auto_percent": 20})
    added = {e[1] for e in (await f.events())[before:]}
    assert added == {u for u in users if 1000 <= bucket(salt, u) < 2000} - {explicit}
    assert excluded not in await f.members("R")
    before = len(await f.events())
    await f.apply({"type": "UpdateSegment", "command_id": "down", "slug": "R", "auto_percent": 5})
    removed = {e[1] for e in (await f.events())[before:]}
    assert removed == {u for u in users if 500 <= bucket(salt, u) < 2000} - {explicit, excluded}
    assert explicit in await f.members("R")  # explicit members never leave with the percent
    assert await f.members("R") == {u for u in users if bucket(salt, u) < 500} - {excluded} | {explicit}


async def test_sql_bucket_matches_the_documented_formula(conn):
    for salt, user in [("A:1", 1), ("AVITO_DISCOUNT_30:17", 1000), ("x", 2**63 - 1)]:
        assert await conn.fetchval("SELECT segment_bucket($1, $2)", salt, user) == bucket(salt, user)
    for salt in ("a.b-c_D9:12", "Z:1"):  # every slug character
        rows = await conn.fetch("SELECT g, segment_bucket($1, g) AS b FROM generate_series(1, 3000) g", salt)
        assert all(r["b"] == bucket(salt, r["g"]) for r in rows)
    # Inlined into the query (its body is immutable): no function call per row.
    plan = "\n".join(r[0] for r in await conn.fetch(
        "EXPLAIN (VERBOSE) SELECT segment_bucket('A:1', g) FROM generate_series(1, 3) g"))
    assert "sha256" in plan and "segment_bucket" not in plan


slugs = st.from_regex(SLUG_PATTERN, fullmatch=True)
service_salts = st.one_of(st.builds(segment_salt, slugs, st.integers(1, 2**63 - 1)), st.builds(layer_salt, slugs))


@hypothesis_settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pairs=st.lists(st.tuples(service_salts, st.integers(1, MAX_USER_ID)), min_size=1, max_size=100))
async def test_sql_bucket_equals_the_python_one_for_every_salt_the_service_makes(conn, pairs):
    salts, users = zip(*pairs, strict=True)
    rows = await conn.fetch("SELECT segment_bucket(s, u) FROM unnest($1::text[], $2::bigint[]) WITH ORDINALITY "
                            "AS t(s, u, n) ORDER BY n", salts, users)
    assert [r[0] for r in rows] == [bucket(s, u) for s, u in pairs]


@pytest.mark.parametrize("raw, code", [
    (b'{"type": ["UpdateUserSegments"], "command_id": "c1"}', "UNKNOWN_TYPE"),
    (b'{"type": {}, "command_id": "c2"}', "UNKNOWN_TYPE"),
    (b"[" * 100_000 + b"]" * 100_000, "INVALID_JSON"),
    (b'{"type": "CreateSegment", "command_id": "bad\\u0000id", "slug": "A"}', "INVALID_FIELDS"),
    (b'{"type": "CreateSegment", "command_id": "ok", "slug": "A", "\\u0000": 1}', "INVALID_FIELDS"),
    (b'{"type": "Nope\\u0000", "command_id": "ok-id"}', "UNKNOWN_TYPE"),
    (b'{"type": "Nope", "command_id": "a\\ud800b"}', "UNKNOWN_TYPE"),  # a lone surrogate: not storable
    (b'{"type": "X\\ud800", "command_id": "ok-id"}', "UNKNOWN_TYPE"),
    (b'{"type": "CreateSegment", "command_id": "x", "slug": "A", "issued_at": "0001-01-01T00:00:00+23:59"}',
     "INVALID_FIELDS"),  # out of range once in UTC
])
async def test_hostile_messages_are_dead_letters_not_crashes(conn, raw, code):
    f = Feeder(conn)
    await f.apply(raw, create("AFTER"))
    assert [h["error.code"] for _, h, _ in await f.outbox("dlq")] == [code]
    assert (await f.result("create-AFTER"))["status"] == "applied"


async def test_an_expiry_seen_before_its_time_still_counts_when_sent_again(conn):
    from producers.ttl import command_id

    f = Feeder(conn)
    await f.apply(create("A"), update_user("u1", 1, add=[{"slug": "A", "ttl_seconds": 60}]))
    expires_at = await conn.fetchval("SELECT expires_at FROM memberships")
    cmd = {"type": "ExpireMembership", "command_id": command_id(b"key", "expire", 1, "A", expires_at),
           "user_id": 1, "slug": "A", "expires_at": expires_at.isoformat()}
    f.now = expires_at - timedelta(milliseconds=20)  # this worker's clock is behind the TTL producer's
    await f.apply(cmd)
    assert await f.members("A") == {1}
    f.now = expires_at + timedelta(seconds=10)  # the TTL producer publishes the same command again
    await f.apply(cmd)
    assert await f.members("A") == set()


async def test_deleting_a_segment_reports_an_already_expired_membership_as_an_expiry(conn):
    f = Feeder(conn)
    await f.apply(create("A"), update_user("u1", 1, add=[{"slug": "A", "ttl_seconds": 60}]), update_user("u2", 2, add=["A"]))
    expires_at = await conn.fetchval("SELECT expires_at FROM memberships WHERE user_id = 1")
    f.now = expires_at + timedelta(seconds=30)  # expired; its ExpireMembership not applied yet
    await f.apply({"type": "DeleteSegment", "command_id": "del", "slug": "A"})
    rows = await conn.fetch("SELECT user_id, occurred_at, reason FROM membership_history "
                            "WHERE operation = 'removed' ORDER BY user_id")
    assert [tuple(r) for r in rows] == [(1, expires_at, "expired"), (2, f.now, "segment_deleted")]
    events = {e["user_id"]: e for e in await f.outbox("membership") if e["change"] == "removed"}
    assert events[1]["reason"] == "expired" and events[1]["occurred_at"] == expires_at.isoformat().replace("+00:00", "Z")
    assert events[2]["reason"] == "segment_deleted"


async def test_an_oversized_dead_letter_is_truncated_and_says_so(conn):
    f = Feeder(conn)
    await f.apply(b"x" * 2_000_000)
    payload, headers, _ = (await f.outbox("dlq"))[0]
    assert len(payload) == 900_000 and headers["error.truncated"] == "2000000"


async def test_a_dead_lettered_tombstone_stays_a_tombstone(conn):
    f = Feeder(conn)
    await f.processor.process(conn, [InboundRecord("commands", 0, 0, b"k", None)])
    payload, headers, key = (await f.outbox("dlq"))[0]
    assert payload is None and headers["error.code"] == "INVALID_JSON" and bytes(key) == b"k"


async def test_an_early_expiry_sent_twice_in_one_batch(conn):
    f = Feeder(conn)
    await f.apply(create("A"), update_user("u1", 1, add=[{"slug": "A", "ttl_seconds": 3600}]))
    expires_at = await conn.fetchval("SELECT expires_at FROM memberships")
    cmd = {"type": "ExpireMembership", "command_id": "exp-x", "user_id": 1, "slug": "A",
           "expires_at": expires_at.isoformat()}
    report = await f.apply(cmd, cmd)  # a producer retry, before its time
    assert "exp-x" not in await f.results()  # nothing decided: no result (the due one gets the only one)
    assert report.outcomes[("ExpireMembership", "not_due")] == 2
    assert await f.members("A") == {1}
    f.now = expires_at + timedelta(seconds=1)  # due: the command's one result
    await f.apply(cmd)
    assert [(r["status"], r["events"]) for r in (await f.results())["exp-x"]] == [("applied", 1)]


async def test_counts_survive_a_retry_after_a_partly_committed_batch(conn, monkeypatch):
    import asyncpg

    from service.write import batch as batch_module

    f = Feeder(conn)
    records = [f.record(update_user("a", 1)), f.record(create("B")), f.record(update_user("b", 2))]
    original = batch_module._Part.apply_segment_command
    failed = []

    async def fail_once(self, d):
        if not failed:
            failed.append(d)
            raise asyncpg.exceptions.DeadlockDetectedError("deadlock detected")
        return await original(self, d)

    monkeypatch.setattr(batch_module._Part, "apply_segment_command", fail_once)
    report = batch_module.BatchReport()  # the worker keeps one across its retries
    with pytest.raises(asyncpg.exceptions.DeadlockDetectedError):
        await f.processor.process(conn, records, report)
    await f.processor.process(conn, records, report)
    assert sum(report.outcomes.values()) == 3 and report.skipped == 1


async def test_a_run_redone_record_by_record_is_counted_once(conn, monkeypatch):
    import asyncpg

    from service.write.change_set import ChangeSet

    f = Feeder(conn)
    await f.apply(create("A"))
    original = ChangeSet._write_state
    calls = []

    async def fail_first_run(self, c):
        if self.before and not calls:
            calls.append(1)
            raise asyncpg.exceptions.CheckViolationError("refused")
        return await original(self, c)

    monkeypatch.setattr(ChangeSet, "_write_state", fail_first_run)
    report = await f.apply(update_user("a", 1, add=["A"]), update_user("b", 2, add=["A"]))
    assert report.outcomes[("UpdateUserSegments", "applied")] == 2 and report.events == 2
    assert await f.members("A") == {1, 2}


async def test_a_record_that_breaks_the_worker_is_quarantined_and_the_partition_goes_on(conn, monkeypatch):
    from service.write import user_handlers

    f = Feeder(conn)
    await f.apply(create("A"))
    original = user_handlers.slugs_of

    def broken(cmd):  # a bug that only this command's content triggers
        if getattr(cmd, "command_id", "") == "poison":
            raise KeyError("boom")
        return original(cmd)

    monkeypatch.setattr(user_handlers, "slugs_of", broken)
    await f.apply(update_user("before", 1, add=["A"]), update_user("poison", 2, add=["A"]),
                  update_user("after", 3, add=["A"]))
    assert await f.members("A") == {1, 3}
    payload, headers, _ = (await f.outbox("dlq"))[0]
    assert headers["error.code"] == "UNPROCESSABLE" and b'"poison"' in bytes(payload)


async def test_a_stored_result_is_published_again_byte_for_byte(conn):
    f = Feeder(conn)
    await f.apply(create("A"), update_user("u1", 7, add=["A"], ttl_seconds=60))
    await f.apply(update_user("u1", 7, add=["A"], ttl_seconds=60))  # another batch: read back from the inbox
    published = [bytes(r["payload"]) for r in await conn.fetch(
        "SELECT payload FROM outbox WHERE kind = 'result' AND key = 'u1'::bytea ORDER BY seq")]
    assert len(published) == 2 and published[1] == published[0]
    stored = await conn.fetchval("SELECT result FROM processed_commands WHERE command_id = 'u1'")
    assert stored.encode() == published[0]  # GET /commands/{id} answers the same bytes


@pytest.mark.parametrize("bug", [KeyError, ValueError, ArithmeticError])
async def test_a_quarantined_record_gets_a_rejected_result_that_is_not_stored(conn, monkeypatch, bug):
    """A rule decides by raising CommandRejectedError; anything else a handler raises is a bug, not a decision."""
    from schemas.commands import UpdateUserSegments
    from service.write import batch as batch_module

    f = Feeder(conn)
    await f.apply(create("A"))
    original = batch_module.USER_HANDLERS[UpdateUserSegments]

    def broken(cmd, ctx):
        if cmd.command_id == "poison":
            raise bug("boom")
        return original(cmd, ctx)

    monkeypatch.setitem(batch_module.USER_HANDLERS, UpdateUserSegments, broken)
    await f.apply(update_user("poison", 2, add=["A"]))
    result = await f.result("poison")
    assert result["status"] == "rejected" and result["error"]["details"] == {"dead_letter": "UNPROCESSABLE"}
    assert await conn.fetchval("SELECT count(*) FROM processed_commands WHERE command_id = 'poison'") == 0
    monkeypatch.setitem(batch_module.USER_HANDLERS, UpdateUserSegments, original)  # fixed: the replay applies
    await f.apply(update_user("poison", 2, add=["A"]))
    assert (await f.result("poison"))["status"] == "applied" and await f.members("A") == {2}


async def test_member_counts_follow_every_kind_of_change(conn):
    f = Feeder(conn)

    async def counted() -> None:  # the counters (migration 003's trigger) equal a count(*) of the memberships
        rows = await conn.fetch("""
            SELECT s.id, (SELECT count(*) FROM memberships m WHERE m.segment_id = s.id) AS actual,
                   (SELECT coalesce(sum(members), 0) FROM segment_member_counts c WHERE c.segment_id = s.id) AS kept
            FROM segments s""")
        assert rows and all(r["actual"] == r["kept"] for r in rows), [dict(r) for r in rows]

    await f.apply(create("A"), create("R", percent=50),
                  {"type": "RegisterUsers", "command_id": "reg", "user_ids": list(range(1, 201))})
    await counted()
    await f.apply(update_user("u1", 1, add=["A", "R"]), update_user("u2", 2, add=["A"]),
                  update_user("u3", 3, remove=["R"]), update_user("u1b", 1, remove=["A"]))
    await counted()
    await f.apply({"type": "UpdateSegment", "command_id": "down", "slug": "R", "auto_percent": 20})
    await f.apply({"type": "UpdateSegment", "command_id": "up", "slug": "R", "auto_percent": 70})
    await counted()
    await f.apply({"type": "DeleteSegment", "command_id": "del", "slug": "R"})
    await counted()
    assert await conn.fetchval("SELECT count(*) FROM memberships") > 0  # A still has members


async def test_a_record_that_keeps_timing_out_is_quarantined_after_bounded_retries(settings, monkeypatch):
    """A statement_timeout is retryable, but one record may cause it every time: after BATCH_RETRIES_ALONE
    failed retries the worker redoes the batch record by record; that record is quarantined, the others apply."""
    import asyncpg

    from consumers.worker import CommandWorker
    from schemas.commands import UpdateUserSegments
    from service.infra import db
    from service.write import batch as batch_module

    original = batch_module.USER_HANDLERS[UpdateUserSegments]
    calls = []

    def slow(cmd, ctx):
        if cmd.command_id == "poison":
            calls.append(1)
            raise asyncpg.exceptions.QueryCanceledError("canceling statement due to statement timeout")
        return original(cmd, ctx)

    monkeypatch.setitem(batch_module.USER_HANDLERS, UpdateUserSegments, slow)
    pool = await db.create_pool(settings, "worker", 1, 2)
    worker = CommandWorker(settings.model_copy(update={"batch_retries_alone": 2}), pool)
    try:
        async with pool.acquire() as conn:
            f = Feeder(conn)
            await f.apply(create("A"))
            records = [f.record(update_user(c, u, add=["A"])) for c, u in (("before", 1), ("poison", 2), ("after", 3))]
            report = batch_module.BatchReport()
            assert await asyncio.wait_for(worker.apply_with_retry(records, report), 60)
            assert len(calls) == 3  # two failed retries of the batch, then the record alone once
            assert await f.members("A") == {1, 3}
            payload, headers, _ = (await f.outbox("dlq"))[0]
            assert headers["error.code"] == "UNPROCESSABLE" and b'"poison"' in bytes(payload)
            assert (await f.result("poison"))["error"]["details"] == {"dead_letter": "UNPROCESSABLE"}
            assert await conn.fetchval("SELECT count(*) FROM processed_commands WHERE command_id = 'poison'") == 0
    finally:
        await worker.consumer.stop()
        await pool.close()


async def test_each_history_row_of_an_add_keeps_the_expiry_that_add_gave(conn):
    """Every writer of an `added` row says its expiry: the change set (an add, a later add in the same batch that
    changes the expiry, a scheduled start) and the set-based bulk add; removals and rollout joins carry none."""
    f = Feeder(conn)
    first, second = f.now + timedelta(hours=1), f.now + timedelta(hours=2)
    starts, ends = f.now + timedelta(minutes=5), f.now + timedelta(hours=3)
    await f.apply(create("A"), create("B"), create("R", percent=100),
                  update_user("one", 1, add=[{"slug": "A", "expires_at": first.isoformat()}]),
                  update_user("two", 1, add=[{"slug": "A", "expires_at": second.isoformat()}], remove=["B"]),
                  update_user("three", 2, add=[{"slug": "B", "starts_at": starts.isoformat(),
                                                "expires_at": ends.isoformat()}]),
                  {"type": "UpdateSegmentMembers", "command_id": "bulk", "slug": "B", "add": [3, 4],
                   "expires_at": second.isoformat()})
    f.now = starts
    await f.apply({"type": "StartMembership", "command_id": "start", "user_id": 2, "slug": "B",
                   "starts_at": starts.isoformat()})
    rows = await conn.fetch("SELECT command_id, user_id, slug, operation, reason, expires_at FROM membership_history "
                            "ORDER BY id")
    order = ["one", "two", "bulk", "start"]  # a bulk statement's rows in no particular order
    assert sorted((tuple(r) for r in rows if r["slug"] != "R"), key=lambda r: (order.index(r[0]), r[1])) == [
        ("one", 1, "A", "added", "command", first),
        ("two", 1, "A", "added", "command", second),
        ("bulk", 3, "B", "added", "command", second),
        ("bulk", 4, "B", "added", "command", second),
        ("start", 2, "B", "added", "scheduled", ends),
    ]
    assert {r["expires_at"] for r in rows if r["slug"] == "R"} == {None}  # rollout joins


async def test_every_set_based_fan_out_writes_the_event_the_python_path_would(conn):
    """Each statement of sql._fan_out (rollout add, listed add, rollout remove, segment deletion, expired drop, bulk
    add and remove), several slices a command: each payload is a MembershipChanged with the values the worker's own
    path (outbox.membership_event) writes, and its id is the name-based one of its command, segment, user, change
    and reason: one of a kind even for a user dropped as expired and added again by one command."""
    f = Feeder(conn, fan_out_slice=7)
    f.now = f.now.replace(microsecond=123456)
    t0, odd = f.now, 'bulk "1"\\\t\u00e9'  # a command id that JSON must escape
    users = list(range(1, 41))
    await f.apply(create("S"), {"type": "RegisterUsers", "command_id": "reg", "user_ids": users},
                  create("R", "rollout", percent=50))
    segments = {r["slug"]: Segment(r["id"], r["slug"], r["salt"])
                for r in await conn.fetch("SELECT id, slug, salt FROM segments")}
    r, s = segments["R"], segments["S"]
    expected = [("rollout", "added", u, r, "auto_percent", None, t0) for u in users if bucket(r.salt, u) < 5000]
    await f.apply({"type": "UpdateSegment", "command_id": "lower", "slug": "R", "auto_percent": 20})
    expected += [("lower", "removed", u, r, "auto_percent", None, t0) for u in users if 2000 <= bucket(r.salt, u) < 5000]
    new = next(u for u in range(1000, 2000) if bucket(r.salt, u) < 2000)  # registered by the bulk: joins R
    ttl_end = t0 + timedelta(hours=1)
    await f.apply({"type": "UpdateSegmentMembers", "command_id": odd, "slug": "S", "add": [1, 2, 3, 4, new],
                   "ttl_seconds": 3600})
    expected += [(odd, "added", u, s, "command", ttl_end, t0) for u in (1, 2, 3, 4, new)]
    expected += [(odd, "added", new, r, "auto_percent", None, t0)]
    f.now = t1 = t0 + timedelta(hours=2)  # S's memberships expired, their ExpireMembership not applied yet
    later = t1 + timedelta(hours=1, microseconds=5)
    await f.apply({"type": "UpdateSegmentMembers", "command_id": "again", "slug": "S", "add": [1, 2], "remove": [3],
                   "expires_at": later.isoformat()})
    expected += [("again", "removed", u, s, "expired", ttl_end, ttl_end) for u in (1, 2, 3)]
    expected += [("again", "added", u, s, "command", later, t1) for u in (1, 2)]
    await f.apply({"type": "UpdateSegmentMembers", "command_id": "drop", "slug": "S", "remove": [2]})
    expected += [("drop", "removed", 2, s, "command", later, t1)]
    await f.apply({"type": "DeleteSegment", "command_id": "delete", "slug": "S"})
    expected += [("delete", "removed", 1, s, "segment_deleted", later, t1)]
    expected += [("delete", "removed", u, s, "expired", ttl_end, ttl_end) for u in (4, new)]

    rows = await conn.fetch("SELECT key, payload, event_id FROM outbox WHERE kind = 'membership' ORDER BY seq")
    namespace = uuid.UUID(sql.FAN_OUT_EVENT_NAMESPACE)
    written, wanted = [], []
    for cid, change, user, seg, reason, expires_at, occurred_at in expected:
        event_id = str(uuid.uuid3(namespace, f"{seg.id}:{user}:{change}:{reason}:{cid}"))
        row = membership_event(Change(change, user, seg, reason, expires_at, occurred_at), cid)
        wanted.append((str(user).encode(), orjson.dumps(orjson.loads(row.payload) | {"event_id": event_id}), event_id))
    for row in rows:
        event = MembershipChanged.model_validate_json(row["payload"])
        assert event.event_id == row["event_id"] and uuid.UUID(row["event_id"]).version == 3
        written.append((row["key"], row["payload"], row["event_id"]))
    order = [e[0] for e in expected]

    def in_order(events: list[tuple]) -> list[tuple]:  # a statement's rows in no particular order
        return sorted(events, key=lambda e: (order.index(orjson.loads(e[1])["command_id"]), e[2]))
    assert in_order(written) == in_order(wanted)  # byte for byte
    assert len({w[2] for w in written}) == len(written) == len(expected) > 40


async def test_times_past_the_year_9998_are_refused_not_stored_as_infinity(conn):
    """asyncpg stores 9999-12-31T23:59:59.999999Z as `infinity` and reads it back as a naive datetime.max: a later
    command naming that membership could not compare it and was dead-lettered (found by a review)."""
    f = Feeder(conn)
    await f.apply(create("A"),
                  update_user("last", 1, add=[{"slug": "A", "expires_at": "9999-12-31T23:59:59.999999Z"}]),
                  update_user("late-start", 2, add=[{"slug": "A", "starts_at": "9998-12-31T00:00:00Z"}],
                              ttl_seconds=3_000_000_000),
                  {"type": "UpdateSegmentMembers", "command_id": "bulk-last", "slug": "A", "add": [3],
                   "expires_at": "9999-06-01T00:00:00Z"},
                  update_user("then", 1, remove=["A"]))
    results = await f.results()
    assert {c: (r[-1]["status"], r[-1]["error"] and r[-1]["error"]["code"]) for c, r in results.items()} == {
        "create-A": ("applied", None), "last": ("rejected", "INVALID_COMMAND"),
        "late-start": ("rejected", "INVALID_COMMAND"), "bulk-last": ("rejected", "INVALID_COMMAND"),
        "then": ("applied", None)}
    assert "before 9999" in results["last"][-1]["error"]["message"]
    assert await f.outbox("dlq") == [] and await f.members("A") == set()


async def test_a_runs_reads_go_through_the_users_keys_though_their_plans_were_made_on_empty_tables(conn):
    """The outbox's trap (see test_relay) in the worker's reads of a run: exclusions and scheduled memberships are
    often empty (a fresh deploy, a drained burst of starts and a VACUUM that truncated the table), and a plan made
    then and kept by the prepared statement read the whole table for each batch once it filled, comparing every
    row with each of the batch's users (up to 2 000): a burst of 100 000 scheduled starts, each batch a scan of
    what is left of them. The reads go through the (user_id, segment_id) keys whatever the planner believed."""
    f = Feeder(conn)
    await f.apply(create("A"))
    seg = await conn.fetchval("SELECT id FROM segments WHERE slug = 'A'")
    for table in ("memberships", "exclusions", "scheduled_memberships"):
        await conn.execute(f"VACUUM {table}")
    scans = """SELECT coalesce(sum(seq_scan), 0) FROM pg_stat_xact_user_tables
               WHERE relname IN ('memberships', 'exclusions', 'scheduled_memberships')"""  # this backend's

    async def read(users: list[int]) -> tuple[int, ChangeSet]:
        async with conn.transaction():
            await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")  # as cached after five runs
            changes = ChangeSet(f.now)
            await changes.lock_users(conn, set(users))
            before = await conn.fetchval(scans)
            await changes.read_users(conn)
            return await conn.fetchval(scans) - before, changes

    await read([1])  # the plans are made on the empty tables
    await conn.execute("""INSERT INTO exclusions (user_id, segment_id, excluded_at)
        SELECT g, $1, now() FROM generate_series(1, 20000) g""", seg)
    await conn.execute("""INSERT INTO scheduled_memberships (user_id, segment_id, starts_at, scheduled_at)
        SELECT g, $1, now() + interval '1 day', now() FROM generate_series(1, 20000) g""", seg)
    scanned, changes = await read(list(range(2, 102)))
    assert changes.users[5].exclusions == {seg} and seg in changes.users[5].scheduled
    assert scanned == 0
