SELECT @ns@.purge_stream($1)
