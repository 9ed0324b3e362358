"""The read side: plain SQL on the tables, no unit of work. Expired memberships are filtered in the query."""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime

import asyncpg

# Explicit (and materialized rollout) memberships that have not expired, plus the rollouts computed from the
# bucket for any user id, minus explicit exclusions. Known users' rollout rows are stored, so UNION dedups. A stored
# rollout row counts inside the segment's line only: a lowered percent shows at once, while its rollout removes
# the rows above the line pass by pass (service/write/rollouts.py).
_NOW = """
WITH stored AS (
    SELECT s.id, s.slug, m.added_at, m.expires_at, m.source, s.salt, s.auto_percent, s.layer, s.bucket_end
    FROM memberships m JOIN segments s ON s.id = m.segment_id
    WHERE m.user_id = $1 AND s.deleted_at IS NULL AND (m.expires_at IS NULL OR m.expires_at > now())
      AND (m.source <> 'auto_percent' OR segment_rolls_out(s.salt, s.layer, s.bucket_start, s.auto_percent, $1))
), computed AS (
    SELECT s.id, s.slug, s.rollout_at AS added_at, NULL::timestamptz AS expires_at, 'auto_percent' AS source,
           s.salt, s.auto_percent, s.layer, s.bucket_end
    FROM segments s
    WHERE s.deleted_at IS NULL AND s.auto_percent > 0
      AND segment_rolls_out(s.salt, s.layer, s.bucket_start, s.auto_percent, $1)
      AND NOT EXISTS (SELECT 1 FROM exclusions x WHERE x.user_id = $1 AND x.segment_id = s.id)
      AND NOT EXISTS (SELECT 1 FROM stored WHERE stored.id = s.id)
)"""


def _sorted(ctes: str, union: str) -> str:
    """By slug in byte order, whatever the database's collation."""
    return f'{ctes}\nSELECT * FROM ({union}) AS answer ORDER BY slug COLLATE "C"'


USER_SEGMENTS = _sorted(_NOW, """
SELECT slug, added_at, expires_at, source FROM stored
UNION ALL SELECT slug, added_at, expires_at, source FROM computed
""")
# How a segment's rollout decides, for explain=true: the user's bucket (in a layer: the layer's) and the line
# below which it is in (in a layer: the end of the segment's range, which starts at bucket_start). {s}: the alias.
_BUCKET = "CASE WHEN {s}.auto_percent > 0 THEN segment_bucket(coalesce('layer:' || {s}.layer, {s}.salt), $1) END"
_THRESHOLD = ("CASE WHEN {s}.auto_percent > 0 THEN coalesce({s}.bucket_end, ({s}.auto_percent * 100)::int) END")
# explain=true in the same round trip: rows of kind 'segment' as above, with how the rollout decides; of kind
# 'excluded': rollouts the user would be in but for an explicit removal (added_at: since the removal); and of
# kind 'scheduled': added memberships whose start has not come (added_at: starts_at).
USER_SEGMENTS_EXPLAINED = _sorted(_NOW, f"""
SELECT 'segment' AS kind, slug, added_at, expires_at, source, layer,
       {_BUCKET.format(s="g")} AS bucket, {_THRESHOLD.format(s="g")} AS threshold
FROM (SELECT * FROM stored UNION ALL SELECT * FROM computed) AS g
UNION ALL
SELECT 'excluded', s.slug, x.excluded_at, NULL, NULL, s.layer, {_BUCKET.format(s="s")}, {_THRESHOLD.format(s="s")}
FROM exclusions x JOIN segments s ON s.id = x.segment_id
WHERE x.user_id = $1 AND s.deleted_at IS NULL AND s.auto_percent > 0
  AND segment_rolls_out(s.salt, s.layer, s.bucket_start, s.auto_percent, $1)
UNION ALL
SELECT 'scheduled', s.slug, p.starts_at, p.expires_at, NULL, s.layer, NULL, NULL
FROM scheduled_memberships p JOIN segments s ON s.id = p.segment_id
WHERE p.user_id = $1 AND s.deleted_at IS NULL AND p.starts_at > now()
""")

