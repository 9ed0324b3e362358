"""Every SQL statement of the producers (outbox relay, TTL producer, leader lock), named, with $n parameters."""

# --- leader -------------------------------------------------------------------------------------------
TRY_LOCK = "SELECT pg_try_advisory_lock($1)"

# --- outbox relay -------------------------------------------------------------------------------------
# Never a "last id seen" cursor: seq is handed out at INSERT but visible at COMMIT, so a cursor skips rows.
# FOR UPDATE without SKIP LOCKED: a new leader of a shard waits for the old one's transaction instead of overtaking
# it. The rows are deleted at once; if publishing fails, the transaction rolls back and they are there again.
# CLAIM_BY_PRIMARY_KEY first, in the same transaction: both scans of CLAIM go through the primary key whatever the
# planner believes of the table. The claim is often planned on an empty outbox (a relay polling idle; a VACUUM of a
# drained outbox truncates it to 0 pages), and that plan is kept while a backlog comes (inserts do not invalidate
# it): it deleted through a sequential scan comparing every row with each claimed seq, and found the oldest rows by
# a sort of the whole table, 0.3-1 s a claim under a 100 000-row backlog. No scan of CLAIM needs either.
CLAIM_BY_PRIMARY_KEY = "SET LOCAL enable_seqscan = off; SET LOCAL enable_sort = off"
CLAIM = """
DELETE FROM outbox WHERE seq = ANY(ARRAY(
    SELECT seq FROM outbox WHERE shard = ANY($1::smallint[]) AND kind = ANY($2::text[]) ORDER BY seq LIMIT $3
    FOR UPDATE))
RETURNING seq, kind, key, payload, event_id, headers::text AS headers, created_at
"""
# The rows waiting in the led shards, and how long the oldest has waited (0 when none).
BACKLOG = """SELECT count(*), coalesce(extract(epoch FROM clock_timestamp() - min(created_at)), 0)::float8
FROM outbox WHERE shard = ANY($1::smallint[])"""
# Relays take the presence lock shared (the one-key form); shards are the two-key form (RELAY_LOCK, shard).
_ADVISORY = "locktype = 'advisory' AND granted AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
RELAYS = f"SELECT count(*) FROM pg_locks WHERE {_ADVISORY} AND objsubid = 1 AND classid = 0 AND objid::bigint = $1"
TAKEN_SHARDS = f"SELECT objid::int FROM pg_locks WHERE {_ADVISORY} AND objsubid = 2 AND classid::bigint = $1"
TRY_LOCK_SHARED = "SELECT pg_try_advisory_lock_shared($1)"
TAKE_SHARD = "SELECT pg_try_advisory_lock($1::int, $2::int)"
RELEASE_SHARD = "SELECT pg_advisory_unlock($1::int, $2::int)"

# --- the scheduler (TTL producer) ----------------------------------------------------------------------
# Due items after a cursor, through the (time, user_id, segment_id) index of each end.
DUE_EXPIRIES = """
SELECT m.user_id, m.segment_id, s.slug, m.expires_at AS at FROM memberships m JOIN segments s ON s.id = m.segment_id
WHERE m.expires_at IS NOT NULL AND m.expires_at <= $1
  AND (m.expires_at, m.user_id, m.segment_id) > ($2, $3, $4)
ORDER BY m.expires_at, m.user_id, m.segment_id LIMIT $5
"""
NEXT_EXPIRY = "SELECT min(expires_at) FROM memberships WHERE expires_at IS NOT NULL AND expires_at > $1"
OLDEST_DUE_EXPIRY = "SELECT min(expires_at) FROM memberships WHERE expires_at IS NOT NULL AND expires_at <= $1"
DUE_STARTS = """
SELECT x.user_id, x.segment_id, s.slug, x.starts_at AS at
FROM scheduled_memberships x JOIN segments s ON s.id = x.segment_id
WHERE x.starts_at <= $1 AND (x.starts_at, x.user_id, x.segment_id) > ($2, $3, $4)
ORDER BY x.starts_at, x.user_id, x.segment_id LIMIT $5
"""
NEXT_START = "SELECT min(starts_at) FROM scheduled_memberships WHERE starts_at > $1"
OLDEST_DUE_START = "SELECT min(starts_at) FROM scheduled_memberships WHERE starts_at <= $1"
SCHEDULER_SECRET = "SELECT secret FROM scheduler_key"
# How far the worker got on each partition of the commands topic (it stores its offsets with its effects).
WORKER_POSITIONS = "SELECT partition, next_offset FROM consumer_offsets WHERE consumer_group = $1 AND topic = $2"
