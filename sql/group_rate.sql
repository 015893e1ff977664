-- $1 stream, $2 group, $3 rate per second (NULL: none), $4 burst (NULL: the default), $5 per key.
-- False when the group does not exist.
SELECT @ns@.set_rate_limit($1, $2, $3, $4, $5)
