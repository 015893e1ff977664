SELECT @ns@.revoke_runtime($1)
