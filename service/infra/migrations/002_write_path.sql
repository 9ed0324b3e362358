-- Fan-outs walk a segment's members in user id order, a slice at a time: (segment_id, user_id) serves both
-- that walk and every lookup by segment the old index served.
CREATE INDEX memberships_segment_user ON memberships (segment_id, user_id);
DROP INDEX memberships_segment;

-- A stored result is published again byte for byte as it was first published: keep its exact text (jsonb
-- re-serialized it with other spacing and key order). Query it as `result::jsonb` where JSON is needed.
ALTER TABLE processed_commands ALTER COLUMN result TYPE text USING result::text;
