-- Publish of one message with any option (dedupe key included), through the SQL function.
-- $10: the ordering key (NULL for none).
SELECT message_id, duplicate
FROM @ns@._publish($1, $2, $3, $4, $5,
                   @ns@._visible_at($6::timestamptz, $7::int8 * interval '1 microsecond', $9), $8, $9, $10)
