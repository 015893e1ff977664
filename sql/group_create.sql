SELECT @ns@.create_group($1, $2, $3, $4, $5, $6)