# The same answer at an instant $2, from the history tables of migration 005. `live`: the incarnations live at $2
# (the segments table knows when each was created and deleted), each as its last change before $2 left it.
# `last`: the user's last transition of each of them before $2 (one index probe each); an add not expired
# makes a member, since the first add after the last removal. Rollouts as now, with the exclusion intervals.
# An instant before anything was recorded finds nothing, so it answers nothing.
_AT = """
WITH live AS (
    SELECT s.id AS segment_id, v.slug, v.auto_percent, v.layer, v.rollout_at,
           CASE WHEN v.auto_percent = 0 THEN NULL WHEN v.layer IS NULL THEN segment_bucket(s.salt, $1)
                ELSE segment_bucket('layer:' || v.layer, $1) END AS bucket,
           CASE WHEN v.auto_percent = 0 THEN NULL WHEN v.layer IS NULL THEN (v.auto_percent * 100)::int
                ELSE v.bucket_end END AS threshold,
           CASE WHEN v.layer IS NULL THEN 0 ELSE v.bucket_start END AS line_start
    FROM segments s CROSS JOIN LATERAL (
        SELECT h.slug, h.change, h.auto_percent, h.layer, h.bucket_start, h.bucket_end, h.rollout_at
        FROM segment_history h WHERE h.segment_id = s.id AND h.occurred_at <= $2
        ORDER BY h.occurred_at DESC, h.id DESC LIMIT 1
    ) AS v
    WHERE s.created_at <= $2 AND (s.deleted_at IS NULL OR s.deleted_at > $2) AND v.change <> 'deleted'
), last AS (
    SELECT l.*, t.occurred_at, t.expires_at, t.reason
    FROM live l CROSS JOIN LATERAL (
        SELECT h.operation, h.occurred_at, h.expires_at, h.reason FROM membership_history h
        WHERE h.user_id = $1 AND h.segment_id = l.segment_id AND h.occurred_at <= $2
        ORDER BY h.occurred_at DESC, h.id DESC LIMIT 1
    ) AS t
    WHERE t.operation = 'added' AND (t.expires_at IS NULL OR t.expires_at > $2)
), members AS (
    SELECT m.segment_id, m.slug, coalesce(
               (SELECT min(h.occurred_at) FROM membership_history h
                WHERE h.user_id = $1 AND h.segment_id = m.segment_id AND h.occurred_at <= $2
                  AND (r.id IS NULL OR (h.occurred_at, h.id) > (r.occurred_at, r.id))), m.occurred_at) AS added_at,
           m.expires_at, CASE WHEN m.reason = 'auto_percent' THEN 'auto_percent' ELSE 'manual' END AS source,
           m.layer, m.bucket, m.threshold
    FROM last m LEFT JOIN LATERAL (
        SELECT h.occurred_at, h.id FROM membership_history h
        WHERE h.user_id = $1 AND h.segment_id = m.segment_id AND h.occurred_at <= $2 AND h.operation = 'removed'
        ORDER BY h.occurred_at DESC, h.id DESC LIMIT 1
    ) AS r ON true
), rollouts AS (
    SELECT * FROM live WHERE bucket < threshold AND bucket >= line_start
), excluded AS (
    SELECT r.*, x.since FROM rollouts r CROSS JOIN LATERAL (
        SELECT x.since FROM exclusion_history x
        WHERE x.user_id = $1 AND x.segment_id = r.segment_id AND x.since <= $2 AND (x.until IS NULL OR x.until > $2)
        ORDER BY x.since DESC LIMIT 1
    ) AS x
    WHERE NOT EXISTS (SELECT 1 FROM members m WHERE m.segment_id = r.segment_id)
)"""
_AT_SEGMENTS = """
SELECT 'segment' AS kind, slug, added_at, expires_at, source, layer, bucket, threshold FROM members
UNION ALL
SELECT 'segment', slug, rollout_at, NULL, 'auto_percent', layer, bucket, threshold FROM rollouts r
WHERE NOT EXISTS (SELECT 1 FROM members m WHERE m.segment_id = r.segment_id)
  AND NOT EXISTS (SELECT 1 FROM excluded x WHERE x.segment_id = r.segment_id)
"""
USER_SEGMENTS_AT = _sorted(_AT, _AT_SEGMENTS)
# Schedules are kept only while pending: at an instant, those pending now that were made by then.
USER_SEGMENTS_AT_EXPLAINED = _sorted(_AT, _AT_SEGMENTS + """
UNION ALL
SELECT 'excluded', slug, since, NULL, NULL, layer, bucket, threshold FROM excluded
UNION ALL
SELECT 'scheduled', l.slug, p.starts_at, p.expires_at, NULL, l.layer, NULL, NULL
FROM scheduled_memberships p JOIN live l ON l.segment_id = p.segment_id
WHERE p.user_id = $1 AND p.scheduled_at <= $2 AND p.starts_at > $2
""")

