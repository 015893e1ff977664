-- PauseKey. $1 group, $2 ids, $3 attempts, $4 lease tokens, $5 until. `wakes`: as in ack.sql.
SELECT id, (SELECT @ns@._settle_wakes($1)) AS wakes FROM @ns@._pause($1, $2::uuid[], $3::int4[], $4::int8[], $5::timestamptz) AS id
