-- Creates the time partitions of stream $1 for now and three intervals ahead (its own
-- transaction, right after stream_create). Returns how many it created.
SELECT @ns@.ensure_partitions($1)
