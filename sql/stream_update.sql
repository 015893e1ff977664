-- Changes a stream's configuration. $1 name; $2..$9 as in stream_create.sql.
UPDATE @ns@.streams SET lease = $2::int8 * interval '1 microsecond', max_deliver = $3,
    backoff = (SELECT array_agg(b * interval '1 microsecond' ORDER BY i) FROM unnest($4::int8[]) WITH ORDINALITY AS x (b, i)),
    retention = $5::int8 * interval '1 microsecond', dedupe_window = $6::int8 * interval '1 microsecond',
    max_payload = $7, partition_interval = $8::int8 * interval '1 microsecond', backoff_jitter = $9::float4
WHERE name = $1
