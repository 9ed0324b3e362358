-- A rollout's fan-out in progress (service/write/rollouts.py): committed a pass at a time, so the relay publishes
-- its events while it runs, and resumed from here by whichever worker reads the command again after a crash.
-- The row exists from the first pass that left users to do until the pass that did the last one; while it exists,
-- every command that locks the segment waits (rollouts.settle). Usually empty.
CREATE TABLE fan_outs (
    command_id  text        PRIMARY KEY,
    body_hash   text        NOT NULL,  -- a command with this id and another body is a conflict, not a resume
    segment_id  bigint      NOT NULL,
    slug        text        NOT NULL,
    salt        text        NOT NULL,  -- the hash the lines are on (the segment's, or its layer's)
    joining     boolean     NOT NULL,  -- users with a bucket in [low_line, high_line) join; else members >= low_line leave
    low_line    integer     NOT NULL,
    high_line   integer,
    occurred_at timestamptz NOT NULL,  -- the command's time: every event and history row of the rollout carries it
    after_user  bigint      NOT NULL,  -- the users up to this id are done
    events      bigint      NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX fan_outs_segment ON fan_outs (segment_id);
