-- Dead letters of group $2 of stream $1 (only message $3 when not NULL), oldest first, at most $4.
SELECT message_id, attempts, reason, error, dead_at, payload_bytes, headers
FROM @ns@.dead_letters
WHERE stream = $1 AND "group" = $2 AND ($3::uuid IS NULL OR message_id = $3)
ORDER BY dead_at, message_id
LIMIT $4
