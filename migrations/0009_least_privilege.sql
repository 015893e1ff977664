-- Least privilege: runtime roles get no table rights at all. Every function they call runs as
-- the namespace owner (SECURITY DEFINER, sql/functions/), and `grant_runtime` grants EXECUTE on
-- those functions and SELECT on the views only.
--
-- `_grants` records the roles granted through `grant_runtime`, so `migrate()` can grant them the
-- functions a later release adds or re-creates (a re-created function loses its grants) and
-- revoke what a release takes away.
CREATE TABLE @ns@._grants (
    role       name PRIMARY KEY,
    read_only  boolean NOT NULL,
    granted_at timestamptz NOT NULL DEFAULT now()
);

-- Roles granted by an earlier release hold table privileges (INSERT on messages, UPDATE on the
-- scout lease, ...) and default EXECUTE on every function. Take them away and record the roles as
-- runtime roles: the function files applied after this migration grant them the definer
-- functions again (see `_apply_grants` in sql/functions/operations.sql).
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT DISTINCT rol.rolname
        FROM pg_catalog.pg_class c
        CROSS JOIN LATERAL pg_catalog.aclexplode(c.relacl) a
        JOIN pg_catalog.pg_roles rol ON rol.oid = a.grantee
        WHERE c.relnamespace = @ns_lit@::regnamespace AND a.grantee <> c.relowner
    LOOP
        EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA %I FROM %I', @ns_lit@, r.rolname);
        EXECUTE format('REVOKE ALL ON ALL SEQUENCES IN SCHEMA %I FROM %I', @ns_lit@, r.rolname);
        EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA %I REVOKE EXECUTE ON FUNCTIONS FROM %I',
                       @ns_lit@, r.rolname);
        INSERT INTO @ns@._grants (role, read_only) VALUES (r.rolname, false) ON CONFLICT DO NOTHING;
    END LOOP;
END $$;
