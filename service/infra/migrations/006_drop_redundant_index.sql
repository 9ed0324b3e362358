-- memberships (segment_id) is a prefix of memberships_segment_user (segment_id, user_id, migration 002): every
-- query by segment can use that one, and each membership written kept two indexes in step for nothing.
DROP INDEX IF EXISTS memberships_segment;
