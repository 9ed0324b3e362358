"""Every SQL statement of the write path, named, with $n parameters. DDL lives in migrations/."""

# --- offsets (the consumer's position, stored with the effects) -------------------------------------------
ENSURE_OFFSETS = """
INSERT INTO consumer_offsets (consumer_group, topic, partition, next_offset)
SELECT $1, $2, p, 0 FROM unnest($3::int[]) AS p
ON CONFLICT DO NOTHING
"""
# The row lock fences a stale owner during a rebalance: it waits here, then sees the newer offset.
LOCK_OFFSETS = """
SELECT partition, next_offset FROM consumer_offsets
WHERE consumer_group = $1 AND topic = $2 AND partition = ANY($3::int[])
ORDER BY partition FOR UPDATE
"""
READ_OFFSETS = """
SELECT partition, next_offset FROM consumer_offsets
WHERE consumer_group = $1 AND topic = $2 AND partition = ANY($3::int[])
"""
# Only if nobody moved it meanwhile: $4 the offset read, $5 the new one.
RESET_OFFSET = """
UPDATE consumer_offsets SET next_offset = $5, updated_at = now()
WHERE consumer_group = $1 AND topic = $2 AND partition = $3 AND next_offset = $4
"""
STORE_OFFSETS = """
UPDATE consumer_offsets o SET next_offset = n.next_offset, updated_at = now()
FROM unnest($3::int[], $4::bigint[]) AS n(partition, next_offset)
WHERE o.consumer_group = $1 AND o.topic = $2 AND o.partition = n.partition
"""

# --- inbox --------------------------------------------------------------------------------------------
# The ids stored, and those a rollout in progress holds (rolling: no result yet).
FIND_PROCESSED = """
SELECT command_id, body_hash, result, false AS rolling FROM processed_commands WHERE command_id = ANY($1::text[])
UNION ALL
SELECT command_id, body_hash, NULL, true FROM fan_outs WHERE command_id = ANY($1::text[])
"""
# Stored with COPY (a plain insert: an id stored meanwhile by another partition fails on the key, see next_step).
PROCESSED_COLUMNS = ("command_id", "type", "body_hash", "result", "processed_at")

# --- segments -----------------------------------------------------------------------------------------
# FOR SHARE to assign users (in id order), FOR UPDATE to delete or change a segment. A run locks the segments
# it names; a run that registers users also locks every rolled-out segment (they join those rollouts).
LOCK_SEGMENTS_FOR_SHARE = """
SELECT id, slug, salt, auto_percent, layer, bucket_start FROM segments
WHERE deleted_at IS NULL AND (slug = ANY($1::text[]) OR ($2 AND auto_percent > 0))
ORDER BY id FOR SHARE
"""
# Registering users vs. starting a rollout: a segment that is new, or goes from 0 % to more, is invisible to a
# concurrent registration, and the registration's user invisible to the fan-out. Registrations take this lock
# shared, such fan-outs exclusive, before any segment lock (the lock id: db.ROLLOUT_LOCK). The exclusive one is
# tried, never queued for: a queued exclusive request would make every later registration wait behind it, and so
# behind a long bulk command that holds the lock shared (segment_handlers._starting_a_rollout polls instead).
LOCK_ROLLOUT_SHARED = "SELECT pg_advisory_xact_lock_shared($1)"
TRY_LOCK_ROLLOUT_EXCLUSIVE = "SELECT pg_try_advisory_xact_lock($1)"
LOCK_TIMEOUT_SECONDS = "SELECT extract(epoch FROM current_setting('lock_timeout')::interval)::float8"
LOCK_SEGMENT_FOR_UPDATE = """
SELECT id, slug, salt, auto_percent, description, layer, bucket_start, bucket_end FROM segments
WHERE slug = $1 AND deleted_at IS NULL FOR UPDATE
"""
NEXT_SEGMENT_ID = "SELECT nextval(pg_get_serial_sequence('segments', 'id'))"
INSERT_SEGMENT = """
INSERT INTO segments (id, slug, description, auto_percent, salt, created_at, updated_at, rollout_at,
                      layer, bucket_start, bucket_end)
VALUES ($1, $2, $3, $4, $5, $6, $6, $6, $7, $8, $9)
"""
UPDATE_SEGMENT = """
UPDATE segments SET description = $2, auto_percent = $3, updated_at = $4,
    rollout_at = CASE WHEN auto_percent <> $3 THEN $4 ELSE rollout_at END, bucket_start = $5, bucket_end = $6
WHERE id = $1
"""
# The ranges the other live segments of a layer hold. Read under the rollout lock (exclusive): every change that
# takes or grows a range holds it, so two of them never allocate from the same picture.
LAYER_RANGES = """
SELECT bucket_start, bucket_end FROM segments
WHERE layer = $1 AND deleted_at IS NULL AND bucket_start IS NOT NULL AND id IS DISTINCT FROM $2
"""
MARK_SEGMENT_DELETED = "UPDATE segments SET deleted_at = $2, updated_at = $2 WHERE id = $1"
DELETE_SEGMENT_EXCLUSIONS = "DELETE FROM exclusions WHERE segment_id = $1"
DELETE_SEGMENT_SCHEDULES = "DELETE FROM scheduled_memberships WHERE segment_id = $1"

