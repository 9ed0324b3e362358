-- The outbox is a queue: the relay deletes a row once the broker has acknowledged it (no published_at, no purge).
-- Every row carries its shard, a hash of its key: one relay leads a shard at a time, so a key's rows leave in order
-- while several relays share the work. 24 shards: a whole number of shards for 1, 2, 3, 4, 6 or 8 relays.
-- The relay (producers/relay.py SHARDS) and this expression must agree.
DELETE FROM outbox WHERE published_at IS NOT NULL;
ALTER TABLE outbox DROP COLUMN published_at;
ALTER TABLE outbox ADD COLUMN shard smallint NOT NULL GENERATED ALWAYS AS (
    ((get_byte(decode(md5(coalesce(key, ''::bytea)), 'hex'), 0) * 256
      + get_byte(decode(md5(coalesce(key, ''::bytea)), 'hex'), 1)) % 24)::smallint) STORED;
