-- Layers: segments of one layer share one hash (salt 'layer:' || layer); each rolled-out segment of a layer owns
-- the bucket range [bucket_start, bucket_end) of it. Outside layers all three are NULL (the range is [0, percent)).
-- A layer segment keeps its start when its percent drops to 0 (an empty range); NULL start: never had a percent.
ALTER TABLE segments
    ADD COLUMN layer        text,
    ADD COLUMN bucket_start integer,
    ADD COLUMN bucket_end   integer,
    ADD CONSTRAINT segments_layer_range CHECK (
        (bucket_start IS NULL AND bucket_end IS NULL)
        OR (layer IS NOT NULL AND 0 <= bucket_start AND bucket_start <= bucket_end AND bucket_end <= 10000
            AND bucket_end - bucket_start = (auto_percent * 100)::integer)
    ),
    ADD CONSTRAINT segments_layer_rollout CHECK (layer IS NULL OR auto_percent = 0 OR bucket_start IS NOT NULL);
CREATE INDEX segments_layer ON segments (layer) WHERE deleted_at IS NULL AND layer IS NOT NULL;

-- Whether a segment's rollout covers a user: the one predicate of the read side and of set-based registration.
CREATE FUNCTION segment_rolls_out(salt text, layer text, bucket_start integer, auto_percent numeric, user_id bigint)
RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN auto_percent > 0
   AND segment_bucket(CASE WHEN layer IS NULL THEN salt ELSE 'layer:' || layer END, user_id) - coalesce(bucket_start, 0)
       BETWEEN 0 AND (auto_percent * 100)::integer - 1;

-- Scheduled starts: the user becomes a member at starts_at (the scheduler publishes StartMembership then).
-- Not a membership yet, so nothing that reads memberships sees it early. One per user and segment: a later add
-- replaces it, a later remove cancels it.
CREATE TABLE scheduled_memberships (
    user_id      bigint      NOT NULL,
    segment_id   bigint      NOT NULL REFERENCES segments (id),
    starts_at    timestamptz NOT NULL,
    expires_at   timestamptz CHECK (expires_at > starts_at),
    scheduled_at timestamptz NOT NULL,
    command_id   text,
    PRIMARY KEY (user_id, segment_id)
);
CREATE INDEX scheduled_memberships_start ON scheduled_memberships (starts_at, user_id, segment_id);
CREATE INDEX scheduled_memberships_segment ON scheduled_memberships (segment_id);

-- The scheduler's command ids are an HMAC under this key: deterministic for every scheduler instance (they all
-- read it here), unguessable for a publisher who can write to the commands topic but not read the database.
CREATE TABLE scheduler_key (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    secret    text    NOT NULL
);
INSERT INTO scheduler_key (secret) VALUES (replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''));