# --- user state ---------------------------------------------------------------------------------------
# A user's row lock serializes commands about one user that arrive on different partitions (RegisterUsers is
# keyed by its first user). Row locks, not advisory locks: a 10 000-user registration would exhaust the lock table.
# One statement in id order: known users' rows are locked (DO UPDATE ... WHERE false locks, writes nothing), users
# seen for the first time are inserted (their uncommitted row is the lock) and returned. Those the run does not
# register in the end (every command of theirs rejected) are deleted again before commit.
LOCK_OR_INSERT_USERS = """
INSERT INTO users (user_id, registered_at) SELECT u, $2 FROM unnest($1::bigint[]) AS u ORDER BY u
ON CONFLICT (user_id) DO UPDATE SET registered_at = users.registered_at WHERE false
RETURNING user_id
"""
DELETE_USERS = "DELETE FROM users WHERE user_id = ANY($1::bigint[])"
USER_MEMBERSHIPS = """
SELECT user_id, segment_id, source, added_at, expires_at FROM memberships WHERE user_id = ANY($1::bigint[])
"""
USER_EXCLUSIONS = "SELECT user_id, segment_id FROM exclusions WHERE user_id = ANY($1::bigint[])"
USER_SCHEDULES = """
SELECT user_id, segment_id, starts_at, expires_at FROM scheduled_memberships WHERE user_id = ANY($1::bigint[])
"""
# Around the three reads above: by the (user_id, segment_id) keys whatever the planner believes. Exclusions and
# schedules are often empty (a fresh deploy; a drained burst of starts that a VACUUM truncated), and a plan made
# then, kept by the prepared statement, scanned the whole table for each batch once it filled, comparing every row
# with each of the batch's users. The rest of the run's statements keep the planner's choice.
READS_BY_KEY = "SET LOCAL enable_seqscan = off"
READS_DONE = "SET LOCAL enable_seqscan TO DEFAULT"
DELETE_SCHEDULES = """
DELETE FROM scheduled_memberships x USING unnest($1::bigint[], $2::bigint[]) AS d(user_id, segment_id)
WHERE x.user_id = d.user_id AND x.segment_id = d.segment_id
"""
UPSERT_SCHEDULES = """
INSERT INTO scheduled_memberships (user_id, segment_id, starts_at, expires_at, scheduled_at)
SELECT u, s, a, e, $5 FROM unnest($1::bigint[], $2::bigint[], $3::timestamptz[], $4::timestamptz[]) AS n(u, s, a, e)
ON CONFLICT (user_id, segment_id) DO UPDATE
SET starts_at = EXCLUDED.starts_at, expires_at = EXCLUDED.expires_at, scheduled_at = EXCLUDED.scheduled_at
"""
DELETE_MEMBERSHIPS = """
DELETE FROM memberships m USING unnest($1::bigint[], $2::bigint[]) AS d(user_id, segment_id)
WHERE m.user_id = d.user_id AND m.segment_id = d.segment_id
"""
UPSERT_MEMBERSHIPS = """
INSERT INTO memberships (user_id, segment_id, source, added_at, expires_at)
SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::timestamptz[], $5::timestamptz[])
ON CONFLICT (user_id, segment_id) DO UPDATE
SET source = EXCLUDED.source, added_at = EXCLUDED.added_at, expires_at = EXCLUDED.expires_at
"""
DELETE_EXCLUSIONS = """
DELETE FROM exclusions x USING unnest($1::bigint[], $2::bigint[]) AS d(user_id, segment_id)
WHERE x.user_id = d.user_id AND x.segment_id = d.segment_id
"""
INSERT_EXCLUSIONS = """
INSERT INTO exclusions (user_id, segment_id, excluded_at)
SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::timestamptz[])
ON CONFLICT DO NOTHING
"""

