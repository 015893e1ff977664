-- The newest migration recorded in the namespace's bookkeeping table (sqlx's), NULL when none
-- succeeded. Run only after checking that the table exists.
SELECT max(version) FROM @ns@._sqlx_migrations WHERE success
