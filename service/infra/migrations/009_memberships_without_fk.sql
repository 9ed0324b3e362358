-- memberships.segment_id without its foreign key: the check was one query per inserted row (half the cost of a
-- membership insert: 26 vs 58 µs a command of two adds, a rollout's 100 000 rows 0.85 s) and could never fail.
-- Segments are never deleted (a deletion sets deleted_at), and every writer of memberships takes its segment id from
-- a segments row it has locked in the same transaction (FOR SHARE for users' commands and bulk adds, FOR UPDATE for
-- fan-outs). The chaos suite's invariants check that no membership names a missing or deleted segment.
ALTER TABLE memberships DROP CONSTRAINT memberships_segment_id_fkey;