HISTORY_COLUMNS = ("user_id", "slug", "segment_id", "operation", "occurred_at", "reason", "command_id", "expires_at")
OUTBOX_COLUMNS = ("kind", "key", "payload", "event_id", "headers")
NOTIFY_OUTBOX = "SELECT pg_notify('segmentation_outbox', '')"
NOTIFY_TTL = "SELECT pg_notify('segmentation_ttl', $1)"

# --- set-based fan-outs -------------------------------------------------------------------------------
# A fan-out walks its users in id order, a key range at a time, and changes each slice (in the command's one
# transaction, or a rollout's passes: service/write/rollouts.py): each statement handles at most one slice
# (FAN_OUT_SLICE users), short enough for a managed database's statement_timeout, and no plan can make a slice
# cost the whole segment.
# The slices are key ranges (after, upto] of user ids, each bound found by an index-only walk of at most a slice:
# no user id travels to the worker and back. $1 the last bound (exclusive), $2 the slice size; NULL: no more.
FAN_OUT_KNOWN_USERS = "SELECT max(user_id) FROM (SELECT user_id FROM users WHERE user_id > $1 ORDER BY user_id LIMIT $2) s"
# $3 the segment.
FAN_OUT_SEGMENT_MEMBERS = """
SELECT max(user_id) FROM (
    SELECT user_id FROM memberships WHERE segment_id = $3 AND user_id > $1 ORDER BY user_id LIMIT $2) s"""
# One statement per slice: the membership change, its history rows and its outbox rows.
# $1 segment id, $2 slug, $3 now (timestamptz), $4 now as RFC 3339 text, $5 command id.
# schemas.common.format_time's text: a fraction of six digits only when it is not zero.
_RFC3339 = ("(to_char({0} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS') "
            "|| CASE WHEN date_trunc('second', {0}) = {0} THEN '' ELSE to_char({0}, '.US') END || 'Z')")
_EXPIRED = "(expires_at IS NOT NULL AND expires_at <= $3)"
# A fan-out event's id is name-based: uuid3(FAN_OUT_EVENT_NAMESPACE, "<segment id>:<user id>:<change>:<reason>:
# <command id>") (RFC 9562 version 3), the same each time the statement runs. A command changes a user's membership
# of a segment at most once per change and reason (UpdateSegmentMembers: an expired one dropped, then added again;
# a fan-out: one change per user), and command ids are never reused, so no two events share a name; the command id
# comes last, after four fields without ':', so no two names read alike. The worker's own ids (outbox.new_id) are
# version 4, never equal to one of these. gen_random_uuid() cost 4 µs a row (PostgreSQL built without OpenSSL opens
# and reads /dev/urandom each call), the md5 and its text under 1.
FAN_OUT_EVENT_NAMESPACE = "c9b4e968-151a-4e44-8a7a-129bdd42aebd"
_NAME_MD5 = ("md5('\\x{ns}'::bytea || convert_to($1::bigint::text || ':' || user_id::text || ':{change}:' || {reason} "
             "|| ':' || $5::text, 'UTF8'))")
# The md5 as a UUID: version 3 in the 13th hex digit, the variant (10xx) in the 17th.
_MD5_UUID = ("substr(md5, 1, 8) || '-' || substr(md5, 9, 4) || '-3' || substr(md5, 14, 3) || '-' "
             "|| translate(substr(md5, 17, 1), '0123456789abcdef', '89ab89ab89ab89ab') || substr(md5, 18, 3) || '-' "
             "|| substr(md5, 21)")

# The MembershipChanged payload, the bytes outbox.membership_event writes (its fields, its order, no spaces), joined
# from text: json_build_object cost 3 µs a row. Only the command id can need escaping: slugs, reasons, ids and
# times are made of characters JSON takes as they are.
_EVENT_JSON = ("""'{{"event_id":"' || event_id || '","type":"MembershipChanged","change":"{change}","user_id":' """
               """|| user_id || ',"slug":"' || $2::text || '","reason":"' || reason || '","expires_at":' """
               """|| coalesce('"' || expires_text || '"', 'null') || ',"occurred_at":"' || occurred_text """
               """|| '","command_id":' || coalesce(to_json($5::text)::text, 'null') || '}}'""")


