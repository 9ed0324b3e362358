-- Fan-outs walk a segment's members in user id order, a slice at a time: (segment_id, user_id) serves both
-- that walk and every lookup by segment the old index served.
CREATE INDEX memberships_segment_user ON memberships (segment_id, user_id);
DROP INDEX memberships_segment;
