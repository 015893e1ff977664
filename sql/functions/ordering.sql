-- pgtide ordering keys: the key rule, and the lines of an ordered group (migration 0010).
--
-- In an ordered group the deliveries of one key form a line. Its head is an ordinary delivery
-- row (claimed, leased, retried, released like any other); the others wait with `visible_at`
-- moved `_parked_offset()` past their own due time, beyond year 5000, where no claim looks.
-- One head per key: at most one delivery of a key is ready, delayed, retrying or in flight at a
-- time, across every consumer and process. When a head leaves the group (ack, term, dead letter)
-- `_advance_keys` makes the next of the line the head. Publishers (`_enqueue_keyed`) and
-- advancers take the key's transaction-scoped advisory lock, in one global order (group id,
-- then hash of the key), and read the line only after holding it: an advance never misses a
-- delivery published concurrently, and two publishers of a new key never both make a head.
--
-- Ordered groups (migration 0015): `key_heads (group_id, key)` has a row while the key has a
-- delivery in the group (its head, and maybe a line behind it), inserted by the publish that
-- makes the head and deleted by the advance that finds the line empty, both under the key's
-- lock; bulk paths reconcile it (`_repair_keys`). `delivery_state_key (group_id, key, key_seq)`
-- holds the waiting deliveries of every line in line order (the first is the next head), but
-- not the heads of ordered groups: claiming and advancing a head writes no entry there.
--
-- Groups with a per-key limit (migration 0013) keep every keyed delivery in that index
-- (`key_limited`), and the heads come first: a delivery is made a head only when its key has no
-- delivery at all in the group, or room and no waiting delivery, or as the first of the line;
-- heads stay heads until they leave. So the first N entries count its heads under a limit N.
--
-- `migrate()` re-applies this file (after the versioned migrations, in one transaction with the
-- other function files, under the namespace's migration lock) whenever its text changes; the
-- checksum of what was applied is kept in `@ns@._pgtide_sql`. Every statement here must be
-- re-runnable: CREATE OR REPLACE. It cannot change a function's result type or argument names, or
-- drop or retype a view's columns: such a change needs a `DROP ... IF EXISTS` just before it in
-- this file (and dependants recreated in the same file). Tables, indexes and data changes belong
-- in `migrations/`, never here.

-- How far a waiting delivery's `visible_at` is moved: 80 000 000 hours (about 9 100 years), so
-- any due time pgtide accepts (at most 100 years ahead) lands past the indexes' year-5000
-- bound. Whole hours, so adding and taking it back is exact in every time zone.
CREATE OR REPLACE FUNCTION @ns@._parked_offset() RETURNS interval
LANGUAGE sql IMMUTABLE AS $$ SELECT interval '80000000 hours' $$;

-- The bound of the partial indexes of migration 0010: a `visible_at` at or past it waits in a line.
CREATE OR REPLACE FUNCTION @ns@._parked_bound() RETURNS timestamptz
LANGUAGE sql IMMUTABLE AS $$ SELECT '5000-01-01 00:00:00+00'::timestamptz $$;

-- The key rule (the Rust API's `check_key`): NULL (no key) or 1-256 bytes of text without
-- control characters. Raises PT001 otherwise.
CREATE OR REPLACE FUNCTION @ns@._check_key(p_key text) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_key IS NOT NULL AND (octet_length(p_key) NOT BETWEEN 1 AND 256 OR p_key ~ '[[:cntrl:]]') THEN
        RAISE EXCEPTION 'pgtide: key % is invalid',
            CASE WHEN length(p_key) > 80 THEN quote_literal(left(p_key, 80)) || '...'
                 ELSE quote_literal(p_key) END
            USING ERRCODE = 'PT001',
                  HINT = 'use 1-256 bytes of text without control characters, e.g. ''customer-42''';
    END IF;
    RETURN p_key;
END $$;

-- The key rule for a whole batch (`_publish_keyed`): raises as `_check_key` does for the first
-- invalid key. One regular expression over the batch's keys run together (a control character
-- in one of them is one in the whole) instead of a PL/pgSQL call and a regular expression per
-- key (benches/icount: about 4 % of a keyed `publish_batch` of 100).
CREATE OR REPLACE FUNCTION @ns@._check_keys(p_keys text[]) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF array_to_string(p_keys, '') ~ '[[:cntrl:]]'
       OR EXISTS (SELECT 1 FROM unnest(p_keys) k WHERE octet_length(k) NOT BETWEEN 1 AND 256) THEN
        PERFORM @ns@._check_key(k) FROM unnest(p_keys) WITH ORDINALITY AS x (k, i) ORDER BY x.i;
    END IF;
END $$;

-- The group's lines lock (bigint space, apart from the keys' two-integer locks): every taker of
-- the group's key locks holds it shared first (`_lock_keys`); holding it exclusively is holding
-- every key of the group at once, with one lock-table entry.
CREATE OR REPLACE FUNCTION @ns@._lines_lock(p_group integer) RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$ SELECT hashtext(@ns_lit@ || '.lines.' || p_group::text)::bigint $$;

