-- pgtide operations: functions behind the CLI's grant, group reset, trim, consumer release and
-- stats-rate commands. Admin functions that need DDL (trim drops partitions) are SECURITY DEFINER
-- like create_stream; the others run with the caller's rights.
--
-- `migrate()` re-applies this file (after the versioned migrations, in one transaction with the
-- other function files, under the namespace's migration lock) whenever its text changes; the
-- checksum of what was applied is kept in `@ns@._pgtide_sql`. Every statement here must be
-- re-runnable: CREATE OR REPLACE. It cannot change a function's result type or argument names, or
-- drop or retype a view's columns: such a change needs a `DROP ... IF EXISTS` just before it in
-- this file (and dependants recreated in the same file). Tables, indexes and data changes belong
-- in `migrations/`, never here.

---------------------------------------------------------------------------------------------------
-- grant

-- Grants `p_role` what running needs and nothing more: USAGE on the schema (no CREATE), the table
-- privileges the publish, claim, settle, scout and stats paths use, SELECT on the views, EXECUTE
-- on the functions. DDL (streams, groups, partitions, retention) happens inside SECURITY DEFINER
-- functions. Idempotent. The caller needs the right to grant on the namespace (its owner).
CREATE OR REPLACE FUNCTION @ns@.grant_runtime(p_role text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    t record;
BEGIN
    IF p_role IS NULL OR NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = p_role) THEN
        RAISE EXCEPTION 'pgtide: role % does not exist', quote_nullable(p_role)
            USING ERRCODE = 'PT007', HINT = 'create it first (CREATE ROLE ... LOGIN)';
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', @ns_lit@, p_role);
    FOR t IN SELECT * FROM (VALUES
        ('streams', 'SELECT'),
        ('groups', 'SELECT'),
        ('partitions', 'SELECT'),
        ('group_counters', 'SELECT'),
        ('messages', 'SELECT, INSERT'),
        ('delivery_state', 'SELECT, INSERT, UPDATE, DELETE'),
        ('dead_letter_state', 'SELECT, INSERT, DELETE'),
        ('dedupe', 'SELECT, INSERT, UPDATE'),
        ('counter_deltas', 'SELECT, INSERT'),
        ('scout_lease', 'SELECT, UPDATE'),
        ('_sqlx_migrations', 'SELECT'),
        ('_pgtide_sql', 'SELECT'),
        ('stream_stats', 'SELECT'),
        ('deliveries', 'SELECT'),
        ('dead_letters', 'SELECT'),
        ('messages_view', 'SELECT'),
        ('scout', 'SELECT')
    ) AS x (rel, privileges)
    LOOP
        IF to_regclass(format('%I.%I', @ns_lit@, t.rel)) IS NOT NULL THEN
            EXECUTE format('GRANT %s ON %I.%I TO %I', t.privileges, @ns_lit@, t.rel, p_role);
        END IF;
    END LOOP;
    IF to_regclass(format('%I.lease_tokens', @ns_lit@)) IS NOT NULL THEN
        EXECUTE format('GRANT USAGE ON SEQUENCE %I.lease_tokens TO %I', @ns_lit@, p_role);
    END IF;
    EXECUTE format('GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA %I TO %I', @ns_lit@, p_role);
    -- Functions that a later migrate() re-creates (a changed signature is dropped and created
    -- again) stay executable for the role, when the same owner runs migrate().
    EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA %I GRANT EXECUTE ON FUNCTIONS TO %I',
                   @ns_lit@, p_role);
END $$;

---------------------------------------------------------------------------------------------------
-- group reset

