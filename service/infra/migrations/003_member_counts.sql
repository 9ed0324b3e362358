-- member_count without a count(*) per request: every statement that adds or removes memberships adds its
-- difference per segment to a counter, whichever code path runs it (user commands, fan-outs, expiries).
-- Not a column of segments: writers hold segments FOR SHARE, and an UPDATE there would serialize every
-- transaction naming the segment. Counters are spread over 64 slots by backend (a connection's transactions
-- never wait on each other; two connections rarely share a slot); a segment's count is the sum of its slots.
CREATE TABLE segment_member_counts (
    segment_id bigint   NOT NULL,
    slot       smallint NOT NULL,
    members    bigint   NOT NULL,
    PRIMARY KEY (segment_id, slot)
);
INSERT INTO segment_member_counts (segment_id, slot, members)
SELECT segment_id, 0, count(*) FROM memberships GROUP BY segment_id;

CREATE FUNCTION count_memberships() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO segment_member_counts AS c (segment_id, slot, members)
        SELECT segment_id, pg_backend_pid() % 64, count(*) FROM changed_rows GROUP BY segment_id ORDER BY segment_id
        ON CONFLICT (segment_id, slot) DO UPDATE SET members = c.members + EXCLUDED.members;
    ELSE
        INSERT INTO segment_member_counts AS c (segment_id, slot, members)
        SELECT segment_id, pg_backend_pid() % 64, -count(*) FROM changed_rows GROUP BY segment_id ORDER BY segment_id
        ON CONFLICT (segment_id, slot) DO UPDATE SET members = c.members + EXCLUDED.members;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER memberships_counted_in AFTER INSERT ON memberships
    REFERENCING NEW TABLE AS changed_rows FOR EACH STATEMENT EXECUTE FUNCTION count_memberships();
CREATE TRIGGER memberships_counted_out AFTER DELETE ON memberships
    REFERENCING OLD TABLE AS changed_rows FOR EACH STATEMENT EXECUTE FUNCTION count_memberships();