def _fan_out(changed_cte: str, change: str, reason: str, occurred: str = "$3::timestamptz",
             occurred_text: str = "$4::text", expires_text: str = "NULL", before: str = "") -> str:
    """`changed_cte` returns (user_id, expires_at); `reason` and `occurred` are SQL over those columns. `before`:
    CTEs ahead of it (a data-modifying CTE must sit at the top level, not inside `changed`)."""
    history_expiry = "expires_at" if change == "added" else "NULL"  # a history row: an add's expiry
    name_md5 = _NAME_MD5.format(ns=FAN_OUT_EVENT_NAMESPACE.replace("-", ""), change=change, reason=reason)
    return f"""
WITH {before}changed AS ({changed_cte}),
named AS (  -- OFFSET 0: one md5 a row, not one for each use of it
    SELECT user_id, expires_at, {name_md5} AS md5 FROM changed OFFSET 0
),
rows AS (
    SELECT user_id, expires_at, {reason} AS reason, {occurred} AS occurred_at, {occurred_text} AS occurred_text,
           {expires_text} AS expires_text, {_MD5_UUID} AS event_id,
           $4::text AS now_text  -- types $4 for statements whose rows are all dated otherwise
    FROM named
),
history AS (
    INSERT INTO membership_history (user_id, slug, segment_id, operation, occurred_at, reason, command_id, expires_at)
    SELECT user_id, $2, $1, '{change}', occurred_at, reason, $5, {history_expiry} FROM rows
),
published AS (
    INSERT INTO outbox (kind, key, payload, event_id)
    SELECT 'membership', convert_to(user_id::text, 'UTF8'), convert_to({_EVENT_JSON.format(change=change)}, 'UTF8'),
           event_id
    FROM rows ORDER BY user_id
    RETURNING 1
)
SELECT count(*) FROM published
"""


def _rollout_add(users: str, in_slice: str) -> str:
    return _fan_out(
        f"""
    INSERT INTO memberships (user_id, segment_id, source, added_at, expires_at)
    SELECT u.user_id, $1, 'auto_percent', $3, NULL FROM {users}
    WHERE {in_slice} AND segment_bucket($6, u.user_id) <@ int4range($7, $8)  -- [lower, upper): one hash per user
      AND NOT EXISTS (SELECT 1 FROM exclusions x WHERE x.user_id = u.user_id AND x.segment_id = $1)
    ON CONFLICT DO NOTHING
    RETURNING user_id, expires_at
    """,
        "added", "'auto_percent'",
    )


# $6 salt (the segment's, or its layer's), $7 lower bucket line (inclusive), $8 upper bucket line (exclusive);
# the users: a range ($9, $10] of known users (a slice of FAN_OUT_KNOWN_USERS), or the list $9 (the users a bulk
# command registers).
ROLLOUT_ADD = _rollout_add("users u", "u.user_id > $9 AND u.user_id <= $10")
ROLLOUT_ADD_LISTED = _rollout_add("unnest($9::bigint[]) AS u(user_id)", "true")
# $6 salt, $7 new bucket line: rollout members at or above it leave; explicit members never do. ($8, $9] the
# users of the slice (of FAN_OUT_SEGMENT_MEMBERS).
ROLLOUT_REMOVE = _fan_out(
    """
    DELETE FROM memberships
    WHERE segment_id = $1 AND user_id > $8 AND user_id <= $9
      AND source = 'auto_percent' AND segment_bucket($6, user_id) >= $7
    RETURNING user_id, expires_at
    """,
    "removed", "'auto_percent'",
)
# ($6, $7] the users of the slice (of FAN_OUT_SEGMENT_MEMBERS). A membership already expired (its ExpireMembership
# not applied yet) leaves as an expiry, at its own time.
SEGMENT_DELETE_MEMBERS = _fan_out(
    "DELETE FROM memberships WHERE segment_id = $1 AND user_id > $6 AND user_id <= $7 RETURNING user_id, expires_at",
    "removed",
    reason=f"CASE WHEN {_EXPIRED} THEN 'expired' ELSE 'segment_deleted' END",
    occurred=f"CASE WHEN {_EXPIRED} THEN expires_at ELSE $3::timestamptz END",
    occurred_text=f"CASE WHEN {_EXPIRED} THEN {_RFC3339.format('expires_at')} ELSE $4::text END",
    expires_text=_RFC3339.format("expires_at"),
)

