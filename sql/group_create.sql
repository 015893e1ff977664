-- $1 stream, $2 group, $3 start, $4 if_not_exists, $5 ordered, $6 max_in_flight,
-- $7 rate, $8 burst, $9 key_rate, $10 key_burst (NULL: none / the default burst), $11 fair,
-- $12 max_in_flight_per_key (NULL: none).
SELECT @ns@.create_group($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, fair => $11, max_in_flight_per_key => $12)
