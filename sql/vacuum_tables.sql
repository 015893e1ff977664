-- The namespace's hot tables (rows updated or deleted at message rate) as PostgreSQL's table
-- statistics see them, for the scout's vacuum and `pgtide health`. One row per table: dead and
-- live row versions, the last manual and automatic vacuum, whether autovacuum is on for the
-- table (the server's setting, statistics collection and the table's own `autovacuum_enabled`),
-- whether the current role may VACUUM it (owner or member of the owner, superuser, database
-- owner; PostgreSQL 17's MAINTAIN privilege) and its owner. Every row (and the one row with a NULL
-- table when there are none) also carries the server's autovacuum setting, autovacuum_naptime in
-- seconds, the current role and the server's clock. Catalogs only: any role can run it.
SELECT t.relname::text AS table_name,
       t.n_dead_tup,
       t.n_live_tup,
       t.last_vacuum,
       t.last_autovacuum,
       g.autovacuum AND coalesce((SELECT o.option_value::boolean
                                  FROM pg_catalog.pg_options_to_table(t.reloptions) o
                                  WHERE o.option_name = 'autovacuum_enabled'), true) AS table_autovacuum,
       pg_catalog.pg_has_role(t.relowner, 'USAGE')
           OR pg_catalog.pg_has_role(g.datdba, 'USAGE')
           OR CASE WHEN g.version >= 170000
                   THEN pg_catalog.has_table_privilege(t.relid, 'MAINTAIN') ELSE false END AS can_vacuum,
       pg_catalog.pg_get_userbyid(t.relowner)::text AS owner,
       g.autovacuum,
       g.naptime,
       current_user::text AS role,
       now() AS at
FROM (SELECT current_setting('autovacuum')::boolean AND current_setting('track_counts')::boolean AS autovacuum,
             (SELECT p.setting::integer FROM pg_catalog.pg_settings p WHERE p.name = 'autovacuum_naptime') AS naptime,
             current_setting('server_version_num')::integer AS version,
             (SELECT d.datdba FROM pg_catalog.pg_database d WHERE d.datname = pg_catalog.current_database()) AS datdba) g
LEFT JOIN (SELECT s.relid, s.relname, s.n_dead_tup, s.n_live_tup, s.last_vacuum, s.last_autovacuum,
                  c.reloptions, c.relowner
           FROM pg_catalog.pg_stat_user_tables s
           JOIN pg_catalog.pg_class c ON c.oid = s.relid
           WHERE s.schemaname = @ns_lit@
             AND s.relname IN ('delivery_state', 'counter_deltas', 'dead_letter_state', 'dedupe',
                               'group_counters', 'rate_buckets', 'fair_keys', 'scout_lease',
                               'wake_waiters')) t ON true
ORDER BY t.relname
