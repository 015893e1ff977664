-- $1 group, $2 max, $3 consumer, $4 lease (µs), $5 claim floor (NULL: walk from the start).
SELECT id, attempt, lease_expires_at, payload, is_json, headers, lease_expired, lease_token, key, due_at
FROM @ns@._claim($1, $2, $3, $4::int8 * interval '1 microsecond', $5::timestamptz)
