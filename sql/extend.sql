-- in_progress. $1 group, $2 ids, $3 attempts, $4 lease tokens, $5 lease (µs).
SELECT id, lease_expires_at
FROM @ns@._extend($1, $2::uuid[], $3::int4[], $5::int8 * interval '1 microsecond', $4::int8[])
