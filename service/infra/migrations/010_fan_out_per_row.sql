-- The same bucket with less work a row: PostgreSQL 18 casts bytea to an integer (big-endian; 4 bytes into a
-- bigint are never negative), so the first 4 bytes of the digest need no hex text, no 'x' || ... ::bit(32) parse.
-- Still inlined (every function of the body is immutable) and still decode(..., 'escape') for the bytes of the
-- salt: the same bytes as convert_to(..., 'UTF8') for every salt the service makes ('slug:id', 'layer:slug': ASCII
-- without a backslash), so every bucket stays what it was (and what service/bucket.py computes).
-- PostgreSQL 17 (supported, docker-compose.yml) has no such cast: there the body of migration 003 stays.
DO $$
BEGIN
    IF current_setting('server_version_num')::integer >= 180000 THEN
        EXECUTE $body$
CREATE OR REPLACE FUNCTION segment_bucket(salt text, user_id bigint) RETURNS integer
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN (substring(sha256(decode(salt || ':' || user_id::text, 'escape')) FOR 4)::bigint % 10000)::integer
$body$;
    END IF;
END $$;
