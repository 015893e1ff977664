-- $1 group, $2 ids, $3 attempts, $4 lease tokens, $5 delays (µs), $6 errors.
-- `at_ms` is the transaction's now() in epoch ms: every retry is visible at or after it, so
-- the wake-up hint sent after the commit can point the scout at it (see `due_waker.rs`).
-- `wakes`: as in ack.sql.
SELECT id, dead, floor(extract(epoch FROM now()) * 1000)::int8 AS at_ms, (SELECT @ns@._settle_wakes($1)) AS wakes
FROM @ns@._nack($1, $2::uuid[], $3::int4[],
    (SELECT array_agg(d * interval '1 microsecond' ORDER BY i) FROM unnest($5::int8[]) WITH ORDINALITY AS x (d, i)),
    $6::text[], $4::int8[])
