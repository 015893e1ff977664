-- Creates a stream (registry function). $1 name; $2..$9 its configuration, durations in
-- microseconds; $10 if_not_exists. Returns whether it was created.
SELECT @ns@.create_stream($1, $2::int8 * interval '1 microsecond', $3,
    (SELECT array_agg(b * interval '1 microsecond' ORDER BY i) FROM unnest($4::int8[]) WITH ORDINALITY AS x (b, i)),
    $5::int8 * interval '1 microsecond', $6::int8 * interval '1 microsecond', $7,
    $8::int8 * interval '1 microsecond', $9::float4, $10)
