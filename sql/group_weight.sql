-- $1 stream, $2 group, $3 key (NULL: messages without one), $4 weight (NULL: the default, 1).
-- False when the group does not exist.
SELECT @ns@.set_key_weight($1, $2, $3, $4)
