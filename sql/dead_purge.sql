SELECT @ns@.purge_dead($1, $2, $3)::int8
