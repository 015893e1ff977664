-- Groups of the stream $1 (all streams when NULL), by stream and name.
SELECT s.name, g.name, g.created_at
FROM @ns@.groups g JOIN @ns@.streams s ON s.id = g.stream_id
WHERE $1::text IS NULL OR s.name = $1
ORDER BY s.name, g.name
