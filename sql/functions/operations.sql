-- pgtide operations: functions behind the CLI's grant, group reset, trim, consumer release and
-- stats-rate commands, and the bookkeeping check of `is_migrated()`. Every function that reads or
-- writes a table is SECURITY DEFINER (runtime roles hold no table privileges); the grant
-- functions run with the caller's rights (the owner's).
--
-- `migrate()` re-applies this file (after the versioned migrations, in one transaction with the
-- other function files, under the namespace's migration lock) whenever its text changes; the
-- checksum of what was applied is kept in `@ns@._pgtide_sql`. Every statement here must be
-- re-runnable: CREATE OR REPLACE. It cannot change a function's result type or argument names, or
-- drop or retype a view's columns: such a change needs a `DROP ... IF EXISTS` just before it in
-- this file (and dependants recreated in the same file). Tables, indexes and data changes belong
-- in `migrations/`, never here.

---------------------------------------------------------------------------------------------------
-- grants. Runtime roles hold no table or sequence privileges at all: every function they call
-- that reads or writes a table runs as the namespace owner (SECURITY DEFINER with a pinned
-- search_path), so the only way to change a queue is through the functions and their checks.
-- `_grants` (migration 0009) records the roles granted here; `_regrant()`, run by `migrate()`
-- after the function files, re-grants them what a release added or re-created. None of these
-- functions is SECURITY DEFINER: the caller needs the right to grant on the namespace (its owner).

-- The functions a role may execute: a runtime role (publish, consume, settle, stats, scout,
-- maintenance, health, creating streams and groups) or a read-only one (stats and lookups). Every
-- other function (replay, purge, reset, trim, delete, the `_`-helpers the engine does not call)
-- is the owner's.
CREATE OR REPLACE FUNCTION @ns@._granted_functions(p_read_only boolean) RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY['uuid_time', 'uuid_floor', 'valid_name', 'stream_id', 'group_id', 'stats',
                 'group_stats', 'publish_counts', '_stream_list', '_group_list', '_group_ref', '_migration_status',
                 -- constants the `deliveries` view reads (ordering.sql)
                 '_parked_bound', '_parked_offset']
           || CASE WHEN p_read_only THEN '{}'::text[] ELSE ARRAY[
                 'uuid_v7', '_visible_at', '_publish', '_publish_batch', '_publish_keyed', 'publish', 'publish_bytes',
                 '_claim', '_ack', '_nack', '_term', '_extend', '_release', '_pause', '_settle_wakes',
                 'read', 'ack', 'nack', 'term', 'in_progress', 'extend', 'release_consumer',
                 'create_stream', 'ensure_partitions', 'streams_per_transaction', 'create_group', 'maintain',
                 '_maintain_step', '_scout_acquire', '_scout_resign', '_scout_due', '_scout_maintain',
                 '_wake_register', '_wake_release'] END
$$;

-- Sets `p_role`'s privileges in the namespace to exactly those of its kind: everything it held
-- before is revoked first, so a runtime role granted read-only afterwards is downgraded.
CREATE OR REPLACE FUNCTION @ns@._apply_grant(p_role name, p_read_only boolean) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r record;
BEGIN
    EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA %I FROM %I', @ns_lit@, p_role);
    EXECUTE format('REVOKE ALL ON ALL SEQUENCES IN SCHEMA %I FROM %I', @ns_lit@, p_role);
    EXECUTE format('REVOKE ALL ON ALL FUNCTIONS IN SCHEMA %I FROM %I', @ns_lit@, p_role);
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', @ns_lit@, p_role);
    -- Views read the tables with the owner's rights; the role reads the views only.
    FOR r IN SELECT c.relname FROM pg_class c
             WHERE c.relnamespace = @ns_lit@::regnamespace AND c.relkind = 'v' ORDER BY c.relname
    LOOP
        EXECUTE format('GRANT SELECT ON %I.%I TO %I', @ns_lit@, r.relname, p_role);
    END LOOP;
    -- regprocedure prints schema-qualified and quoted (the namespace is not on this search_path).
    FOR r IN SELECT p.oid::regprocedure AS f FROM pg_proc p
             WHERE p.pronamespace = @ns_lit@::regnamespace
               AND p.proname = ANY (@ns@._granted_functions(p_read_only))
             ORDER BY 1
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', r.f, p_role);
    END LOOP;
END $$;

-- Checks that `p_role` can be granted or revoked: it exists and is not the namespace owner
-- (whose rights come from owning, and must not be revoked).
CREATE OR REPLACE FUNCTION @ns@._check_grantee(p_role text) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF p_role IS NULL OR NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = p_role) THEN
        RAISE EXCEPTION 'pgtide: role % does not exist', quote_nullable(p_role)
            USING ERRCODE = 'PT007', HINT = 'create it first (CREATE ROLE ... LOGIN)';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_namespace n JOIN pg_roles r ON r.oid = n.nspowner
               WHERE n.nspname = @ns_lit@ AND r.rolname = p_role) THEN
        RAISE EXCEPTION 'pgtide: role % owns namespace %', quote_literal(p_role), quote_literal(@ns_lit@)
            USING ERRCODE = 'PT001', HINT = 'the owner needs no grant; grant a separate runtime role';
    END IF;
