SELECT @ns@.delete_group($1, $2)
