-- The read API keeps each user's answer now in memory (service/read/answers.py); these triggers tell it, at
-- commit, whose answers a transaction changed, whichever code path wrote (user commands, fan-outs, expiries, SQL
-- by hand). A payload is up to 300 user ids, comma-separated (8 000 bytes at most); '*' means every user: a change
-- of a segment (its percent, layer, deletion), a truncation, or a statement of more than 10 000 rows (a rollout's
-- slice), for which a flush costs less than naming each user.
CREATE FUNCTION notify_users_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    users bigint[];
BEGIN
    IF TG_OP = 'TRUNCATE' OR TG_TABLE_NAME = 'segments' THEN  -- no transition table: not a word of changed_rows
        PERFORM pg_notify('segmentation_users', '*');
        RETURN NULL;
    END IF;
    IF (SELECT count(*) FROM changed_rows) > 10000 THEN
        PERFORM pg_notify('segmentation_users', '*');
        RETURN NULL;
    END IF;
    SELECT array_agg(DISTINCT user_id) INTO users FROM changed_rows;
    FOR i IN 1 .. coalesce(cardinality(users), 0) BY 300 LOOP
        PERFORM pg_notify('segmentation_users', array_to_string(users[i:i + 299], ','));
    END LOOP;
    RETURN NULL;
END $$;

-- On memberships and exclusions, one trigger per event: a trigger with a transition table takes one event only.
-- An UPDATE never changes user_id (the key), so its new rows name every user it touched.
DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['memberships', 'exclusions'] LOOP
        EXECUTE format('CREATE TRIGGER %1$s_notify_in AFTER INSERT ON %1$s REFERENCING NEW TABLE AS changed_rows '
                       'FOR EACH STATEMENT EXECUTE FUNCTION notify_users_changed()', t);
        EXECUTE format('CREATE TRIGGER %1$s_notify_changed AFTER UPDATE ON %1$s REFERENCING NEW TABLE AS changed_rows '
                       'FOR EACH STATEMENT EXECUTE FUNCTION notify_users_changed()', t);
        EXECUTE format('CREATE TRIGGER %1$s_notify_out AFTER DELETE ON %1$s REFERENCING OLD TABLE AS changed_rows '
                       'FOR EACH STATEMENT EXECUTE FUNCTION notify_users_changed()', t);
        EXECUTE format('CREATE TRIGGER %1$s_notify_truncated AFTER TRUNCATE ON %1$s '
                       'FOR EACH STATEMENT EXECUTE FUNCTION notify_users_changed()', t);
    END LOOP;
END $$;
-- A segment's row decides everyone's rollouts (and, deleted, every member's answer).
CREATE TRIGGER segments_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON segments
    FOR EACH STATEMENT EXECUTE FUNCTION notify_users_changed();
