-- A rollout's fan-out in progress (service/write/rollouts.py): committed a pass at a time, so the relay publishes
-- its events while it runs, and resumed from here by whichever worker reads the command again after a crash.
-- The row exists from the first pass that left users to do until the pass that did the last one; while it exists,
-- every segment command that locks the segment waits (rollouts.settle). Usually empty.
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

-- A rollout in progress holds its command id: no other command stores it meanwhile (a publisher's duplicate or a
-- reused id on another partition, decided before the rollout's first pass committed). Refused like the inbox's own
-- key, so the worker redoes that command and finds the id taken (service/infra/errors.is_stored_meanwhile).
CREATE FUNCTION refuse_ids_of_rollouts() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    taken text;
BEGIN
    SELECT f.command_id INTO taken FROM stored JOIN fan_outs f USING (command_id) LIMIT 1;
    IF taken IS NOT NULL THEN
        RAISE unique_violation USING MESSAGE = format('command id %s is taken by a rollout in progress', taken),
            CONSTRAINT = 'processed_commands_pkey', TABLE = 'processed_commands';
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER processed_commands_not_rolling_out AFTER INSERT ON processed_commands
    REFERENCING NEW TABLE AS stored FOR EACH STATEMENT EXECUTE FUNCTION refuse_ids_of_rollouts();
