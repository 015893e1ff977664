SELECT holder, term, since, expires_at FROM @ns@.scout WHERE active
