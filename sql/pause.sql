-- PauseKey. $1 group, $2 ids, $3 attempts, $4 lease tokens, $5 until.
SELECT id FROM @ns@._pause($1, $2::uuid[], $3::int4[], $4::int8[], $5::timestamptz) AS id
