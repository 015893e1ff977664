-- Fast path for publishes without dedupe key: messages, one delivery row per group of the stream
-- and the counter delta, in one statement. $1 stream name; arrays are one element per message.
-- The publish rule (payload limit, visibility) is `_payload_ok` and `_visible_at`
-- (sql/functions/publish.sql), inlined here by the planner.
WITH s AS (
    SELECT id, max_payload FROM @ns@.streams WHERE name = $1
), m AS (
    INSERT INTO @ns@.messages (stream_id, id, payload, is_json, headers)
    SELECT s.id, u.id, u.payload, u.is_json, u.headers
    FROM s, unnest($2::uuid[], $3::bytea[], $4::bool[], $5::jsonb[]) AS u (id, payload, is_json, headers)
    WHERE @ns@._payload_ok($1, u.payload, s.max_payload)
    RETURNING 1
), d AS (
    INSERT INTO @ns@.delivery_state (group_id, message_id, visible_at)
    SELECT g.id, u.id, @ns@._visible_at(u.deliver_at, u.delay_us * interval '1 microsecond', u.priority)
    FROM s JOIN @ns@.groups g ON g.stream_id = s.id,
         unnest($2::uuid[], $6::timestamptz[], $7::int8[], $8::int4[]) AS u (id, deliver_at, delay_us, priority)
), c AS (
    INSERT INTO @ns@.counter_deltas (group_id, pending)
    SELECT g.id, cardinality($2::uuid[]) FROM s JOIN @ns@.groups g ON g.stream_id = s.id
)
SELECT count(*) FROM m
