-- Segments: one row per incarnation of a slug; a deleted slug may be created again as a new row.
CREATE TABLE segments (
    id            bigserial PRIMARY KEY,
    slug          text        NOT NULL,
    description   text,
    auto_percent  numeric(5,2) NOT NULL DEFAULT 0 CHECK (auto_percent BETWEEN 0 AND 100),
    salt          text        NOT NULL,
    created_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL,
    rollout_at    timestamptz NOT NULL,
    deleted_at    timestamptz
);
CREATE UNIQUE INDEX segments_live_slug ON segments (slug) WHERE deleted_at IS NULL;
CREATE INDEX segments_slug ON segments (slug, id);
CREATE INDEX segments_rollout ON segments (id) WHERE deleted_at IS NULL AND auto_percent > 0;

-- Known users: seen in any command or registered; rollouts reach them with events and history.
CREATE TABLE users (
    user_id       bigint PRIMARY KEY,
    registered_at timestamptz NOT NULL
);

-- Current memberships. source 'auto_percent' rows are the materialized rollout of known users.
CREATE TABLE memberships (
    user_id     bigint      NOT NULL,
    segment_id  bigint      NOT NULL REFERENCES segments (id),
    source      text        NOT NULL CHECK (source IN ('manual', 'auto_percent')),
    added_at    timestamptz NOT NULL,
    expires_at  timestamptz,
    PRIMARY KEY (user_id, segment_id)
);
CREATE INDEX memberships_segment ON memberships (segment_id);
CREATE INDEX memberships_expiry ON memberships (expires_at, user_id, segment_id) WHERE expires_at IS NOT NULL;

-- Explicit removals: a removed user stays out of the segment's rollout until added again.
CREATE TABLE exclusions (
    user_id     bigint      NOT NULL,
    segment_id  bigint      NOT NULL REFERENCES segments (id),
    excluded_at timestamptz NOT NULL,
    PRIMARY KEY (user_id, segment_id)
);
CREATE INDEX exclusions_segment ON exclusions (segment_id);

-- Every membership transition, written in the same transaction as the change.
CREATE TABLE membership_history (
    id          bigserial PRIMARY KEY,
    user_id     bigint      NOT NULL,
    slug        text        NOT NULL,
    segment_id  bigint      NOT NULL,
    operation   text        NOT NULL CHECK (operation IN ('added', 'removed')),
    occurred_at timestamptz NOT NULL,
    reason      text        NOT NULL,
    command_id  text
);
CREATE INDEX membership_history_time ON membership_history (occurred_at, id);
CREATE INDEX membership_history_user_time ON membership_history (user_id, occurred_at, id);

-- Inbox: every command id seen, the hash of its body and its result (idempotency, GET /commands).
CREATE TABLE processed_commands (
    command_id   text PRIMARY KEY,
    type         text        NOT NULL,
    body_hash    text        NOT NULL,
    result       jsonb       NOT NULL,
    processed_at timestamptz NOT NULL
);

-- Consumed offsets, written with the effects: the worker seeks here on assignment.
CREATE TABLE consumer_offsets (
    consumer_group text   NOT NULL,
    topic          text   NOT NULL,
    partition      int    NOT NULL,
    next_offset    bigint NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, partition)
);

-- Outbox: what the relay publishes, in seq order. kind picks the topic (configurable names).
CREATE TABLE outbox (
    seq          bigserial PRIMARY KEY,
    kind         text        NOT NULL CHECK (kind IN ('membership', 'segment', 'result', 'dlq')),
    key          bytea,
    payload      bytea,  -- NULL: a dead-lettered tombstone
    event_id     text        NOT NULL,
    headers      jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);
CREATE INDEX outbox_unpublished ON outbox (seq) WHERE published_at IS NULL;
CREATE INDEX outbox_published ON outbox (published_at) WHERE published_at IS NOT NULL;

-- The rollout bucket of a user for a segment salt: 0..9999, reproducible offline (see README).
CREATE FUNCTION segment_bucket(salt text, user_id bigint) RETURNS integer
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN (('x' || substr(encode(sha256(convert_to(salt || ':' || user_id::text, 'UTF8')), 'hex'), 1, 8))::bit(32)::bigint % 10000)::integer;
