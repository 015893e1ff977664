-- One step of the scout's maintenance pass, fenced: runs only while holder $1 still has term $2;
-- $3 the last stream done, $4 the longest wait for a stream's locks (µs).
SELECT stream_id, partitions_created, partitions_dropped, partitions_skipped, dedupe_removed
FROM @ns@._scout_maintain($1, $2, $3, $4::int8 * interval '1 microsecond')
