-- $1 group, $2 ids, $3 attempts, $4 lease tokens. `wakes`: whether the engine wakes the group's
-- consumers after the commit (`_settle_wakes`; evaluated once, and only when a row comes back).
SELECT id, (SELECT @ns@._settle_wakes($1)) AS wakes FROM @ns@._ack($1, $2::uuid[], $3::int4[], $4::int8[]) AS id
