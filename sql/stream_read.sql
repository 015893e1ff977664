-- Streams with their configuration (durations in seconds), by name: the one named $1, or all
-- when $1 is NULL.
SELECT name, extract(epoch FROM lease)::float8, max_deliver,
       (SELECT array_agg(extract(epoch FROM b)::float8 ORDER BY i) FROM unnest(backoff) WITH ORDINALITY AS x (b, i)),
       backoff_jitter, extract(epoch FROM retention)::float8, extract(epoch FROM partition_interval)::float8,
       extract(epoch FROM dedupe_window)::float8, max_payload, created_at
FROM @ns@._stream_list($1::text)
ORDER BY name
