-- Fast path for publishes without dedupe key: messages, one delivery row per group of the stream
-- and the counter delta, in one statement (`_publish_batch`, sql/functions/publish.sql, which runs
-- as the namespace owner). $1 stream name; arrays are one element per message. Returns how many
-- messages were written (0: no such stream).
SELECT @ns@._publish_batch($1, $2::uuid[], $3::bytea[], $4::bool[], $5::jsonb[], $6::timestamptz[],
                           $7::int8[], $8::int4[])
