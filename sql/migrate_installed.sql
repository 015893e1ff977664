-- Whether both bookkeeping tables exist (the namespace was migrated by a version that knows
-- function files) and the function that reads them for roles without table privileges.
SELECT to_regclass(format('%I._sqlx_migrations', @ns_lit@)) IS NOT NULL
   AND to_regclass(format('%I._pgtide_sql', @ns_lit@)) IS NOT NULL
   AND to_regprocedure(format('%I._migration_status(bigint, text[], text[])', @ns_lit@)) IS NOT NULL
