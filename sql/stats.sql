SELECT stream, "group", ready, delayed, in_flight, dead,
       extract(epoch FROM oldest_ready_age)::float8 AS oldest_ready_secs
FROM @ns@.stats()
