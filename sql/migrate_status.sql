-- Whether the namespace is current: the $1 migrations applied, and every function file ($2 names,
-- $3 texts as rendered) applied with its present text. Needs `_migration_status`
-- (migrate_installed.sql checks that it exists).
SELECT @ns@._migration_status($1, $2::text[], $3::text[])
