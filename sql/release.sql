-- $1 group, $2 ids, $3 attempts, $4 lease tokens.
SELECT id FROM @ns@._release($1, $2::uuid[], $3::int4[], $4::int8[]) AS id
