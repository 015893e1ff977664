-- Least privilege: runtime roles get no table rights at all. Every function they call runs as
-- the namespace owner (SECURITY DEFINER, sql/functions/), and `grant_runtime` grants EXECUTE on
-- those functions and SELECT on the views only.
--
-- `_grants` records the roles granted through `grant_runtime`, so `migrate()` can grant them the
-- functions a later release adds or re-creates (a re-created function loses its grants) and
-- revoke what a release takes away.
--
-- Roles granted by an earlier release keep their table privileges here on purpose: processes
-- still running that release write the tables directly and must keep working until they are
-- restarted. Running `grant_runtime` again (`pgtide grant ROLE`) once every process runs this
-- release takes those privileges away and records the role.
CREATE TABLE @ns@._grants (
    role       name PRIMARY KEY,
    read_only  boolean NOT NULL,
    granted_at timestamptz NOT NULL DEFAULT now()
);