END $$;

-- Grants `p_role` what running needs and nothing more (`p_read_only`: what dashboards and
-- inspection need): USAGE on the schema (no CREATE), SELECT on the views, EXECUTE on the
-- functions of its kind, no table or sequence privilege. Idempotent; a later call with the other
-- kind replaces the first (read-only after runtime downgrades). Run as the namespace owner.
DROP FUNCTION IF EXISTS @ns@.grant_runtime(text);
CREATE OR REPLACE FUNCTION @ns@.grant_runtime(p_role text, p_read_only boolean DEFAULT false) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM @ns@._check_grantee(p_role);
    PERFORM @ns@._check(p_read_only IS NOT NULL, 'read_only must not be NULL',
        'pass false for a runtime role, true for a read-only one');
    INSERT INTO @ns@._grants AS g (role, read_only) VALUES (p_role, p_read_only)
    ON CONFLICT (role) DO UPDATE SET read_only = excluded.read_only, granted_at = now();
    -- Releases before 0009 granted EXECUTE on every future function by default: not any more.
    EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA %I REVOKE EXECUTE ON FUNCTIONS FROM %I',
                   @ns_lit@, p_role);
    PERFORM @ns@._apply_grant(p_role, p_read_only);
END $$;

-- Takes back everything `p_role` holds in the namespace, schema USAGE included. Returns whether
-- the role had been granted through `grant_runtime`.
CREATE OR REPLACE FUNCTION @ns@.revoke_runtime(p_role text) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    had boolean;
BEGIN
    PERFORM @ns@._check_grantee(p_role);
    DELETE FROM @ns@._grants WHERE role = p_role;
    had := FOUND;
    EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA %I REVOKE EXECUTE ON FUNCTIONS FROM %I',
                   @ns_lit@, p_role);
    EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA %I FROM %I', @ns_lit@, p_role);
    EXECUTE format('REVOKE ALL ON ALL SEQUENCES IN SCHEMA %I FROM %I', @ns_lit@, p_role);
    EXECUTE format('REVOKE ALL ON ALL FUNCTIONS IN SCHEMA %I FROM %I', @ns_lit@, p_role);
    EXECUTE format('REVOKE ALL ON SCHEMA %I FROM %I', @ns_lit@, p_role);
    RETURN had;
END $$;

-- Run by `migrate()` after it applied anything: no function is executable by PUBLIC (a function
-- re-created by a release starts with PUBLIC EXECUTE), and every recorded role holds exactly the
-- privileges of its kind in this release. Roles dropped since are forgotten.
CREATE OR REPLACE FUNCTION @ns@._regrant() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    g record;
BEGIN
    EXECUTE format('REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA %I FROM PUBLIC', @ns_lit@);
    DELETE FROM @ns@._grants x WHERE NOT EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = x.role);
    FOR g IN SELECT role, read_only FROM @ns@._grants ORDER BY role LOOP
        PERFORM @ns@._apply_grant(g.role, g.read_only);
    END LOOP;
END $$;

---------------------------------------------------------------------------------------------------
-- bookkeeping