# member_count: kept by a trigger of migration 003 (a few counter rows per segment, whatever its size); a
# membership past its expiry counts until its ExpireMembership is applied (about a second, the TTL lag).
_SEGMENT_COLUMNS = """
SELECT s.slug, s.description, s.auto_percent, s.created_at, s.deleted_at, s.layer, s.bucket_start, s.bucket_end,
    (SELECT coalesce(sum(c.members), 0) FROM segment_member_counts c WHERE c.segment_id = s.id)::bigint AS member_count
FROM segments s
"""
# Byte order, whatever the database's collation (slugs are case-sensitive ASCII).
SEGMENTS = _SEGMENT_COLUMNS + 'WHERE $1 OR s.deleted_at IS NULL ORDER BY s.slug COLLATE "C", s.id'
# The live incarnation of a slug, or else its latest deleted one.
SEGMENT = _SEGMENT_COLUMNS + "WHERE s.slug = $1 ORDER BY s.deleted_at IS NULL DESC, s.id DESC LIMIT 1"
LIVE_SEGMENT_ID = "SELECT id FROM segments WHERE slug = $1 AND deleted_at IS NULL"
# Known members now, by user id, after a cursor (keyset: stable while members come and go).
_MEMBERS = """
SELECT user_id, added_at, expires_at, source FROM memberships
WHERE segment_id = $1 AND user_id > $2 AND (expires_at IS NULL OR expires_at > now())
ORDER BY user_id
"""
MEMBERS_PAGE = _MEMBERS + "LIMIT $3"
MEMBERS_CSV = """
SELECT user_id, to_char(added_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
       to_char(expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'), source
FROM (""" + _MEMBERS + ") AS members"
MEMBERS_HEADER = b"user_id;added_at;expires_at;source\n"
SEGMENT_HISTORY = """
SELECT segment_id, change, description, auto_percent, layer, occurred_at, command_id FROM segment_history
WHERE slug = $1 ORDER BY occurred_at, id
"""
# The API's LISTEN connection (service/read/waiters.py): its heartbeat, and what it checks.
LISTENER_HEARTBEAT = "SELECT clock_timestamp(), pg_notification_queue_usage()"
USERS_TRIGGERS = 9  # migration 012's, each enabled ('O'): else no answer is kept in memory
USERS_TRIGGERS_ENABLED = """
SELECT count(*) FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
WHERE p.proname = 'notify_users_changed' AND t.tgenabled = 'O'
"""
END_STUCK_LISTENERS = """
SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity
WHERE application_name = $1 AND pid <> pg_backend_pid() AND state_change < now() - make_interval(secs => $2)
"""
COMMAND_RESULT = "SELECT result::text FROM processed_commands WHERE command_id = $1"
PROCESSED = "SELECT command_id FROM processed_commands WHERE command_id = ANY($1::text[])"
# UTC months, oldest first, already formatted as CSV lines by COPY.
# $1, $2: the period's bounds in UTC, computed in Python (month arithmetic in SQL follows the session time zone).
HISTORY_CSV = """
SELECT user_id, slug, operation,
       to_char(occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'), reason
FROM membership_history
WHERE occurred_at >= $1 AND occurred_at < $2 {filters}
ORDER BY occurred_at, id
"""
HISTORY_HEADER = b"user_id;segment;operation;timestamp;reason\n"


async def user_segments(conn: asyncpg.Connection, user_id: int, at: datetime | None = None,
                        explain: bool = False) -> list[asyncpg.Record]:
    """Now, or at an instant; with `explain`, rows of kind 'segment' and 'excluded', with bucket and threshold."""
    if at is None:
        return await conn.fetch(USER_SEGMENTS_EXPLAINED if explain else USER_SEGMENTS, user_id)
    return await conn.fetch(USER_SEGMENTS_AT_EXPLAINED if explain else USER_SEGMENTS_AT, user_id, at)


async def segments(conn: asyncpg.Connection, include_deleted: bool) -> list[dict]:
    return [dict(r) for r in await conn.fetch(SEGMENTS, include_deleted)]


async def segment(conn: asyncpg.Connection, slug: str) -> dict | None:
    row = await conn.fetchrow(SEGMENT, slug)
    return dict(row) if row else None


async def live_segment_id(conn: asyncpg.Connection, slug: str) -> int | None:
    return await conn.fetchval(LIVE_SEGMENT_ID, slug)


async def members_page(conn: asyncpg.Connection, segment_id: int, after: int, limit: int) -> list[dict]:
    return [dict(r) for r in await conn.fetch(MEMBERS_PAGE, segment_id, after, limit)]


async def stream_members_csv(conn: asyncpg.Connection, segment_id: int,
                             write: Callable[[bytes], Awaitable[None]]) -> None:
    """Every known member now, through COPY: constant memory whatever the size."""
    await write(MEMBERS_HEADER)
    await conn.copy_from_query(MEMBERS_CSV, segment_id, 0, output=write, format="csv", delimiter=";")


async def segment_history(conn: asyncpg.Connection, slug: str) -> list[dict]:
    return [dict(r) for r in await conn.fetch(SEGMENT_HISTORY, slug)]


async def command_result(conn: asyncpg.Connection, command_id: str) -> str | None:
    return await conn.fetchval(COMMAND_RESULT, command_id)


async def processed(conn: asyncpg.Connection, command_ids: list[str]) -> set[str]:
    return {r["command_id"] for r in await conn.fetch(PROCESSED, command_ids)}


async def stream_history_csv(conn: asyncpg.Connection, start: datetime, end: datetime, user_id: int | None,
                             slug: str | None, write: Callable[[bytes], Awaitable[None]]) -> None:
    """Stream the period's CSV through COPY: constant memory whatever the size."""
    args: list = [start, end]
    filters = ""
    for column, value in (("user_id", user_id), ("slug", slug)):
        if value is not None:
            args.append(value)
            filters += f" AND {column} = ${len(args)}"
    await write(HISTORY_HEADER)
    await conn.copy_from_query(HISTORY_CSV.format(filters=filters), *args, output=write, format="csv", delimiter=";")
