SELECT @ns@.delete_stream($1)
