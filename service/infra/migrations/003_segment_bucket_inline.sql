-- The same bucket, computed 3 times faster: an IMMUTABLE SQL function is inlined into the query only if its body
-- is immutable too, and convert_to() is STABLE, so every call went through the function executor. decode(...,
-- 'escape') gives the same bytes for every salt ('slug:id' or 'layer:slug': [A-Za-z0-9_.-], ':' and digits, ASCII without
-- a backslash), so every bucket stays what it was (and what service/bucket.py computes).
CREATE OR REPLACE FUNCTION segment_bucket(salt text, user_id bigint) RETURNS integer
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN (('x' || substr(encode(sha256(decode(salt || ':' || user_id::text, 'escape')), 'hex'), 1, 8))::bit(32)::bigint
        % 10000)::integer;
