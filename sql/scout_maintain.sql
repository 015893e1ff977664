-- The scout's maintenance pass, fenced: runs only while holder $1 still has term $2.
SELECT partitions_created, partitions_dropped, dedupe_removed FROM @ns@._scout_maintain($1, $2)
