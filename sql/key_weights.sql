-- The keys of fair group $2 of stream $1 with a weight of their own, heaviest first, at most $3
-- (the `key_weights` view, sql/functions/fair.sql).
SELECT key, weight FROM @ns@.key_weights WHERE stream = $1 AND "group" = $2
ORDER BY weight DESC, key
LIMIT $3
