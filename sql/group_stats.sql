-- $1 stream, $2 group: the depth of one group (PT002 / PT003 when missing).
SELECT ready, delayed, in_flight, dead, extract(epoch FROM oldest_ready_age)::float8 AS oldest_ready_secs
FROM @ns@.group_stats($1, $2)
