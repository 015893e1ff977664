-- Groups of the stream $1 (all streams when NULL), by stream and name.
SELECT stream, "group", created_at, ordered, max_in_flight FROM @ns@._group_list($1::text)
