SELECT skipped, queued FROM @ns@.reset_group($1, $2, $3)
