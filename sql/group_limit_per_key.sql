-- $1 stream, $2 group, $3 the per-key limit (NULL: none). False when the group does not exist.
SELECT @ns@.set_max_in_flight_per_key($1, $2, $3)
