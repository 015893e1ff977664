-- One step of a maintenance pass (`_maintain_step`): one stream's partition work, or the rest.
SELECT stream_id, partitions_created, partitions_dropped, partitions_skipped, dedupe_removed
FROM @ns@._maintain_step($1, $2)
