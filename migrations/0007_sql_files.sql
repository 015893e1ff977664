-- Bookkeeping for the function and view files in `sql/functions/` that `migrate()` re-applies
-- after the versioned migrations: one row per file with the checksum (SHA-256 of the text as
-- rendered for this namespace) of what was last applied, so an unchanged file is skipped.
CREATE TABLE @ns@._pgtide_sql (
    file       text PRIMARY KEY,
    checksum   bytea NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
