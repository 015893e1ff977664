-- pgtide maintenance: partitions ahead, retention by DROP, counter folding, the maintenance pass.
--
-- `migrate()` re-applies this file (after the versioned migrations, in one transaction with the
-- other function files, under the namespace's migration lock) whenever its text changes; the
-- checksum of what was applied is kept in `@ns@._pgtide_sql`. Every statement here must be
-- re-runnable: CREATE OR REPLACE. It cannot change a function's result type or argument names, or
-- drop or retype a view's columns: such a change needs a `DROP ... IF EXISTS` just before it in
-- this file (and dependants recreated in the same file). Tables, indexes and data changes belong
-- in `migrations/`, never here.

-- Partition DDL (ensure_partition, drop_expired_partitions, maintain, trim_stream) runs under one
-- transaction-level lock per namespace: their check-then-create and check-then-drop would
-- otherwise race (a by-hand maintain() against the scout's fails on "already exists"). One lock,
-- taken first, cannot form a cycle. Held to commit; taking it again in the same transaction is free.
CREATE OR REPLACE FUNCTION @ns@._lock_partitions() RETURNS void
LANGUAGE sql AS $$ SELECT pg_advisory_xact_lock(hashtext(@ns_lit@ || '.partitions')) $$;

-- Creates the range partition of `stream` that holds `at`, moving any rows the default partition
-- caught for that range (publishes while maintenance was not running are never lost).
CREATE OR REPLACE FUNCTION @ns@.ensure_partition(p_stream_id integer, at timestamptz) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    width  interval;
    w_ms   bigint;
    lo_ms  bigint;
    lo     timestamptz;
    hi     timestamptz;
    tbl    text;
    parent text := format('messages_s%s', p_stream_id);
BEGIN
    PERFORM @ns@._check(at IS NOT NULL, 'at must not be NULL', 'leave it out for now()');
    PERFORM @ns@._lock_partitions();
    SELECT partition_interval INTO width FROM @ns@.streams WHERE id = p_stream_id;
    IF width IS NULL THEN RETURN false; END IF;
    w_ms := floor(extract(epoch FROM width) * 1000)::bigint;
    lo_ms := floor(extract(epoch FROM at) * 1000)::bigint / w_ms * w_ms;
    lo := to_timestamp(lo_ms / 1000.0);
    hi := to_timestamp((lo_ms + w_ms) / 1000.0);
    IF EXISTS (SELECT 1 FROM @ns@.partitions WHERE stream_id = p_stream_id AND lower < hi AND upper > lo) THEN
        RETURN false;
    END IF;
    tbl := format('messages_s%s_%s', p_stream_id, lo_ms);
    -- The stream's table before its default partition (the ATTACH below needs it anyway): the
    -- same order as purge_stream, which locks the stream's table with every partition. Taking the
    -- default partition first (the DELETE) and the parent last deadlocked with a purge.
    EXECUTE format('LOCK TABLE %I.%I IN SHARE UPDATE EXCLUSIVE MODE', @ns_lit@, parent);
    -- The ATTACH below needs the default partition exclusively: take it before moving rows and
    -- building the key, so that a lock not granted in time (maintenance waits briefly,
    -- `_maintain_stream`) costs no work that is then rolled back.
    EXECUTE format('LOCK TABLE %I.%I IN ACCESS EXCLUSIVE MODE', @ns_lit@, parent || '_default');
    EXECUTE format('CREATE TABLE %I.%I (LIKE %I.messages INCLUDING DEFAULTS)', @ns_lit@, tbl, @ns_lit@);
    EXECUTE format('WITH moved AS (DELETE FROM %I.%I WHERE id >= $1 AND id < $2 RETURNING *) '
                   'INSERT INTO %I.%I SELECT * FROM moved',
                   @ns_lit@, parent || '_default', @ns_lit@, tbl)
        USING @ns@.uuid_floor(lo), @ns@.uuid_floor(hi);
    EXECUTE format('ALTER TABLE %I.%I ADD PRIMARY KEY (stream_id, id)', @ns_lit@, tbl);
    EXECUTE format('ALTER TABLE %I.%I ATTACH PARTITION %I.%I FOR VALUES FROM (%L) TO (%L)',
                   @ns_lit@, parent, @ns_lit@, tbl, @ns@.uuid_floor(lo), @ns@.uuid_floor(hi));
    INSERT INTO @ns@.partitions (stream_id, lower, upper, table_name) VALUES (p_stream_id, lo, hi, tbl);
    RETURN true;
END $$;

-- Drops every partition of the stream whose newest possible message is older than the stream's
-- retention, with the delivery state and dead letters that still pointed into it.
CREATE OR REPLACE FUNCTION @ns@.drop_expired_partitions(p_stream_id integer, at timestamptz DEFAULT now())
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    p       record;
    n       integer := 0;
    keep    interval;
    -- (group, key) of the keyed deliveries removed, for `_repair_keys`
    v_lost_groups integer[] := '{}';
    v_lost_keys   text[] := '{}';
BEGIN
    PERFORM @ns@._check(at IS NOT NULL, 'at must not be NULL', 'leave it out for now()');
    PERFORM @ns@._lock_partitions();
    SELECT retention INTO keep FROM @ns@.streams WHERE id = p_stream_id;
    FOR p IN SELECT * FROM @ns@.partitions
             WHERE stream_id = p_stream_id AND upper <= at - keep ORDER BY lower
    LOOP
        -- Rows are locked in primary-key order first, the order settles lock them in (`= ANY`
        -- on the key): a consumer acking old deliveries while retention drops them then waits
        -- instead of deadlocking (seen in `pgtide bench --soak` with consumers minutes behind).
        WITH doomed AS (
            SELECT d.group_id, d.message_id FROM @ns@.delivery_state d
            WHERE d.group_id IN (SELECT g.id FROM @ns@.groups g WHERE g.stream_id = p_stream_id)
              AND d.message_id >= @ns@.uuid_floor(p.lower) AND d.message_id < @ns@.uuid_floor(p.upper)
            ORDER BY d.group_id, d.message_id
            FOR UPDATE
        ), gone AS (
            DELETE FROM @ns@.delivery_state d USING doomed x
            WHERE d.group_id = x.group_id AND d.message_id = x.message_id
            RETURNING d.group_id, d.key
        ), counted AS (
            INSERT INTO @ns@.counter_deltas (group_id, pending)
            SELECT group_id, -count(*) FROM gone GROUP BY group_id
        )
        SELECT v_lost_groups || coalesce(array_agg(x.group_id), '{}'), v_lost_keys || coalesce(array_agg(x.key), '{}')
        INTO v_lost_groups, v_lost_keys
        FROM (SELECT DISTINCT g2.group_id, g2.key FROM gone g2 WHERE g2.key IS NOT NULL) x;
        WITH doomed AS (
            SELECT d.group_id, d.message_id FROM @ns@.dead_letter_state d
            WHERE d.group_id IN (SELECT g.id FROM @ns@.groups g WHERE g.stream_id = p_stream_id)
              AND d.message_id >= @ns@.uuid_floor(p.lower) AND d.message_id < @ns@.uuid_floor(p.upper)
            ORDER BY d.group_id, d.message_id
            FOR UPDATE
        ), gone AS (
            DELETE FROM @ns@.dead_letter_state d USING doomed x
            WHERE d.group_id = x.group_id AND d.message_id = x.message_id
            RETURNING d.group_id
        )
        INSERT INTO @ns@.counter_deltas (group_id, dead)
        SELECT group_id, -count(*) FROM gone GROUP BY group_id;
        EXECUTE format('DROP TABLE %I.%I', @ns_lit@, p.table_name);
        DELETE FROM @ns@.partitions WHERE stream_id = p_stream_id AND lower = p.lower;
        n := n + 1;
    END LOOP;
    IF cardinality(v_lost_keys) > 0 THEN
        -- Heads may have gone with their partitions: their keys move on (ordering.sql). Only the
        -- keys of the deliveries removed, so the pass holds a lock per key it touched, not per
        -- key of the group.
        PERFORM @ns@._repair_keys(g.id, ARRAY(SELECT u.k FROM unnest(v_lost_groups, v_lost_keys) AS u (gid, k)
                                             WHERE u.gid = g.id))
        FROM @ns@.groups g
        WHERE g.stream_id = p_stream_id AND (g.ordered OR g.max_in_flight_per_key IS NOT NULL)
          AND g.id = ANY (v_lost_groups);
    END IF;
    RETURN n;
END $$;

-- Folds counter deltas into group_counters. Cheap; skips if another session is folding.
CREATE OR REPLACE FUNCTION @ns@.fold_counters() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off AS $$
BEGIN
    IF current_setting('transaction_read_only')::boolean
       OR NOT pg_try_advisory_xact_lock(hashtext(@ns_lit@ || '.fold_counters')) THEN
        RETURN;
    END IF;
    WITH d AS (DELETE FROM @ns@.counter_deltas RETURNING group_id, pending, dead),
         s AS (SELECT group_id, sum(pending) AS pending, sum(dead) AS dead FROM d GROUP BY group_id)
    INSERT INTO @ns@.group_counters AS c (group_id, pending, dead)
    SELECT group_id, pending, dead FROM s
    ON CONFLICT (group_id) DO UPDATE
        SET pending = c.pending + excluded.pending, dead = c.dead + excluded.dead;
END $$;

-- The slots of one stream that have no partition overlapping them: now and three intervals
-- ahead, computed as ensure_partition does. No SET clause (so that it is inlined into its callers,
-- SECURITY DEFINER functions that set the search path); not granted to any role.
CREATE OR REPLACE FUNCTION @ns@._missing_slots(p_stream integer, at timestamptz)
RETURNS SETOF timestamptz
LANGUAGE sql STABLE AS $$
    SELECT slot.at_i
    FROM @ns@.streams st
    CROSS JOIN LATERAL (
        SELECT at + st.partition_interval * i AS at_i,
               floor(extract(epoch FROM st.partition_interval) * 1000)::bigint AS w_ms
        FROM generate_series(0, 3) i
    ) slot
    CROSS JOIN LATERAL (
        SELECT floor(extract(epoch FROM slot.at_i) * 1000)::bigint / slot.w_ms * slot.w_ms AS lo_ms
    ) b
    WHERE st.id = p_stream
      AND NOT EXISTS (
        SELECT 1 FROM @ns@.partitions p
        WHERE p.stream_id = st.id AND p.lower < to_timestamp((b.lo_ms + slot.w_ms) / 1000.0)
          AND p.upper > to_timestamp(b.lo_ms / 1000.0))
    ORDER BY slot.at_i
$$;

-- The first stream after `after` (by id) with partition work at `at`: a partition past its
-- retention, or a slot without a partition. NULL when none. One query over the streams in id
-- order that stops at the first with work, so a pass with nothing to do stays cheap with
-- thousands of streams. No SET clause, as `_missing_slots`.
CREATE OR REPLACE FUNCTION @ns@._maintain_next(at timestamptz, after integer)
RETURNS integer
LANGUAGE sql STABLE AS $$
    SELECT st.id FROM @ns@.streams st
    WHERE st.id > coalesce(after, -1)
      AND (EXISTS (SELECT 1 FROM @ns@.partitions p
                   WHERE p.stream_id = st.id AND p.upper <= at - st.retention)
           OR EXISTS (SELECT 1 FROM @ns@._missing_slots(st.id, at)))
    ORDER BY st.id
    LIMIT 1
$$;

-- One stream's partition work: drops its partitions past retention (the same test as
-- drop_expired_partitions), then creates the partitions its slots lack. The caller holds the
-- namespace's partition lock (`_lock_partitions`).
--
-- Partition DDL locks the stream's tables hard: creating a partition takes an ACCESS EXCLUSIVE
-- lock on the stream's default partition (PostgreSQL scans it for rows of the new range), and
-- dropping one locks the stream's table; every claim of the stream reads the stream's partitions
-- (`_lookup_s<id>`), so it waits until the transaction that took the lock ends. And a lock
-- request that waits (for a long transaction reading the stream, a VACUUM) queues every later
-- claim of the stream behind it. So the locks are waited for at most `p_lock_wait` (clamped to
-- 10 ms – 10 s; the scout starts at 100 ms and doubles it while streams keep being skipped): the
-- drop, and each partition, is undone when its lock is not granted in time (`skipped`), and left
-- to the next pass. The scout runs each stream's work in its own transaction (`_maintain_step`),
-- so a claim waits at most for its own stream's DDL.
CREATE OR REPLACE FUNCTION @ns@._maintain_stream(p_stream integer, at timestamptz, p_lock_wait interval,
                                                 OUT created integer, OUT dropped integer,
                                                 OUT skipped boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off AS $$
DECLARE
    slot   timestamptz;
    v_wait text := current_setting('lock_timeout');
    v_ms   bigint := (extract(epoch FROM greatest(least(coalesce(p_lock_wait, interval '100 ms'),
                                                          interval '10 s'), interval '10 ms')) * 1000)::bigint;
BEGIN
    created := 0;
    dropped := 0;
    skipped := false;
    -- For this function's statements only (restored below; an error aborts the transaction).
    PERFORM set_config('lock_timeout', v_ms || 'ms', true);
    BEGIN
        dropped := @ns@.drop_expired_partitions(p_stream, at);
    EXCEPTION WHEN lock_not_available THEN
        skipped := true;
    END;
    FOR slot IN SELECT m FROM @ns@._missing_slots(p_stream, at) m LOOP
        BEGIN
            IF @ns@.ensure_partition(p_stream, slot) THEN
                created := created + 1;
            END IF;
        EXCEPTION WHEN lock_not_available THEN
            -- The next slot needs the same locks.
            skipped := true;
            EXIT;
        END;
    END LOOP;
    PERFORM set_config('lock_timeout', v_wait, true);
END $$;

-- The rest of a maintenance pass, after the partitions: the dedupe window, rate buckets, fair
-- keys, wake-up registrations, counters. Returns how many dedupe keys it removed.
CREATE OR REPLACE FUNCTION @ns@._maintain_rest(at timestamptz) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off AS $$
DECLARE
    n integer;
BEGIN
    DELETE FROM @ns@.dedupe WHERE expires_at < at;
    GET DIAGNOSTICS n = ROW_COUNT;
    PERFORM @ns@._trim_rate_buckets();
    PERFORM @ns@._trim_fair_keys();
    PERFORM @ns@._trim_wake_waiters();
    PERFORM @ns@.fold_counters();
    RETURN n;
END $$;

-- A pass "as if" later drops partitions before their retention is up: only for members of the
-- owner role (retention tests, backfills), never for a runtime role. A minute of slack covers the
-- clock of a client that passes its own now.
CREATE OR REPLACE FUNCTION @ns@._check_maintain_at(at timestamptz) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM @ns@._check(at IS NOT NULL, 'at must not be NULL', 'leave it out for now()');
    IF at > now() + interval '1 minute' AND NOT pg_has_role(session_user,
            (SELECT n.nspowner FROM pg_namespace n WHERE n.nspname = @ns_lit@), 'MEMBER') THEN
        RAISE EXCEPTION 'pgtide: maintain() at a future time (%) is reserved to the namespace owner', at
            USING ERRCODE = '42501', HINT = 'leave at out (now), or run as the owner';
    END IF;
END $$;

-- One step of a maintenance pass, in its own transaction (the scout and the Rust `maintain()`
-- call it until it returns no stream): the partition work of the first stream after `after`
-- that has any (`_maintain_stream`, waiting at most `p_lock_wait` for a lock of the stream), or,
-- when none is left, the rest of the pass (`_maintain_rest`, its count in `dedupe_removed`) with
-- `stream_id` NULL. Each step locks one stream's tables, so a stream's claims never wait for
-- another stream's DDL, and the lock table never fills however many streams come due at once.
-- The namespace's partition lock is taken first and waited for as long as it takes (no claim
-- takes it: a trim or a by-hand maintain() holding it holds up no consumer).
CREATE OR REPLACE FUNCTION @ns@._maintain_step(at timestamptz, after integer, p_lock_wait interval DEFAULT interval '100 ms',
                                               OUT stream_id integer, OUT partitions_created integer,
                                               OUT partitions_dropped integer, OUT partitions_skipped integer,
                                               OUT dedupe_removed integer)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off AS $$
DECLARE
    w record;
BEGIN
    PERFORM @ns@._check_maintain_at(at);
    partitions_created := 0;
    partitions_dropped := 0;
    partitions_skipped := 0;
    dedupe_removed := 0;
    stream_id := @ns@._maintain_next(at, after);
    IF stream_id IS NULL THEN
        dedupe_removed := @ns@._maintain_rest(at);
        RETURN;
    END IF;
    PERFORM @ns@._lock_partitions();
    SELECT * INTO w FROM @ns@._maintain_stream(stream_id, at, p_lock_wait);
    partitions_created := w.created;
    partitions_dropped := w.dropped;
    partitions_skipped := CASE WHEN w.skipped THEN 1 ELSE 0 END;
END $$;

-- One maintenance pass in one transaction (`SELECT maintain()` from psql or pg_cron): partitions
-- ahead, retention, dedupe window, counters. Returns a summary.
--
-- A pass creates and drops about 64 partitions at most (`_maintain_budget()`; it stops after the
-- stream that reached it, so it may report a few more): every relation created or dropped stays locked to commit, and the
-- lock table is shared by the whole server, so a namespace of a thousand streams whose
-- partitions all come due at once (the first pass after they were created, or the day their
-- first partitions expire) would otherwise fail with "out of shared memory". A pass that used its
-- whole budget (64 or more) leaves the rest to the next call. A stream whose locks were not
-- granted within 100 ms is left to the next call too (`_maintain_stream`). Every stream's claims wait for the
-- DDL of the streams before it until the pass commits: the scout and the Rust `maintain()` run
-- `_maintain_step` instead, one stream per transaction.
CREATE OR REPLACE FUNCTION @ns@._maintain_budget() RETURNS integer
LANGUAGE sql IMMUTABLE AS $$ SELECT 64 $$;

CREATE OR REPLACE FUNCTION @ns@.maintain(at timestamptz DEFAULT now())
RETURNS TABLE (partitions_created integer, partitions_dropped integer, dedupe_removed integer)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off AS $$
DECLARE
    sid    integer := -1;
    w      record;
    budget integer := @ns@._maintain_budget();
BEGIN
    PERFORM @ns@._check_maintain_at(at);
    PERFORM @ns@._lock_partitions();
    partitions_created := 0;
    partitions_dropped := 0;
    LOOP
        EXIT WHEN partitions_created + partitions_dropped >= budget;
        sid := @ns@._maintain_next(at, sid);
        EXIT WHEN sid IS NULL;
        SELECT * INTO w FROM @ns@._maintain_stream(sid, at, interval '100 ms');
        partitions_created := partitions_created + w.created;
        partitions_dropped := partitions_dropped + w.dropped;
    END LOOP;
    dedupe_removed := @ns@._maintain_rest(at);
    RETURN NEXT;
END $$;
