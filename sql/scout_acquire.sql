-- Takes or renews the scout lease: $1 holder, $2 term held (0 when none), $3 TTL in microseconds.
SELECT @ns@._scout_acquire($1, $2, $3::int8 * interval '1 microsecond')
