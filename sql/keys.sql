-- The keys of group $2 of stream $1 with pending deliveries, most pending first, at most $3
-- (the `keys` view, sql/functions/inspection.sql).
SELECT key, pending, waiting, head_state, resumes_at, consumer,
       extract(epoch FROM oldest_age)::float8 AS oldest_secs
FROM @ns@.keys WHERE stream = $1 AND "group" = $2
ORDER BY pending DESC, key
LIMIT $3