# --- UpdateSegmentMembers: one segment, up to 100 000 users; $6 the users of the statement ------------------
# Each statement is what the rules of UpdateUserSegments do to one user, for all of them at once, in the same
# order: an expired membership leaves first (as an expiry, at its own time), then the add or the remove.
MEMBERS_DROP_EXPIRED = _fan_out(
    """
    DELETE FROM memberships m USING unnest($6::bigint[]) AS d(user_id)
    WHERE m.segment_id = $1 AND m.user_id = d.user_id AND m.expires_at <= $3
    RETURNING m.user_id, m.expires_at
    """,
    "removed", "'expired'", occurred="expires_at", occurred_text=_RFC3339.format("expires_at"),
    expires_text=_RFC3339.format("expires_at"),
)
# $7 the expiry of every added user. An event only for a new membership or a changed expiry; a rollout member
# becomes an explicit one silently.
MEMBERS_ADD = _fan_out(
    """
    SELECT up.user_id, up.expires_at FROM upserted up LEFT JOIN prior p USING (user_id)
    WHERE p.user_id IS NULL OR p.expires_at IS DISTINCT FROM up.expires_at
    """,
    "added", "'command'", expires_text=_RFC3339.format("expires_at"),
    before="""prior AS (
    SELECT m.user_id, m.expires_at FROM memberships m JOIN unnest($6::bigint[]) AS d(user_id) USING (user_id)
    WHERE m.segment_id = $1
),
upserted AS (
    INSERT INTO memberships (user_id, segment_id, source, added_at, expires_at)
    SELECT d.user_id, $1, 'manual', $3, $7::timestamptz FROM unnest($6::bigint[]) AS d(user_id) ORDER BY d.user_id
    ON CONFLICT (user_id, segment_id) DO UPDATE SET source = 'manual', expires_at = EXCLUDED.expires_at
    RETURNING user_id, expires_at
),
""",
)
MEMBERS_REMOVE = _fan_out(
    """
    DELETE FROM memberships m USING unnest($6::bigint[]) AS d(user_id)
    WHERE m.segment_id = $1 AND m.user_id = d.user_id
    RETURNING m.user_id, m.expires_at
    """,
    "removed", "'command'", expires_text=_RFC3339.format("expires_at"),
)
BULK_WORK_MEM = "SET LOCAL work_mem = '64MB'"
# $1 segment id, $2 users, $3 now
MEMBERS_INCLUDE = """
DELETE FROM exclusions x USING unnest($2::bigint[]) AS d(user_id) WHERE x.segment_id = $1 AND x.user_id = d.user_id
"""
MEMBERS_EXCLUDE = """
INSERT INTO exclusions (user_id, segment_id, excluded_at)
SELECT d.user_id, $1, $3 FROM unnest($2::bigint[]) AS d(user_id) ORDER BY d.user_id
ON CONFLICT DO NOTHING
"""
MEMBERS_UNSCHEDULE = """
DELETE FROM scheduled_memberships x USING unnest($2::bigint[]) AS d(user_id)
WHERE x.segment_id = $1 AND x.user_id = d.user_id
"""
# $4 starts_at, $5 expires_at, $6 command id
MEMBERS_SCHEDULE = """
INSERT INTO scheduled_memberships (user_id, segment_id, starts_at, expires_at, scheduled_at, command_id)
SELECT d.user_id, $1, $4, $5, $3, $6 FROM unnest($2::bigint[]) AS d(user_id) ORDER BY d.user_id
ON CONFLICT (user_id, segment_id) DO UPDATE
SET starts_at = EXCLUDED.starts_at, expires_at = EXCLUDED.expires_at, scheduled_at = EXCLUDED.scheduled_at,
    command_id = EXCLUDED.command_id
"""

# --- rollouts committed a pass at a time (service/write/rollouts.py) ----------------------------------------
# $1 command id, $2 body hash, $3 segment id, $4 slug, $5 salt, $6 joining, $7 low line, $8 high line,
# $9 the rollout's time, $10 the last user id done, $11 events so far.
SAVE_FAN_OUT = """
INSERT INTO fan_outs (command_id, body_hash, segment_id, slug, salt, joining, low_line, high_line, occurred_at,
                      after_user, events)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
ON CONFLICT (command_id) DO UPDATE SET after_user = EXCLUDED.after_user, events = EXCLUDED.events, updated_at = now()
"""
FIND_FAN_OUT = "SELECT * FROM fan_outs WHERE command_id = $1 FOR UPDATE"
LOCK_ROLLOUT_SEGMENT = "SELECT 1 FROM segments WHERE id = $1 FOR UPDATE"
ROLLOUTS_IN_PROGRESS = "SELECT command_id FROM fan_outs WHERE command_id = ANY($1::text[])"
END_FAN_OUT = "DELETE FROM fan_outs WHERE command_id = $1"
# The last pass of the segments' rollouts in progress (by slug: looked up before the segment is locked); NULL: none.
FAN_OUTS_RUNNING = "SELECT max(updated_at) FROM fan_outs WHERE slug = ANY($1::text[])"
LAYER_FAN_OUTS_RUNNING = """
SELECT max(f.updated_at) FROM fan_outs f JOIN segments s ON s.id = f.segment_id WHERE s.layer = $1"""
