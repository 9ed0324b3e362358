"""Every SQL statement of the producers (outbox relay, TTL producer, leader lock), named, with $n parameters."""

# --- leader -------------------------------------------------------------------------------------------
TRY_LOCK = "SELECT pg_try_advisory_lock($1)"

# --- outbox relay -------------------------------------------------------------------------------------
# Never a "last id seen" cursor: seq is handed out at INSERT but visible at COMMIT, so a cursor skips rows.
# FOR UPDATE without SKIP LOCKED: a new leader waits for the old one's transaction instead of overtaking it.
CLAIM = """
SELECT seq, kind, key, payload, event_id, headers::text AS headers, created_at
FROM outbox WHERE published_at IS NULL ORDER BY seq LIMIT $1 FOR UPDATE
"""
MARK_PUBLISHED = "UPDATE outbox SET published_at = now() WHERE seq = ANY($1::bigint[])"
PURGE_SLICE = 20_000
PURGE = f"""
DELETE FROM outbox WHERE seq IN (
    SELECT seq FROM outbox WHERE published_at < now() - make_interval(secs => $1) LIMIT {PURGE_SLICE})
"""
BACKLOG = "SELECT count(*) FROM outbox WHERE published_at IS NULL"

# --- TTL producer -------------------------------------------------------------------------------------
# Due memberships after a cursor, through the (expires_at, user_id, segment_id) index.
DUE = """
SELECT m.user_id, m.segment_id, s.slug, m.expires_at FROM memberships m JOIN segments s ON s.id = m.segment_id
WHERE m.expires_at IS NOT NULL AND m.expires_at <= $1
  AND (m.expires_at, m.user_id, m.segment_id) > ($2, $3, $4)
ORDER BY m.expires_at, m.user_id, m.segment_id LIMIT $5
"""
NEXT_DUE = "SELECT min(expires_at) FROM memberships WHERE expires_at IS NOT NULL AND expires_at > $1"