-- Whether the namespace is current: the `p_version` migrations applied, and every function file
-- (`p_files` names, `p_bodies` texts as rendered) applied with its present text. For
-- `is_migrated()` (and `pgtide health`) as a role that cannot read the bookkeeping tables.
CREATE OR REPLACE FUNCTION @ns@._migration_status(p_version bigint, p_files text[], p_bodies text[])
RETURNS boolean
-- PL/pgSQL: its tables need not exist when the file is applied (the install script of
-- `pgtide migrate --print-sql` creates sqlx's table after the function files).
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN (SELECT count(*) FROM @ns@._sqlx_migrations WHERE success AND version <= p_version) = p_version
       AND (SELECT count(*)
            FROM unnest(p_files, p_bodies) AS f (file, body)
            JOIN @ns@._pgtide_sql s ON s.file = f.file AND s.checksum = sha256(convert_to(f.body, 'UTF8')))
           = cardinality(p_files);
END $$;

---------------------------------------------------------------------------------------------------
-- group reset

-- Replays the group from `from_time` (every retained message when NULL): pending deliveries of
-- messages published before the point are dropped (`skipped`); every retained message from the
-- point on that is not pending in the group is queued again (`queued`), dead letters included
-- (they leave the dead letters). Deliveries already pending from the point on keep their state.
CREATE OR REPLACE FUNCTION @ns@.reset_group(stream text, "group" text, from_time timestamptz DEFAULT NULL)
RETURNS TABLE (skipped bigint, queued bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    gid    integer;
    sid    integer;
    bound  uuid;
    n_skip bigint;
    n_back bigint;
    n_dead bigint;
    v_ordered boolean;
    v_limited boolean;
BEGIN
    PERFORM @ns@._check_name('stream', stream);
    PERFORM @ns@._check_name('group', "group");
    gid := @ns@.group_id(stream, "group");
    -- Shared with publishers: `set_max_in_flight_per_key` does not change the group's lines
    -- between reading its limit here and parking deliveries below.
    PERFORM pg_advisory_xact_lock_shared(@ns@._key_limit_lock(gid));
    SELECT g.stream_id, g.ordered OR g.max_in_flight_per_key IS NOT NULL,
           NOT g.ordered AND g.max_in_flight_per_key IS NOT NULL
    INTO sid, v_ordered, v_limited FROM @ns@.groups g WHERE g.id = gid;
    bound := CASE WHEN from_time IS NULL THEN '00000000-0000-0000-0000-000000000000'::uuid
                  ELSE @ns@.uuid_floor(greatest(from_time, 'epoch'::timestamptz)) END;
    -- One reset of a group at a time; publishes and claims go on.
    PERFORM pg_advisory_xact_lock(hashtext(@ns_lit@ || '.reset.' || gid));
    WITH gone AS (
        DELETE FROM @ns@.delivery_state d WHERE d.group_id = gid AND d.message_id < bound
        RETURNING 1
    ) SELECT count(*) INTO n_skip FROM gone;
    -- In an ordered group (or one with a per-key limit: `v_limited`) keyed messages are queued
    -- behind their key's line (in id order); `_repair_keys` then gives every key its heads.
    WITH back AS (
        INSERT INTO @ns@.delivery_state (group_id, message_id, visible_at, key, key_seq, key_limited)
        SELECT gid, m.id,
               least(@ns@.uuid_time(m.id), now())
                   + CASE WHEN v_ordered AND m.key IS NOT NULL THEN @ns@._parked_offset() ELSE interval '0' END,
               CASE WHEN v_ordered THEN m.key END,
               CASE WHEN v_ordered AND m.key IS NOT NULL THEN nextval('@ns@.key_seq') END,
               CASE WHEN v_limited AND m.key IS NOT NULL THEN true END
        FROM @ns@.messages m WHERE m.stream_id = sid AND m.id >= bound
        ORDER BY m.id
        ON CONFLICT (group_id, message_id) DO NOTHING
        RETURNING 1
    ) SELECT count(*) INTO n_back FROM back;
    IF v_ordered THEN
        PERFORM @ns@._repair_keys(gid);
    END IF;
    WITH gone AS (
        DELETE FROM @ns@.dead_letter_state d WHERE d.group_id = gid AND d.message_id >= bound
        RETURNING 1
    ) SELECT count(*) INTO n_dead FROM gone;
    IF n_back - n_skip <> 0 OR n_dead <> 0 THEN
        INSERT INTO @ns@.counter_deltas (group_id, pending, dead) VALUES (gid, n_back - n_skip, -n_dead);
    END IF;
    -- Deliveries skipped while leased leave room in a capped group (what came back notifies
    -- through the NOTIFY trigger).
    PERFORM @ns@._wake_room(gid, n_skip);
    skipped := n_skip;
    queued := n_back;
    RETURN NEXT;
END $$;

---------------------------------------------------------------------------------------------------
-- trim

-- Removes the stream's oldest messages, with their deliveries and dead letters in every group:
-- those older than `max_age`, and those beyond the newest `max_len` (both when both are given).
-- Whole partitions are dropped; the rest is deleted row by row. Returns the messages removed.
CREATE OR REPLACE FUNCTION @ns@.trim_stream(stream text, max_age interval DEFAULT NULL, max_len bigint DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    sid     integer;
    bound   uuid;
    by_len  uuid;
    p       record;
    n       bigint := 0;
    c       bigint;
    -- (group, key) of the keyed deliveries removed, for `_repair_keys`
    v_lost_groups integer[];
    v_lost_keys   text[];
BEGIN
    PERFORM @ns@._check_name('stream', stream);
    PERFORM @ns@._check(max_age IS NOT NULL OR max_len IS NOT NULL, 'trim needs max_age or max_len',
        'e.g. trim_stream(''orders'', max_age => ''7 days'') or max_len => 1000000');
    PERFORM @ns@._check(coalesce(max_age >= '0', true) AND coalesce(max_len >= 0, true), 'trim limits must not be negative',
        'max_age is an age (>= 0), max_len a count of messages to keep (>= 0)');
    sid := @ns@.stream_id(stream);
    PERFORM pg_advisory_xact_lock(hashtext(@ns_lit@ || '.trim.' || sid));
    -- Partition DDL takes the namespace's partition lock (maintenance.sql), so a trim racing
    -- maintain() never drops a partition maintain is dropping or creating.
    PERFORM @ns@._lock_partitions();
    IF max_age IS NOT NULL THEN
        bound := @ns@.uuid_floor(now() - max_age);
    END IF;
    IF max_len = 0 THEN
        by_len := 'ffffffff-ffff-ffff-ffff-ffffffffffff'::uuid;
    ELSIF max_len IS NOT NULL THEN
        -- The oldest message to keep: the max_len-th newest.
        SELECT m.id INTO by_len FROM @ns@.messages m WHERE m.stream_id = sid
        ORDER BY m.id DESC OFFSET max_len - 1 LIMIT 1;
    END IF;
    bound := greatest(bound, by_len);
    IF bound IS NULL THEN
        RETURN 0;
    END IF;

    -- Deliveries and dead letters first, so no group is left with a delivery whose message is gone.
    WITH gone AS (
        DELETE FROM @ns@.delivery_state d USING @ns@.groups g
        WHERE g.stream_id = sid AND d.group_id = g.id AND d.message_id < bound
        RETURNING d.group_id, d.key
    ), counted AS (
        INSERT INTO @ns@.counter_deltas (group_id, pending)
        SELECT group_id, -count(*) FROM gone GROUP BY group_id
    )
    SELECT coalesce(array_agg(x.group_id), '{}'), coalesce(array_agg(x.key), '{}')
    INTO v_lost_groups, v_lost_keys
    FROM (SELECT DISTINCT g2.group_id, g2.key FROM gone g2 WHERE g2.key IS NOT NULL) x;
    WITH gone AS (
        DELETE FROM @ns@.dead_letter_state d USING @ns@.groups g
        WHERE g.stream_id = sid AND d.group_id = g.id AND d.message_id < bound
        RETURNING d.group_id
    )
    INSERT INTO @ns@.counter_deltas (group_id, dead)
    SELECT group_id, -count(*) FROM gone GROUP BY group_id;

    FOR p IN SELECT * FROM @ns@.partitions
             WHERE stream_id = sid AND @ns@.uuid_floor(upper) <= bound AND upper <= now()
             ORDER BY lower
    LOOP
        EXECUTE format('SELECT count(*) FROM %I.%I', @ns_lit@, p.table_name) INTO c;
        EXECUTE format('DROP TABLE %I.%I', @ns_lit@, p.table_name);
        DELETE FROM @ns@.partitions WHERE stream_id = sid AND lower = p.lower;
        n := n + c;
    END LOOP;
    DELETE FROM @ns@.messages m WHERE m.stream_id = sid AND m.id < bound;
    GET DIAGNOSTICS c = ROW_COUNT;
    -- Trimmed heads let their keys move on (ordering.sql): only the keys of the deliveries
    -- removed, a lock per key touched rather than per key of the group.
    PERFORM @ns@._repair_keys(g.id, ARRAY(SELECT u.k FROM unnest(v_lost_groups, v_lost_keys) AS u (gid, k)
                                         WHERE u.gid = g.id))
    FROM @ns@.groups g
    WHERE g.stream_id = sid AND (g.ordered OR g.max_in_flight_per_key IS NOT NULL)
      AND g.id = ANY (v_lost_groups);
    -- Deliveries removed while leased leave room in a group with a concurrency limit: wake the
    -- stream's consumers at commit (the engine's pool, which does not notify, wakes them itself).
    IF n + c > 0 AND coalesce(current_setting('pgtide.notify', true), '') <> 'off' THEN
        PERFORM pg_notify('pgtide.' || @ns_lit@, stream);
    END IF;
    RETURN n + c;
END $$;

---------------------------------------------------------------------------------------------------
-- consumers

-- Hands back every delivery still leased to `p_consumer` in the group: visible again at once, and
-- the attempt does not count. For a consumer process that shuts down without knowing exactly what
-- its last, interrupted fetch claimed. Consumer names must be unique per process for this.
CREATE OR REPLACE FUNCTION @ns@._release_consumer(p_group integer, p_consumer text) RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_sort = off
SET enable_hashjoin = off SET enable_mergejoin = off SET jit = off
AS $$
    WITH back AS (
        UPDATE @ns@.delivery_state d
        SET visible_at = now(), consumer = NULL, attempts = greatest(d.attempts - 1, 0)
        WHERE d.group_id = p_group AND d.visible_at > now() AND d.visible_at < @ns@._parked_bound()
          AND d.consumer = p_consumer
        RETURNING 1
    )
    SELECT count(*) FROM back
$$;

CREATE OR REPLACE FUNCTION @ns@.release_consumer(stream text, "group" text, consumer text) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n bigint;
BEGIN
    PERFORM @ns@._check_name('stream', stream);
    PERFORM @ns@._check_name('group', "group");
    PERFORM @ns@._check_name('consumer', consumer);
    n := @ns@._release_consumer(@ns@.group_id(stream, "group"), consumer);
    -- What came back is ready at once: wake the stream's consumers at commit (the engine's pool,
    -- which does not notify, wakes them itself).
    IF n > 0 AND coalesce(current_setting('pgtide.notify', true), '') <> 'off' THEN
        PERFORM pg_notify('pgtide.' || @ns_lit@, stream);
    END IF;
    RETURN n;
END $$;

---------------------------------------------------------------------------------------------------
-- rates

-- Messages inserted per stream since the server's statistics were reset, from the cumulative
-- table statistics of the stream's partitions (no scan; flushed by backends about once a second,
-- and partitions dropped by retention take their counts with them). Sampled twice, it gives a
-- publish rate.
CREATE OR REPLACE FUNCTION @ns@.publish_counts()
RETURNS TABLE (stream text, published bigint)
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp STABLE AS $$
    SELECT s.name, coalesce(sum(st.n_tup_ins), 0)::bigint
    FROM @ns@.streams s
    LEFT JOIN LATERAL pg_catalog.pg_partition_tree(format('%I.%I', @ns_lit@, 'messages_s' || s.id)::regclass) t
           ON t.isleaf
    LEFT JOIN pg_catalog.pg_stat_user_tables st ON st.relid = t.relid
    GROUP BY s.name
    ORDER BY s.name
$$;
