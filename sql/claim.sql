-- $1 group, $2 max, $3 consumer, $4 lease (µs), $5 claim floor (NULL: walk from the start),
-- $6 commit without waiting for the WAL flush (`synchronous_claims(false)`, the default): a
-- claim lost in a crash only makes its deliveries ready again, and the tokens it handed out are
-- never drawn again (core.sql `_lease_token`), so its holder's settles stay fenced. The setting
-- lasts until this statement's own transaction commits (it only has to be made before then); a
-- volatile one-row subquery is never flattened away, so it is evaluated.
SELECT c.id, c.attempt, c.lease_expires_at, c.payload, c.is_json, c.headers, c.lease_expired, c.lease_token, c.key, c.due_at
FROM (SELECT CASE WHEN $6::bool THEN set_config('synchronous_commit', 'off', true) END) AS s,
     @ns@._claim($1, $2, $3, $4::int8 * interval '1 microsecond', $5::timestamptz) AS c
