SELECT @ns@.grant_runtime($1)
