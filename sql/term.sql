-- $1 group, $2 ids, $3 attempts, $4 lease tokens, $5 reasons. `wakes`: as in ack.sql.
SELECT id, (SELECT @ns@._settle_wakes($1)) AS wakes FROM @ns@._term($1, $2::uuid[], $3::int4[], $5::text[], $4::int8[]) AS id
