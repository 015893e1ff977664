SELECT partitions_created, partitions_dropped, dedupe_removed FROM @ns@.maintain($1)
