SELECT @ns@.release_consumer($1, $2, $3)
