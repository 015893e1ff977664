-- Whether both bookkeeping tables exist (the namespace was migrated by a version that knows
-- function files).
SELECT to_regclass(format('%I._sqlx_migrations', @ns_lit@)) IS NOT NULL
   AND to_regclass(format('%I._pgtide_sql', @ns_lit@)) IS NOT NULL
