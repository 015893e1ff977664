-- Groups of the stream $1 (all streams when NULL), by stream and name.
SELECT stream, "group", created_at, ordered, max_in_flight, rate, burst, key_rate, key_burst, fair,
       max_in_flight_per_key
FROM @ns@._group_list($1::text)
