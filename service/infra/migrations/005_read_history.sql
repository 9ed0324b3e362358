-- What the read side needs about the past (GET /users/{id}/segments?at=, GET /segments/{slug}/history,
-- after=), kept by triggers on the tables the write path already writes: the write path is unchanged.

-- Every create, update and delete of every incarnation of a slug: one row per SegmentChanged event the write
-- path puts in the outbox (the event carries the command id; the segment row is the latest of its slug, since
-- a command changes only the live incarnation and a create makes the newest one).
CREATE TABLE segment_history (
    id           bigserial PRIMARY KEY,
    segment_id   bigint       NOT NULL,
    slug         text         NOT NULL,
    change       text         NOT NULL CHECK (change IN ('created', 'updated', 'deleted')),
    description  text,
    auto_percent numeric(5,2) NOT NULL,
    layer        text,         -- with bucket_start, bucket_end: the layer range, when the event has one
    bucket_start integer,
    bucket_end   integer,
    rollout_at   timestamptz  NOT NULL,  -- when the percent last changed (a rollout member's added_at)
    occurred_at  timestamptz  NOT NULL,
    command_id   text
);
CREATE INDEX segment_history_slug ON segment_history (slug, occurred_at, id);
CREATE INDEX segment_history_segment ON segment_history (segment_id, occurred_at, id);  -- a version at an instant

CREATE FUNCTION record_segment_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    e jsonb := convert_from(NEW.payload, 'UTF8')::jsonb;
BEGIN
    INSERT INTO segment_history (segment_id, slug, change, description, auto_percent, layer, bucket_start,
                                 bucket_end, rollout_at, occurred_at, command_id)
    SELECT s.id, s.slug, e->>'change', e->>'description', (e->>'auto_percent')::numeric, e->>'layer',
           (e->>'bucket_start')::integer, (e->>'bucket_end')::integer, s.rollout_at,
           (e->>'occurred_at')::timestamptz, e->>'command_id'
    FROM segments s WHERE s.slug = e->>'slug' ORDER BY s.id DESC LIMIT 1;
    RETURN NULL;
END $$;
-- WHEN: membership events and results (nearly every row) never call the function.
CREATE TRIGGER outbox_segment_history AFTER INSERT ON outbox
    FOR EACH ROW WHEN (NEW.kind = 'segment') EXECUTE FUNCTION record_segment_change();

-- Before this migration only the present is known: each segment as it is now, since its creation.
INSERT INTO segment_history (segment_id, slug, change, description, auto_percent, layer, bucket_start, bucket_end,
                             rollout_at, occurred_at)
SELECT id, slug, 'created', description, auto_percent, layer, bucket_start, bucket_end, rollout_at, created_at
FROM segments;
INSERT INTO segment_history (segment_id, slug, change, description, auto_percent, layer, bucket_start, bucket_end,
                             rollout_at, occurred_at)
SELECT id, slug, 'deleted', description, auto_percent, layer, bucket_start, bucket_end, rollout_at, deleted_at
FROM segments WHERE deleted_at IS NOT NULL;

-- Exclusion intervals: [since, until). Statement triggers with transition tables: a segment's deletion drops
-- all its exclusions in one statement, and this follows in one statement too. `until` is the clock of the
-- end: never before the change that lifted it (an explicit add, whose membership covers the moment, or the
-- segment's deletion, after which it is no longer live).
CREATE TABLE exclusion_history (
    user_id    bigint      NOT NULL,
    segment_id bigint      NOT NULL,
    since      timestamptz NOT NULL,
    until      timestamptz
);
CREATE INDEX exclusion_history_user ON exclusion_history (user_id, segment_id, since);
CREATE UNIQUE INDEX exclusion_history_open ON exclusion_history (user_id, segment_id) WHERE until IS NULL;

CREATE FUNCTION record_exclusions_started() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO exclusion_history (user_id, segment_id, since)
    SELECT user_id, segment_id, excluded_at FROM started
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END $$;
CREATE TRIGGER exclusions_started AFTER INSERT ON exclusions REFERENCING NEW TABLE AS started
    FOR EACH STATEMENT EXECUTE FUNCTION record_exclusions_started();

CREATE FUNCTION record_exclusions_ended() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE exclusion_history h SET until = greatest(clock_timestamp(), h.since)
    FROM ended e WHERE h.user_id = e.user_id AND h.segment_id = e.segment_id AND h.until IS NULL;
    RETURN NULL;
END $$;
CREATE TRIGGER exclusions_ended AFTER DELETE ON exclusions REFERENCING OLD TABLE AS ended
    FOR EACH STATEMENT EXECUTE FUNCTION record_exclusions_ended();

INSERT INTO exclusion_history (user_id, segment_id, since) SELECT user_id, segment_id, excluded_at FROM exclusions;

-- The expiry an explicit add gave (a history row said only "added"). Filled from the membership row the same
-- transaction wrote just before; rollout fan-outs (reason auto_percent, never an expiry) do not call it.
ALTER TABLE membership_history ADD COLUMN expires_at timestamptz;

CREATE FUNCTION record_membership_expiry() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    SELECT m.expires_at INTO NEW.expires_at FROM memberships m
    WHERE m.user_id = NEW.user_id AND m.segment_id = NEW.segment_id;
    RETURN NEW;
END $$;
CREATE TRIGGER membership_history_expiry BEFORE INSERT ON membership_history
    FOR EACH ROW WHEN (NEW.operation = 'added' AND NEW.reason <> 'auto_percent' AND NEW.expires_at IS NULL)
    EXECUTE FUNCTION record_membership_expiry();

-- Backfill: an add followed by an expiry expired then; the latest add of a current membership has its expiry.
WITH next AS (
    SELECT id, lead(operation) OVER w AS operation, lead(reason) OVER w AS reason, lead(occurred_at) OVER w AS at
    FROM membership_history WINDOW w AS (PARTITION BY user_id, segment_id ORDER BY occurred_at, id)
)
UPDATE membership_history h SET expires_at = n.at FROM next n
WHERE h.id = n.id AND h.operation = 'added' AND n.operation = 'removed' AND n.reason = 'expired';
UPDATE membership_history h SET expires_at = m.expires_at FROM memberships m
WHERE m.expires_at IS NOT NULL AND h.user_id = m.user_id AND h.segment_id = m.segment_id AND h.operation = 'added'
  AND h.id = (SELECT max(id) FROM membership_history l WHERE l.user_id = m.user_id AND l.segment_id = m.segment_id);

-- A user's last transition of a segment before an instant: one probe per segment. It serves the report's
-- user filter too, which the one-column-less index it replaces was for.
CREATE INDEX membership_history_user_segment ON membership_history (user_id, segment_id, occurred_at, id);
DROP INDEX membership_history_user_time;

-- Read your writes (after=): one notification per transaction that stored command results; the API's
-- listener then looks up the ids its requests wait for.
CREATE FUNCTION notify_commands_processed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('segmentation_commands', '');
    RETURN NULL;
END $$;
CREATE TRIGGER processed_commands_notify AFTER INSERT ON processed_commands
    FOR EACH STATEMENT EXECUTE FUNCTION notify_commands_processed();
