-- Publish of one message with any option (dedupe key included), through the SQL function.
SELECT message_id, duplicate
FROM @ns@._publish($1, $2, $3, $4, $5,
                   coalesce($6::timestamptz, now() + $7::int8 * interval '1 microsecond'), $8, $9)