-- How many key locks one transaction holds at most (`_lock_keys`). Advisory locks live in the
-- server's shared lock table, max_locks_per_transaction x (max_connections + background
-- processes) entries for every session together (about 7 800 with the defaults): a reset, a
-- retention pass, a replay or one transaction publishing to thousands of keys of a group would
-- fill it, and then every session's next lock fails with "out of shared memory".
CREATE OR REPLACE FUNCTION @ns@._key_lock_budget() RETURNS integer
LANGUAGE sql IMMUTABLE AS $$ SELECT 256 $$;

-- Takes the advisory locks of the keys `p_keys` of group `p_group` for the rest of the
-- transaction, in the one global order: the group's lines lock shared, then the keys by hash.
-- A call that would take the transaction past `_key_lock_budget()` key locks (counted in the
-- transaction-local setting `pgtide.key_locks`, rolled back with a savepoint as its locks are)
-- takes the lines lock exclusively instead, and so does every later call of the transaction:
-- the group's other publishers and settles of keyed deliveries then wait for its commit.
-- The line is read afresh by every statement after this one only under READ COMMITTED; a
-- caller's REPEATABLE READ or SERIALIZABLE transaction would read an old line, so it is refused.
CREATE OR REPLACE FUNCTION @ns@._lock_keys(p_group integer, p_keys text[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_held  integer;
    v_n     integer;
    v_space integer := hashtext(@ns_lit@ || '.keys.' || p_group);
    v_void  text;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'pgtide: ordered groups need READ COMMITTED transactions, not %',
            current_setting('transaction_isolation')
            USING ERRCODE = 'PT001',
                  HINT = 'publish keyed messages and settle deliveries of ordered groups in READ COMMITTED transactions';
    END IF;
    IF p_keys IS NULL OR cardinality(p_keys) = 0 THEN
        RETURN;
    END IF;
    v_held := coalesce(nullif(current_setting('pgtide.key_locks', true), '')::integer, 0);
    IF v_held + cardinality(p_keys) > @ns@._key_lock_budget() THEN
        PERFORM pg_advisory_xact_lock(@ns@._lines_lock(p_group));
        IF v_held < @ns@._key_lock_budget() THEN
            PERFORM set_config('pgtide.key_locks', @ns@._key_lock_budget()::text, true);
        END IF;
        RETURN;
    END IF;
    -- Calls as assignments, not PERFORM: a simple expression skips the executor start-up that
    -- a PERFORM costs (about 8 000 instructions a message in a claim-and-ack of ten).
    v_void := pg_advisory_xact_lock_shared(@ns@._lines_lock(p_group))::text;
    -- One statement for the whole batch: the locks are taken as the sorted rows come out. The
    -- first half names the namespace and the group (advisory locks are per database: another
    -- namespace's group with the same id must neither wait for these nor deadlock with them).
    PERFORM pg_advisory_xact_lock(v_space, x.h)
    FROM (SELECT DISTINCT hashtext(k) AS h FROM unnest(p_keys) k WHERE k IS NOT NULL ORDER BY 1) x;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    IF v_n > 0 THEN
        v_void := set_config('pgtide.key_locks', (v_held + v_n)::text, true);
    END IF;
END $$;

-- Per-key concurrency limit (`max_in_flight_per_key = N`, migration 0013): the same lines, but
-- a key may have up to N heads (rows marked `key_limited`, counted among the key's first
-- entries of `delivery_state_key` under the key's lock). The advisory lock (bigint space, apart from
-- the keys' two-integer locks) that `set_max_in_flight_per_key` takes exclusively and
-- publishers to the group take shared, so a publish never parks a delivery in a line that a
-- concurrent removal of the limit has already released.
CREATE OR REPLACE FUNCTION @ns@._key_limit_lock(p_group integer) RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$ SELECT hashtext(@ns_lit@ || '.key_limit.' || p_group::text)::bigint $$;

-- How many more heads key `p_key` of group `p_group` may have under the per-key limit `p_cap`:
-- counts the heads among its first `p_cap` deliveries in line order (the heads come first:
-- O(N), never its line). Call it holding the key's lock.
CREATE OR REPLACE FUNCTION @ns@._key_room(p_group integer, p_key text, p_cap integer) RETURNS integer
LANGUAGE sql STABLE AS $$
    SELECT greatest(p_cap - (SELECT count(*) FILTER (WHERE x.visible_at < @ns@._parked_bound()) FROM (
        SELECT h.visible_at FROM @ns@.delivery_state h
        WHERE h.group_id = p_group AND h.key = p_key AND h.key_limited
        ORDER BY h.key_seq
        LIMIT p_cap) x)::integer, 0)
$$;

-- Queues deliveries of keyed messages in the ordered group `p_group`, in array order: a message
-- whose key has no delivery in the group yet becomes the key's head (visible at `p_visible`);
-- the others join the end of their key's line. Elements with a NULL key are skipped (the
-- caller queues them as plain deliveries). In a group with a per-key limit a message already
-- pending in the group is skipped; in an ordered group the ids must not be pending there (a
-- publish's are new; `_replay_dead` passes those that are as keyless): the arbiter check of an
-- ON CONFLICT costs a keyed publish as much as the probe `key_heads` saves.
-- Counters are the caller's.
CREATE OR REPLACE FUNCTION @ns@._enqueue_keyed(p_group integer, p_ids uuid[], p_keys text[],
                                               p_visible timestamptz[])
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
SET jit = off
AS $$
DECLARE
    n       bigint;
    v_cap   integer;
    v_fresh text[];
    v_heads bigint[];
BEGIN
    IF NOT coalesce((SELECT g.ordered FROM @ns@.groups g WHERE g.id = p_group), false) THEN
        -- A per-key limit (up to N heads per key): `set_max_in_flight_per_key` changes it under
        -- the group's exclusive lock, so read it only once the shared one is held.
        PERFORM pg_advisory_xact_lock_shared(@ns@._key_limit_lock(p_group));
        PERFORM @ns@._lock_keys(p_group, p_keys);
        SELECT g.max_in_flight_per_key INTO v_cap FROM @ns@.groups g WHERE g.id = p_group;
        IF v_cap IS NULL THEN
            -- The limit was removed since the caller looked: plain deliveries.
            INSERT INTO @ns@.delivery_state (group_id, message_id, visible_at)
            SELECT p_group, x.id, x.visible
            FROM unnest(p_ids, p_keys, p_visible) AS x (id, key, visible)
            WHERE x.key IS NOT NULL
            ON CONFLICT (group_id, message_id) DO NOTHING;
        ELSE
            -- A key whose line is empty (its last delivery is not waiting) has `v_cap` minus
            -- its heads free; the batch's first deliveries of the key take them, the rest join
            -- the line (in array order).
            INSERT INTO @ns@.delivery_state (group_id, message_id, visible_at, key, key_seq, key_limited)
            SELECT p_group, u.id,
                   CASE WHEN u.r <= f.free THEN u.visible ELSE u.visible + @ns@._parked_offset() END,
                   u.key, nextval('@ns@.key_seq'), true
            FROM (SELECT x.id, x.key, x.visible, x.i,
                         row_number() OVER (PARTITION BY x.key ORDER BY x.i) AS r
                  FROM unnest(p_ids, p_keys, p_visible) WITH ORDINALITY AS x (id, key, visible, i)
                  WHERE x.key IS NOT NULL) u
            CROSS JOIN LATERAL (
                SELECT CASE WHEN coalesce((SELECT l.visible_at >= @ns@._parked_bound()
                                           FROM @ns@.delivery_state l
                                           WHERE l.group_id = p_group AND l.key = u.key AND l.key_limited
                                           ORDER BY l.key_seq DESC LIMIT 1), false)
                            THEN 0 ELSE @ns@._key_room(p_group, u.key, v_cap) END AS free
            ) f
            ORDER BY u.i
            ON CONFLICT (group_id, message_id) DO NOTHING;
        END IF;
        GET DIAGNOSTICS n = ROW_COUNT;
        RETURN n;
    END IF;
    PERFORM @ns@._lock_keys(p_group, p_keys);
    -- A key with no delivery in the group has no `key_heads` row. Under the keys' locks nobody
    -- else inserts or deletes the rows of these keys, so a plain probe per key of the batch
    -- (read after the locks were taken) says which keys are fresh; only those are inserted
    -- (ON CONFLICT for a key twice in the batch). An `INSERT ... ON CONFLICT DO NOTHING` of
    -- every key cost twice the probe: its arbiter check runs for each row before the conflict
    -- (benches/icount, lines of 300 a key).
    -- (LATERAL ... LIMIT 1: one index probe per key, never a join that compares every key of
    -- the batch with every row of the group.)
    SELECT array_agg(x.k) INTO v_fresh FROM unnest(p_keys) AS x (k)
    LEFT JOIN LATERAL (SELECT true AS known FROM @ns@.key_heads h
                       WHERE h.group_id = p_group AND h.key = x.k LIMIT 1) h ON true
    WHERE x.k IS NOT NULL AND h.known IS NULL;
    IF v_fresh IS NOT NULL THEN
        INSERT INTO @ns@.key_heads (group_id, key)
        SELECT p_group, k FROM unnest(v_fresh) k
        ON CONFLICT (group_id, key) DO NOTHING;
        -- A fresh key's first message of the batch is its head; the others join the line.
        SELECT array_agg(f.i) INTO v_heads FROM (
            SELECT min(x.i) AS i FROM unnest(p_keys) WITH ORDINALITY AS x (k, i)
            WHERE x.k = ANY (v_fresh) GROUP BY x.k) f;
    END IF;
    -- `key_seq` is taken in array order (volatile output expressions are computed after the
    -- sort), under the keys' locks: a key's line is the order its publishes committed.
    INSERT INTO @ns@.delivery_state (group_id, message_id, visible_at, key, key_seq)
    SELECT p_group, x.id,
           CASE WHEN x.i = ANY (v_heads) THEN x.visible ELSE x.visible + @ns@._parked_offset() END,
           x.key, nextval('@ns@.key_seq')
    FROM unnest(p_ids, p_keys, p_visible) WITH ORDINALITY AS x (id, key, visible, i)
    WHERE x.key IS NOT NULL
    ORDER BY x.i;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END $$;

-- Lets the keys `p_keys` of group `p_group` move on after their heads left the group: a key
-- without a head gets the first of its line as head, due at its own due time (or now); with a
-- per-key limit N, a key gets as many of its line as it has fewer than N heads. Returns
-- how many heads it made. SQL callers' consumers are woken at commit; the engine's pool (whose
-- connections set `pgtide.notify = off`) wakes them itself.
--
-- In an ordered group the keys' heads have left (settles and dead letters call this after
-- deleting them; one head per key): a key whose line is empty has no delivery left, and its
-- `key_heads` row goes. Bulk paths call `_repair_keys` instead.
--
-- `p_after` (optional, one element per key): the `key_seq` of the head that left. In an ordered
-- group nothing of the key is left below it (it was the first), so the lookup of the next one
-- starts past it, above the index entries that the key's earlier promoted deliveries left behind.
DROP FUNCTION IF EXISTS @ns@._advance_keys(integer, text[]);
CREATE OR REPLACE FUNCTION @ns@._advance_keys(p_group integer, p_keys text[], p_after bigint[] DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
SET enable_sort = off SET jit = off
AS $$
DECLARE
    n         bigint;
    v_ordered boolean;
    v_cap     integer;
BEGIN
    IF p_keys IS NULL OR cardinality(p_keys) = 0 THEN
        RETURN 0;
    END IF;
    PERFORM @ns@._lock_keys(p_group, p_keys);
    -- Read under the keys' locks: `set_max_in_flight_per_key` changes the lines under them too.
    SELECT g.ordered, g.max_in_flight_per_key INTO v_ordered, v_cap FROM @ns@.groups g WHERE g.id = p_group;
    IF NOT coalesce(v_ordered, true) THEN
        IF v_cap IS NULL THEN
            RETURN 0;
        END IF;
        -- A per-key limit: each key gets as many of the first of its line as it has room for.
        UPDATE @ns@.delivery_state d
        SET visible_at = greatest(now(), d.visible_at - @ns@._parked_offset())
        FROM (SELECT DISTINCT k FROM unnest(p_keys) k WHERE k IS NOT NULL) k
        CROSS JOIN LATERAL (
            SELECT l.message_id FROM @ns@.delivery_state l
            WHERE l.group_id = p_group AND l.key = k.k AND l.visible_at >= @ns@._parked_bound()
            ORDER BY l.key_seq LIMIT @ns@._key_room(p_group, k.k, v_cap)
        ) nxt
        WHERE d.group_id = p_group AND d.message_id = nxt.message_id;
        GET DIAGNOSTICS n = ROW_COUNT;
    ELSE
        -- Each key's first waiting delivery becomes its head; a key without one has no delivery
        -- left in the group, and loses its `key_heads` row.
        -- The update finds each row by the `ctid` the lookup read (a TID scan, not a second
        -- descent of the primary key): under the keys' locks nothing else updates a waiting
        -- delivery, and one deleted meanwhile (a trim) is skipped either way.
        WITH nxt AS MATERIALIZED (
            SELECT k.k, w.message_id, w.tid
            FROM (SELECT x.k, min(x.after) AS after FROM unnest(p_keys, p_after) AS x (k, after)
                  WHERE x.k IS NOT NULL GROUP BY x.k) k
            LEFT JOIN LATERAL (
                SELECT l.message_id, l.ctid AS tid FROM @ns@.delivery_state l
                WHERE l.group_id = p_group AND l.key = k.k AND l.visible_at >= @ns@._parked_bound()
                  AND l.key_seq > coalesce(k.after, '-9223372036854775808'::bigint)
                ORDER BY l.key_seq LIMIT 1
            ) w ON true
        ), moved AS (
            UPDATE @ns@.delivery_state d
            SET visible_at = greatest(now(), d.visible_at - @ns@._parked_offset())
            FROM nxt
            WHERE d.ctid = nxt.tid AND d.group_id = p_group AND d.message_id = nxt.message_id
            RETURNING 1
        ), emptied AS (
            DELETE FROM @ns@.key_heads h USING nxt
            WHERE nxt.message_id IS NULL AND h.group_id = p_group AND h.key = nxt.k
        )
        SELECT count(*) INTO n FROM moved;
    END IF;
    IF n > 0 AND coalesce(current_setting('pgtide.notify', true), '') <> 'off' THEN
        PERFORM pg_notify('pgtide.' || @ns_lit@, s.name)
        FROM @ns@.groups g JOIN @ns@.streams s ON s.id = g.stream_id WHERE g.id = p_group;
    END IF;
    RETURN n;
END $$;

-- After a bulk change to an ordered group (a reset, a trim, retention, a group created from the
-- oldest message): every key whose line has no head gets one, and `key_heads` is made to match
-- the group's deliveries (a row for each key with one, none for the others), under the locks of
-- every key concerned. Walks the group's keyed deliveries: an administrative path, never a
-- claim's. Groups with a per-key limit: each key gets the heads it has room for.
--
-- `p_keys`: only these keys (a trim or retention pass passes the keys of the deliveries it
-- removed, NULL: every key of the group). Beyond `_key_lock_budget()` keys, `_lock_keys` takes
-- the group's lines lock exclusively instead of a lock per key (which would fill the server's
-- lock table): the group's keyed publishes and settles then wait for this transaction's commit.
DROP FUNCTION IF EXISTS @ns@._repair_keys(integer);
CREATE OR REPLACE FUNCTION @ns@._repair_keys(p_group integer, p_keys text[] DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_keys text[];
    n      bigint;
BEGIN
    IF p_keys IS NOT NULL AND cardinality(p_keys) = 0 THEN
        RETURN 0;
    END IF;
    IF NOT @ns@._is_ordered(p_group) THEN
        SELECT array_agg(DISTINCT l.key) INTO v_keys FROM @ns@.delivery_state l
        WHERE l.group_id = p_group AND l.key IS NOT NULL AND l.visible_at >= @ns@._parked_bound()
          AND (p_keys IS NULL OR l.key = ANY (p_keys));
        RETURN @ns@._advance_keys(p_group, v_keys);
    END IF;
    IF p_keys IS NOT NULL THEN
        SELECT array_agg(DISTINCT k) INTO v_keys FROM unnest(p_keys) k WHERE k IS NOT NULL;
    ELSE
        SELECT array_agg(DISTINCT x.key) INTO v_keys FROM (
            SELECT h.key::text AS key FROM @ns@.key_heads h WHERE h.group_id = p_group
            UNION ALL
            SELECT d.key FROM @ns@.delivery_state d WHERE d.group_id = p_group AND d.key IS NOT NULL) x;
    END IF;
    IF v_keys IS NULL THEN
        RETURN 0;
    END IF;
    PERFORM @ns@._lock_keys(p_group, v_keys);
    -- Read again under the locks: publishes and settles of these keys wait for them.
    WITH present AS MATERIALIZED (
        SELECT d.key, bool_or(d.visible_at < @ns@._parked_bound()) AS headed,
               min(d.key_seq) FILTER (WHERE d.visible_at >= @ns@._parked_bound()) AS first_seq
        FROM @ns@.delivery_state d
        WHERE d.group_id = p_group AND d.key = ANY (v_keys)
        GROUP BY d.key
    ), moved AS (
        UPDATE @ns@.delivery_state d
        SET visible_at = greatest(now(), d.visible_at - @ns@._parked_offset())
        FROM present p
        WHERE NOT p.headed AND d.group_id = p_group AND d.key = p.key AND d.key_seq = p.first_seq
          AND d.visible_at >= @ns@._parked_bound()
        RETURNING 1
    ), gone AS (
        DELETE FROM @ns@.key_heads h
        WHERE h.group_id = p_group AND h.key = ANY (v_keys)
          AND NOT EXISTS (SELECT 1 FROM present p WHERE p.key = h.key)
    ), added AS (
        INSERT INTO @ns@.key_heads (group_id, key)
        SELECT p_group, p.key FROM present p
        ON CONFLICT (group_id, key) DO NOTHING
    )
    SELECT count(*) INTO n FROM moved;
    IF n > 0 AND coalesce(current_setting('pgtide.notify', true), '') <> 'off' THEN
        PERFORM pg_notify('pgtide.' || @ns_lit@, s.name)
        FROM @ns@.groups g JOIN @ns@.streams s ON s.id = g.stream_id WHERE g.id = p_group;
    END IF;
    RETURN n;
END $$;

-- Whether group `p_group` is ordered (false for a missing group).
CREATE OR REPLACE FUNCTION @ns@._is_ordered(p_group integer) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce((SELECT g.ordered FROM @ns@.groups g WHERE g.id = p_group), false)
$$;

-- Ordered groups and groups with a per-key limit claim through `_claim` itself now, on its
-- cached generic plan (this function, their claim up to migration 0013, planned its statements
-- on every call).
DROP FUNCTION IF EXISTS @ns@._claim_ordered(integer, integer, text, integer, interval, integer);

---------------------------------------------------------------------------------------------------
-- concurrency limit (issue 12.2)

-- How many more deliveries group `p_group` may lease now under its limit `p_cap`. Locks the
-- group's row first (to the end of the claim's transaction), so claims of a limited group take
-- turns across every process and each sees the leases the previous one committed. Counts leased
-- rows in the non-ready part of the claim index, stopping at `p_cap`; delayed rows in that range
-- are walked too, so the count costs O(leased + delayed), never the ready backlog.
CREATE OR REPLACE FUNCTION @ns@._in_flight_room(p_group integer, p_cap integer) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
SET jit = off
AS $$
DECLARE
    busy integer;
BEGIN
    PERFORM 1 FROM @ns@.groups g WHERE g.id = p_group FOR NO KEY UPDATE;
    SELECT count(*) INTO busy FROM (
        SELECT 1 FROM @ns@.delivery_state d
        WHERE d.group_id = p_group AND d.visible_at > now() AND d.visible_at < @ns@._parked_bound()
          AND d.consumer IS NOT NULL
        LIMIT p_cap
    ) x;
    RETURN p_cap - busy;
END $$;

---------------------------------------------------------------------------------------------------
-- pause (issue 12.4)

-- Hands deliveries back to be claimed again at `p_until` (now, if it has passed), the attempt
-- not counted: a handler's `PauseKey`. In an ordered group the delivery is its key's head and
-- stays it, so the whole key waits while the others go on. Fenced like every settle.
CREATE OR REPLACE FUNCTION @ns@._pause(p_group integer, p_ids uuid[], p_attempts integer[],
                                       p_tokens bigint[], p_until timestamptz)
RETURNS SETOF uuid
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
SET jit = off
AS $$
    UPDATE @ns@.delivery_state d
    SET visible_at = greatest(p_until, now()), consumer = NULL, lease_token = NULL,
        attempts = greatest(d.attempts - 1, 0)
    FROM (SELECT p_group AS gid, v.* FROM unnest(p_ids, p_attempts, p_tokens) AS v (id, attempt, token) OFFSET 0) AS u
    WHERE d.group_id = u.gid AND d.message_id = u.id AND d.consumer IS NOT NULL
      AND (u.attempt IS NULL OR d.attempts = u.attempt)
      AND (u.token IS NULL OR d.lease_token = u.token)
    RETURNING d.message_id
$$;

---------------------------------------------------------------------------------------------------
-- per-key concurrency limit (issue 12): `max_in_flight_per_key`

-- The rule (the Rust API's `GroupConfig::validate`): NULL (no limit) or positive; an ordered
-- group already has one per key, so only 1 (or NULL) goes with it. PT001 otherwise.
CREATE OR REPLACE FUNCTION @ns@._check_key_limit(p_ordered boolean, p_limit integer) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    PERFORM @ns@._check(p_limit IS NULL OR p_limit > 0,
        format('max_in_flight_per_key must be positive, not %s', p_limit),
        'pass NULL for no per-key limit');
    PERFORM @ns@._check(p_limit IS NULL OR p_limit = 1 OR NOT coalesce(p_ordered, false),
        format('an ordered group delivers one message of a key at a time: max_in_flight_per_key must be 1 or NULL, not %s',
               p_limit),
        'use a group that is not ordered for more than one delivery per key at once');
END $$;

-- Sets (or, with NULL, removes) the group's per-key concurrency limit: at most
-- `max_in_flight_per_key` deliveries of one key ready, delayed or leased at once, across every
-- consumer and process; the key's others wait in its line. Setting it queues the group's
-- pending keyed deliveries in their keys' lines (leased ones first, then in id order), raising
-- it lets lines move up at once, lowering it lets the heads beyond it finish, removing it
-- releases every line (the deliveries keep their keys, unused until a limit is set again). An administrative call: it walks the group's pending deliveries (not a
-- hot path) under an exclusive lock that publishers of keyed messages to the group share.
-- Returns false when the group does not exist.
CREATE OR REPLACE FUNCTION @ns@.set_max_in_flight_per_key(stream text, "group" text, max_in_flight_per_key integer)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    gid       integer;
    sid       integer;
    v_ordered boolean;
    v_fair    boolean;
    v_old     integer;
    v_cap     integer := max_in_flight_per_key;
    v_keys    text[];
BEGIN
    PERFORM @ns@._check_name('stream', stream);
    PERFORM @ns@._check_name('group', "group");
    PERFORM @ns@._check_key_limit(false, v_cap);
    SELECT g.id, g.stream_id, g.ordered, g.fair INTO gid, sid, v_ordered, v_fair
    FROM @ns@.groups g JOIN @ns@.streams s ON s.id = g.stream_id
    WHERE s.name = stream AND g.name = "group";
    IF gid IS NULL THEN
        RETURN false;
    END IF;
    PERFORM @ns@._check_key_limit(v_ordered, v_cap);
    PERFORM @ns@._check(NOT (v_fair AND v_cap IS NOT NULL), 'a fair group cannot have a per-key limit',
        'fair share and max_in_flight_per_key do not combine: choose one of the two');
    -- Publishers of keyed messages to the group hold this lock shared: none is between
    -- reading the old limit and queueing.
    PERFORM pg_advisory_xact_lock(@ns@._key_limit_lock(gid));
    SELECT g.max_in_flight_per_key INTO v_old FROM @ns@.groups g WHERE g.id = gid FOR NO KEY UPDATE;
    UPDATE @ns@.groups g SET max_in_flight_per_key = v_cap WHERE g.id = gid;
    -- A raised or removed limit lets waiting deliveries go: wake the stream's consumers at commit
    -- (sent only then, so after the lines below have moved; the engine's pool, which does not
    -- notify, wakes them itself).
    IF v_cap IS DISTINCT FROM v_old AND coalesce(current_setting('pgtide.notify', true), '') <> 'off' THEN
        PERFORM pg_notify('pgtide.' || @ns_lit@, stream);
    END IF;
    IF v_ordered THEN
        -- The lines are the ordered group's own (one head per key): nothing moves.
        RETURN true;
    END IF;
    -- Deadlock-free: the group's lock (publishers held off) first; key locks (in the one
    -- global order, as advances take them) only before updating waiting deliveries, which no
    -- settle touches, never before waiting for a row a settle may hold.
    IF v_cap IS NULL THEN
        IF v_old IS NOT NULL THEN
            -- Every line released: the waiting deliveries due again at their own times. They
            -- keep their keys (settles of a group without the limit move no key on).
            SELECT array_agg(DISTINCT d.key) INTO v_keys FROM @ns@.delivery_state d
            WHERE d.group_id = gid AND d.key IS NOT NULL AND d.visible_at >= @ns@._parked_bound();
            PERFORM @ns@._lock_keys(gid, v_keys);
            UPDATE @ns@.delivery_state d
            SET visible_at = greatest(now(), d.visible_at - @ns@._parked_offset())
            WHERE d.group_id = gid AND d.key IS NOT NULL AND d.visible_at >= @ns@._parked_bound();
        END IF;
        RETURN true;
    END IF;
    IF v_old IS NULL THEN
        -- The group's pending deliveries without a key of their own yet join their keys'
        -- lines: per key, those that already have one (from an earlier limit) count first,
        -- then those leased, then the rest in id order, up to the limit; the others wait.
        -- No key locks here: until this commits, advances read no limit and move nothing, so
        -- nobody else changes a line; a settle may hold a row this waits for while it waits
        -- for a key's lock, which must then be free.
        UPDATE @ns@.delivery_state d
        -- A leased delivery is never parked (settles never touch a waiting one, which keeps
        -- them out of this call's key locks): a key leased beyond the limit keeps its heads
        -- until they leave, as after lowering the limit. `d.consumer` is the row as updated,
        -- so a claim committed since the ranking counts too.
        -- The heads come first in a key's line (`delivery_state_key`): numbers in place order,
        -- and a delivery left a head only because a claim leased it since the ranking goes
        -- before every number taken (heads need no order among themselves).
        SET key = r.key, key_limited = true,
            key_seq = CASE WHEN r.place > v_cap AND d.consumer IS NULL THEN r.seq
                           ELSE r.seq - 4611686018427387904 END,
            visible_at = CASE WHEN r.place > v_cap AND d.consumer IS NULL
                              THEN d.visible_at + @ns@._parked_offset()
                              ELSE d.visible_at END
        FROM (SELECT y.message_id, y.key, y.place, nextval('@ns@.key_seq') AS seq
              FROM (SELECT d2.message_id, m.key, d2.key IS NULL AS fresh,
                           row_number() OVER (PARTITION BY m.key
                                              ORDER BY (d2.key IS NOT NULL) DESC,
                                                       (d2.consumer IS NOT NULL) DESC,
                                                       d2.message_id) AS place
                    FROM @ns@.delivery_state d2
                    CROSS JOIN LATERAL (SELECT mm.key FROM @ns@.messages mm
                                        WHERE mm.stream_id = sid AND mm.id = d2.message_id LIMIT 1) m
                    WHERE d2.group_id = gid AND m.key IS NOT NULL) y
              WHERE y.fresh
              ORDER BY y.place, y.message_id) r
        WHERE d.group_id = gid AND d.message_id = r.message_id AND d.key IS NULL;
        -- A head settled while this ran (gone before its row was marked, so its settle moved no
        -- key on): its key takes the next of its line now.
        PERFORM @ns@._repair_keys(gid);
        RETURN true;
    END IF;
    -- A new limit: keys with room take the next of their lines now.
    PERFORM @ns@._repair_keys(gid);
    RETURN true;
END $$;
