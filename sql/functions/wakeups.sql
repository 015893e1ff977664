-- pgtide wake-ups: the NOTIFY trigger function (the trigger itself is in migrations/0003) and the
-- scout's lease and due-time functions.
--
-- `migrate()` re-applies this file (after the versioned migrations, in one transaction with the
-- other function files, under the namespace's migration lock) whenever its text changes; the
-- checksum of what was applied is kept in `@ns@._pgtide_sql`. Every statement here must be
-- re-runnable: CREATE OR REPLACE. It cannot change a function's result type or argument names, or
-- drop or retype a view's columns: such a change needs a `DROP ... IF EXISTS` just before it in
-- this file (and dependants recreated in the same file). Tables, indexes and data changes belong
-- in `migrations/`, never here.

-- The wake lock of group `p_group`: one advisory key per bucket of 64 group ids, namespaced like
-- the key locks (another namespace's group with the same id never shares it). Buckets bound the
-- locks one transaction takes, however many groups it publishes to (advisory locks live in the
-- server's shared lock table); groups that share a bucket only cost each other a NOTIFY or a
-- longer wait of a registration. The NOTIFY trigger computes the same key inline.
CREATE OR REPLACE FUNCTION @ns@._wake_lock(p_group integer) RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$ SELECT hashtext(@ns_lit@ || '.wake.' || (p_group % 64)::text)::bigint $$;

-- The NOTIFY trigger: one `pg_notify` per stream with new ready work, sent only when the stream
-- has a registered waiter (`wake_waiters`), or when this publish cannot rule one out.
--
-- Why a skipped NOTIFY loses no wake-up. A publisher takes the wake lock of each group it made
-- ready work for, shared and without waiting, and, in a later statement (a new snapshot under
-- READ COMMITTED), looks for a registration of the stream; it skips the NOTIFY only when every
-- lock was free and no registration is visible, and it holds the locks until its transaction
-- ends. A registrar (`_wake_register`) inserts its row, then takes the wake locks of the stream's
-- groups exclusively, waiting, in the same transaction, and its consumers claim again once it has
-- committed. For every publisher, one of these holds:
--   * it took the lock before the registrar asked for it: the registrar waits for its commit,
--     so the claim that follows the registration sees its messages;
--   * it tried while the registrar waited for or held the lock: the try fails (a waiting
--     exclusive request makes a new shared one conflict), and it notifies;
--   * it took the lock after the registrar released it at commit: its snapshot sees the row, and
--     it notifies as long as the row stays.
-- Under REPEATABLE READ or SERIALIZABLE the snapshot is the transaction's, older than the lock,
-- so such a publish notifies as before, and so does one that set `pgtide.notify = always`.
-- Publishers never wait for the lock.
--
-- Cost: two statements. The first reads the transition table; PostgreSQL plans such a statement
-- on every call, so it stays small and calls no SQL function (inlining one parses its body on
-- every plan). The second runs on a generic plan (the function's `plan_cache_mode`): with its
-- array parameters the plan cache otherwise chose a custom plan, planned afresh on every publish.
-- Measured with pgbench (`SELECT <ns>.publish(…)`, fsync on, fresh cluster): 0.85x the
-- trigger-less statement at one publisher, about 0.8x at 16; the trigger before registrations
-- ran 0.88x at one publisher and 0.36x at 16 (every NOTIFY serialised on the notify lock).
CREATE OR REPLACE FUNCTION @ns@._notify_inserted() RETURNS trigger
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_ready integer[];
    v_free  integer[];
    v_due   timestamptz;
BEGIN
    -- Groups with new ready work, those whose wake lock this transaction now holds (none when it
    -- must notify regardless), and the earliest future delivery.
    SELECT array_agg(n.group_id) FILTER (WHERE n.ready),
           -- Never NULL: `<> ALL (NULL)` would skip every NOTIFY.
           coalesce(array_agg(n.group_id) FILTER (WHERE CASE WHEN n.ready AND c.ok
               THEN pg_try_advisory_xact_lock_shared(
                        hashtext(@ns_lit@ || '.wake.' || (n.group_id % 64)::text)::bigint)
               ELSE false END), '{}'),
           min(n.due)
    INTO v_ready, v_free, v_due
    FROM (SELECT r.group_id, bool_or(r.visible_at <= now()) AS ready,
                 min(r.visible_at) FILTER (WHERE r.visible_at > now()) AS due
          FROM new_rows r GROUP BY r.group_id) n,
         (SELECT current_setting('transaction_isolation') = 'read committed'
                 AND coalesce(current_setting('pgtide.notify', true), '') <> 'always' AS ok) c;
    -- A statement after the locks: under READ COMMITTED its snapshot is newer than them.
    PERFORM (SELECT count(pg_notify('pgtide.' || @ns_lit@, s.name)) FROM @ns@.streams s
             WHERE s.id IN (SELECT g.stream_id FROM @ns@.groups g
                            WHERE g.id = ANY (v_ready)
                              AND (g.id <> ALL (v_free)
                                   OR EXISTS (SELECT 1 FROM @ns@.wake_waiters w
                                              WHERE w.stream_id = g.stream_id)))),
            CASE WHEN v_due IS NOT NULL
                 THEN pg_notify('pgtide.' || @ns_lit@,
                                '@' || floor(extract(epoch FROM v_due) * 1000)::bigint) END;
    RETURN NULL;
END $$;

-- Registers process `p_holder` (whose LISTEN session is backend `p_pid`) as waiting for wake-ups
-- of stream `p_stream`, then waits until every publisher that may have missed the registration
-- has committed (the protocol above `_notify_inserted`), on the wake locks of the stream's groups. Returns true when it is in force: a
-- claim that starts after this commits sees every message whose NOTIFY was skipped. Returns false
-- when a publishing transaction still held the stream's wake lock after `p_wait` (a long caller
-- transaction): the row is in place and every later publisher notifies, so the caller calls again
-- later to wait out the rest. NULL: no such stream. The lock wait is bounded by `p_wait` (at most
-- a second); publishers never queue behind it, their tries fail at once and they notify.
CREATE OR REPLACE FUNCTION @ns@._wake_register(p_stream text, p_holder text, p_pid integer, p_wait interval)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_id integer;
BEGIN
    PERFORM @ns@._check_name('stream', p_stream);
    PERFORM @ns@._check(p_holder IS NOT NULL AND length(p_holder) BETWEEN 1 AND 200,
        'holder must be 1 to 200 characters', 'the process id of the registrar');
    PERFORM @ns@._check(p_pid IS NOT NULL AND p_pid > 0, 'pid must be a backend process id',
        'pg_backend_pid() of the LISTEN session');
    PERFORM @ns@._check(p_wait IS NOT NULL AND p_wait >= interval '0' AND p_wait <= interval '1 second',
        'wait must be between 0 and 1 second', 'how long to wait for publishing transactions');
    SELECT id INTO v_id FROM @ns@.streams WHERE name = p_stream;
    IF v_id IS NULL THEN
        RETURN NULL;
    END IF;
    INSERT INTO @ns@.wake_waiters AS w (stream_id, holder, listener_pid)
    VALUES (v_id, p_holder, p_pid)
    ON CONFLICT (stream_id, holder) DO UPDATE SET listener_pid = excluded.listener_pid, since = now()
    WHERE w.listener_pid <> excluded.listener_pid;
    -- Milliseconds, rounded up: a zero lock_timeout would wait for ever.
    PERFORM set_config('lock_timeout',
        greatest(1, ceil(extract(epoch FROM p_wait) * 1000))::bigint::text || 'ms', true);
    BEGIN
        -- In key order, so that two registrars of streams sharing buckets cannot deadlock.
        PERFORM pg_advisory_xact_lock(x.k)
        FROM (SELECT DISTINCT @ns@._wake_lock(g.id) AS k FROM @ns@.groups g
              WHERE g.stream_id = v_id ORDER BY 1) x;
    EXCEPTION WHEN lock_not_available THEN
        RETURN false;
    END;
    RETURN true;
END $$;

-- Takes back the registrations of `p_holder` for the streams `p_streams` (NULL: all of them).
-- Returns how many rows went.
CREATE OR REPLACE FUNCTION @ns@._wake_release(p_streams text[], p_holder text) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_n integer;
BEGIN
    PERFORM @ns@._check(p_holder IS NOT NULL AND length(p_holder) BETWEEN 1 AND 200,
        'holder must be 1 to 200 characters', 'the process id of the registrar');
    DELETE FROM @ns@.wake_waiters w
    WHERE w.holder = p_holder
      AND (p_streams IS NULL
           OR w.stream_id IN (SELECT s.id FROM @ns@.streams s WHERE s.name = ANY (p_streams)));
    GET DIAGNOSTICS v_n = ROW_COUNT;
    RETURN v_n;
END $$;

-- Registrations whose LISTEN session is gone (the process was killed, or its listener
-- reconnected and registers under its new session): for `maintain()`.
CREATE OR REPLACE FUNCTION @ns@._trim_wake_waiters() RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_n integer;
BEGIN
    DELETE FROM @ns@.wake_waiters w
    WHERE NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = w.listener_pid);
    GET DIAGNOSTICS v_n = ROW_COUNT;
    RETURN v_n;
END $$;

-- Takes the lease if it is free or expired, or renews it for the current holder and term.
-- Returns the term held, or NULL when another holder has it.
CREATE OR REPLACE FUNCTION @ns@._scout_acquire(p_holder text, p_term bigint, p_ttl interval) RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    -- The one duration rule, whoever holds the lease: a runtime role cannot take it for a century.
    SELECT @ns@._check_duration('scout ttl', p_ttl, false);
    UPDATE @ns@.scout_lease
    SET holder = p_holder,
        term = CASE WHEN holder = p_holder AND term = p_term THEN term ELSE term + 1 END,
        acquired_at = CASE WHEN holder = p_holder AND term = p_term THEN acquired_at ELSE now() END,
        renewed_at = now(),
        expires_at = now() + p_ttl
    WHERE (holder = p_holder AND term = p_term) OR holder IS NULL OR expires_at <= now()
    RETURNING term
$$;

CREATE OR REPLACE FUNCTION @ns@._scout_resign(p_holder text, p_term bigint) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE @ns@.scout_lease SET holder = NULL, expires_at = now()
    WHERE holder = p_holder AND term = p_term;
    IF FOUND THEN
        PERFORM pg_notify('pgtide.' || @ns_lit@, '!scout');
    END IF;
    RETURN FOUND;
END $$;

-- For the scout: streams with deliveries that became visible in (p_since, now()], and the
-- earliest future visibility (next delayed message or lease expiry). Walks only the index
-- ranges between those bounds, per group.
CREATE OR REPLACE FUNCTION @ns@._scout_due(p_since timestamptz)
RETURNS TABLE (due_streams text[], next_due timestamptz, checked_at timestamptz)
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp STABLE
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_sort = off
SET enable_hashjoin = off SET enable_mergejoin = off SET jit = off
AS $$
    SELECT
        (SELECT array_agg(DISTINCT s.name) FROM @ns@.groups g JOIN @ns@.streams s ON s.id = g.stream_id
         WHERE EXISTS (SELECT 1 FROM @ns@.delivery_state d
                       WHERE d.group_id = g.id AND d.visible_at > p_since AND d.visible_at <= now())),
        (SELECT min(x.v) FROM @ns@.groups g
         CROSS JOIN LATERAL (SELECT d.visible_at AS v FROM @ns@.delivery_state d
                             WHERE d.group_id = g.id AND d.visible_at > now()
                             ORDER BY d.visible_at LIMIT 1) x),
        now()
$$;

-- The scout's maintenance pass, fenced: runs `maintain()` only while `p_holder` still holds the
-- lease under `p_term` (no row otherwise). Runtime roles read no table; this reads the lease as
-- the owner. Kept for the scouts of older releases during a rolling upgrade (they call this one);
-- this release's scout runs the steps below, one stream per transaction.
CREATE OR REPLACE FUNCTION @ns@._scout_maintain(p_holder text, p_term bigint)
RETURNS TABLE (partitions_created integer, partitions_dropped integer, dedupe_removed integer)
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT m.partitions_created, m.partitions_dropped, m.dedupe_removed FROM @ns@.maintain() m
    WHERE EXISTS (SELECT 1 FROM @ns@.scout_lease l
                  WHERE l.holder = p_holder AND l.term = p_term AND l.expires_at > now())
$$;

-- One step of the scout's maintenance pass (`_maintain_step`), fenced: runs only while
-- `p_holder` still holds the lease under `p_term` (no row otherwise). Runtime roles read no
-- table; this reads the lease as the owner.
CREATE OR REPLACE FUNCTION @ns@._scout_maintain(p_holder text, p_term bigint, p_after integer, p_lock_wait interval)
RETURNS TABLE (stream_id integer, partitions_created integer, partitions_dropped integer,
               partitions_skipped integer, dedupe_removed integer)
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT m.stream_id, m.partitions_created, m.partitions_dropped, m.partitions_skipped, m.dedupe_removed
    FROM @ns@._maintain_step(now(), p_after, p_lock_wait) m
    WHERE EXISTS (SELECT 1 FROM @ns@.scout_lease l
                  WHERE l.holder = p_holder AND l.term = p_term AND l.expires_at > now())
$$;
