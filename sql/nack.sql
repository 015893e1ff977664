SELECT id, dead FROM @ns@._nack($1, $2::uuid[], $3::int4[],
    (SELECT array_agg(d * interval '1 microsecond' ORDER BY i) FROM unnest($4::int8[]) WITH ORDINALITY AS x (d, i)),
    $5::text[])
