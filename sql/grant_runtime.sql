-- $1 role, $2 read-only.
SELECT @ns@.grant_runtime($1, $2)
