SELECT @ns@.group_id($1, $2)
