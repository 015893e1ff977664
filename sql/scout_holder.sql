SELECT holder FROM @ns@.scout WHERE active
