"""The read side: plain SQL on the tables, no unit of work. Expired memberships are filtered in the query."""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import asyncpg

# Explicit (and materialized rollout) memberships that have not expired, plus the rollouts computed from the
# bucket for any user id, minus explicit exclusions. Known users' rollout rows are stored, so UNION dedups.
USER_SEGMENTS = """
WITH stored AS (
    SELECT s.id, s.slug, m.added_at, m.expires_at, m.source FROM memberships m JOIN segments s ON s.id = m.segment_id
    WHERE m.user_id = $1 AND s.deleted_at IS NULL AND (m.expires_at IS NULL OR m.expires_at > now())
), computed AS (
    SELECT s.id, s.slug, s.rollout_at AS added_at, NULL::timestamptz AS expires_at, 'auto_percent' AS source
    FROM segments s
    WHERE s.deleted_at IS NULL AND s.auto_percent > 0
      AND segment_rolls_out(s.salt, s.layer, s.bucket_start, s.auto_percent, $1)
      AND NOT EXISTS (SELECT 1 FROM exclusions x WHERE x.user_id = $1 AND x.segment_id = s.id)
      AND NOT EXISTS (SELECT 1 FROM stored WHERE stored.id = s.id)
)
SELECT * FROM (
    SELECT slug, added_at, expires_at, source FROM stored
    UNION ALL SELECT slug, added_at, expires_at, source FROM computed
) AS segments
ORDER BY slug COLLATE "C"  -- byte order, whatever the database's collation
"""
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
COMMAND_RESULT = "SELECT result::text FROM processed_commands WHERE command_id = $1"
# One UTC month, oldest first, already formatted as CSV lines by COPY.
# $1, $2: the month's bounds in UTC, computed in Python (month arithmetic in SQL follows the session time zone).
HISTORY_CSV = """
SELECT user_id, slug, operation,
       to_char(occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'), reason
FROM membership_history
WHERE occurred_at >= $1 AND occurred_at < $2 {user_filter}
ORDER BY occurred_at, id
"""
HISTORY_HEADER = b"user_id;segment;operation;timestamp;reason\n"


async def user_segments(conn: asyncpg.Connection, user_id: int) -> list[asyncpg.Record]:
    return await conn.fetch(USER_SEGMENTS, user_id)


async def segments(conn: asyncpg.Connection, include_deleted: bool) -> list[dict]:
    return [dict(r) for r in await conn.fetch(SEGMENTS, include_deleted)]


async def segment(conn: asyncpg.Connection, slug: str) -> dict | None:
    row = await conn.fetchrow(SEGMENT, slug)
    return dict(row) if row else None


async def command_result(conn: asyncpg.Connection, command_id: str) -> str | None:
    return await conn.fetchval(COMMAND_RESULT, command_id)


async def stream_history_csv(conn: asyncpg.Connection, year: int, month: int, user_id: int | None,
                             write: Callable[[bytes], Awaitable[None]]) -> None:
    """Stream the month's CSV through COPY: constant memory whatever the size."""
    start = datetime(year, month, 1, tzinfo=UTC)
    end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
    args: tuple = (start, end) if user_id is None else (start, end, user_id)
    query = HISTORY_CSV.format(user_filter="" if user_id is None else "AND user_id = $3")
    await write(HISTORY_HEADER)
    await conn.copy_from_query(query, *args, output=write, format="csv", delimiter=";")
