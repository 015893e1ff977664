-- Commits asynchronously (autocommit on the engine's pool only, never inside a caller's
-- transaction): a claim lost in a crash only means an earlier redelivery.
SELECT c.id, c.attempt, c.lease_expires_at, c.payload, c.is_json, c.headers, c.lease_expired
FROM (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit,
     @ns@._claim($1, $2, $3, $4::int8 * interval '1 microsecond') AS c
