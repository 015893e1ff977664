-- Acks of the previous batch and the claim of the next in one round trip, one commit and one
-- function call (`_claim` acks first). The acked ids come in a first row without an id (none
-- when the acks removed nothing); the claimed rows carry an empty array.
-- With acks, the commit waits for its WAL flush: an ack is durable when this returns. Without
-- any, it is a claim alone and $9 says whether it waits (as claim.sql's $6).
-- `wakes` (in the first row, with the acks): as in ack.sql.
-- $1 group, $2 ids, $3 attempts, $4 max, $5 consumer, $6 lease (µs), $7 lease tokens, $8 claim
-- floor (NULL: walk from the start), $9 claims commit without waiting for the flush.
SELECT coalesce(c.acked, '{}') AS ids, c.id, c.attempt, c.lease_expires_at, c.payload, c.is_json, c.headers,
       c.lease_expired, c.lease_token, c.key, c.due_at,
       CASE WHEN cardinality(c.acked) > 0 THEN (SELECT @ns@._settle_wakes($1)) END AS wakes
FROM (SELECT CASE WHEN $9::bool AND coalesce(cardinality($2::uuid[]), 0) = 0
                  THEN set_config('synchronous_commit', 'off', true) END) AS s,
     @ns@._claim($1, $4, $5, $6::int8 * interval '1 microsecond', $8::timestamptz, $2::uuid[], $3::int4[], $7::int8[]) AS c