-- Replays the group from `from_time` (every retained message when NULL): pending deliveries of
-- messages published before the point are dropped (`skipped`); every retained message from the
-- point on that is not pending in the group is queued again (`queued`), dead letters included
-- (they leave the dead letters). Deliveries already pending from the point on keep their state.
CREATE OR REPLACE FUNCTION @ns@.reset_group(stream text, "group" text, from_time timestamptz DEFAULT NULL)
RETURNS TABLE (skipped bigint, queued bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    gid    integer;
    sid    integer;
    bound  uuid;
    n_skip bigint;
    n_back bigint;
    n_dead bigint;
BEGIN
    PERFORM @ns@._check_name('stream', stream);
    PERFORM @ns@._check_name('group', "group");
    gid := @ns@.group_id(stream, "group");
    SELECT g.stream_id INTO sid FROM @ns@.groups g WHERE g.id = gid;
    bound := CASE WHEN from_time IS NULL THEN '00000000-0000-0000-0000-000000000000'::uuid
                  ELSE @ns@.uuid_floor(greatest(from_time, 'epoch'::timestamptz)) END;
    -- One reset of a group at a time; publishes and claims go on.
    PERFORM pg_advisory_xact_lock(hashtext(@ns_lit@ || '.reset.' || gid));
    WITH gone AS (
        DELETE FROM @ns@.delivery_state d WHERE d.group_id = gid AND d.message_id < bound
        RETURNING 1
    ) SELECT count(*) INTO n_skip FROM gone;
    WITH back AS (
        INSERT INTO @ns@.delivery_state (group_id, message_id, visible_at)
        SELECT gid, m.id, least(@ns@.uuid_time(m.id), now())
        FROM @ns@.messages m WHERE m.stream_id = sid AND m.id >= bound
        ON CONFLICT DO NOTHING
        RETURNING 1
    ) SELECT count(*) INTO n_back FROM back;
    WITH gone AS (
        DELETE FROM @ns@.dead_letter_state d WHERE d.group_id = gid AND d.message_id >= bound
        RETURNING 1
    ) SELECT count(*) INTO n_dead FROM gone;
    IF n_back - n_skip <> 0 OR n_dead <> 0 THEN
        INSERT INTO @ns@.counter_deltas (group_id, pending, dead) VALUES (gid, n_back - n_skip, -n_dead);
    END IF;
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
        RETURNING d.group_id
    )
    INSERT INTO @ns@.counter_deltas (group_id, pending)
    SELECT group_id, -count(*) FROM gone GROUP BY group_id;
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
    RETURN n + c;
END $$;

---------------------------------------------------------------------------------------------------
-- consumers

-- Hands back every delivery still leased to `p_consumer` in the group: visible again at once, and
-- the attempt does not count. For a consumer process that shuts down without knowing exactly what
-- its last, interrupted fetch claimed. Consumer names must be unique per process for this.
CREATE OR REPLACE FUNCTION @ns@._release_consumer(p_group integer, p_consumer text) RETURNS bigint
LANGUAGE sql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_sort = off
SET enable_hashjoin = off SET enable_mergejoin = off SET jit = off
AS $$
    WITH back AS (
        UPDATE @ns@.delivery_state d
        SET visible_at = now(), consumer = NULL, attempts = greatest(d.attempts - 1, 0)
        WHERE d.group_id = p_group AND d.visible_at > now() AND d.consumer = p_consumer
        RETURNING 1
    )
    SELECT count(*) FROM back
$$;

CREATE OR REPLACE FUNCTION @ns@.release_consumer(stream text, "group" text, consumer text) RETURNS bigint
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM @ns@._check_name('stream', stream);
    PERFORM @ns@._check_name('group', "group");
    PERFORM @ns@._check_name('consumer', consumer);
    RETURN @ns@._release_consumer(@ns@.group_id(stream, "group"), consumer);
END $$;

---------------------------------------------------------------------------------------------------
-- rates

-- Messages inserted per stream since the server's statistics were reset, from the cumulative
-- table statistics of the stream's partitions (no scan; flushed by backends about once a second,
-- and partitions dropped by retention take their counts with them). Sampled twice, it gives a
-- publish rate.
CREATE OR REPLACE FUNCTION @ns@.publish_counts()
RETURNS TABLE (stream text, published bigint)
LANGUAGE sql STABLE AS $$
    SELECT s.name, coalesce(sum(st.n_tup_ins), 0)::bigint
    FROM @ns@.streams s
    LEFT JOIN LATERAL pg_catalog.pg_partition_tree(format('%I.%I', @ns_lit@, 'messages_s' || s.id)::regclass) t
           ON t.isleaf
    LEFT JOIN pg_catalog.pg_stat_user_tables st ON st.relid = t.relid
    GROUP BY s.name
    ORDER BY s.name
$$;
