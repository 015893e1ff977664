-- $1 group, $2 ids, $3 attempts, $4 lease tokens, $5 delays (µs), $6 errors.
SELECT id, dead FROM @ns@._nack($1, $2::uuid[], $3::int4[],
    (SELECT array_agg(d * interval '1 microsecond' ORDER BY i) FROM unnest($5::int8[]) WITH ORDINALITY AS x (d, i)),
    $6::text[], $4::int8[])
