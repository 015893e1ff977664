-- The namespace's migration bookkeeping table ($1, quoted and qualified), or NULL before the
-- first migration.
SELECT to_regclass($1)::text
