-- pgtide delivery: claim, the fenced settles, dead letters, and the by-name surface for psql and
-- other languages. Internal functions start with `_` and take ids; the Rust engine calls them, so
-- there is one implementation of each rule.
--
-- `migrate()` re-applies this file (after the versioned migrations, in one transaction with the
-- other function files, under the namespace's migration lock) whenever its text changes; the
-- checksum of what was applied is kept in `@ns@._pgtide_sql`. Every statement here must be
-- re-runnable: CREATE OR REPLACE. It cannot change a function's result type or argument names, or
-- drop or retype a view's columns: such a change needs a `DROP ... IF EXISTS` just before it in
-- this file (and dependants recreated in the same file). Tables, indexes and data changes belong
-- in `migrations/`, never here.

-- The result gained `lease_token` (migration 0008), `key` (0010), `due_at` and `acked`, and the
-- arguments `p_floor` and the acks (`p_ack_*`): a new result type or argument list needs the DROP
-- of the old signature (a shorter version left beside the new one would make its calls ambiguous).
--
-- `p_floor` (the claim floor, docs/performance.md "Held xmin"): when set, the walk of the claim
-- index starts at `visible_at >= p_floor` instead of the group's first entry. Under a held
-- snapshot the entries that acks and claims leave behind cannot be removed, and they all sort
-- before the live rows, so a claim from the start walks every one of them; a floor just below
-- what the caller last claimed skips them. A ready row below the floor (a publish that committed
-- late, a rolled-back claim, a priority head start) is left to the caller's next claim without a
-- floor, which the engine makes at least once a second (`src/postgres/floor.rs`). Ordered and
-- rate-limited groups ignore the floor. `due_at` is each claimed row's `visible_at` before the
-- claim (when it became ready), from which the caller keeps its floor.
--
-- `p_ack_ids` (with `p_ack_attempts` and `p_ack_tokens`, as `_ack` takes them): deliveries to
-- ack before the claim, in the same function (`ack_and_fetch`, sql/ack_claim.sql). One function
-- instead of `_ack` and then `_claim` saves a call with its own `SET` block and group read, and
-- the statement around them (docs/performance.md "One function for ack_and_fetch"). `acked` is
-- the ids the acks removed, in a first row of its own without an id (none when the acks removed
-- nothing); the claimed rows' `acked` is NULL.
DROP FUNCTION IF EXISTS @ns@._claim(integer, integer, text, interval);
DROP FUNCTION IF EXISTS @ns@._claim(integer, integer, text, interval, timestamptz);
CREATE OR REPLACE FUNCTION @ns@._claim(p_group integer, p_limit integer, p_consumer text, p_lease interval DEFAULT NULL,
                                       p_floor timestamptz DEFAULT NULL, p_ack_ids uuid[] DEFAULT NULL,
                                       p_ack_attempts integer[] DEFAULT NULL, p_ack_tokens bigint[] DEFAULT NULL)
RETURNS TABLE (id uuid, attempt integer, lease_expires_at timestamptz, payload bytea, is_json boolean, headers jsonb,
               lease_expired boolean, lease_token bigint, key text, due_at timestamptz, acked uuid[])
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
-- Pin the plan to an ordered scan of the claim index that stops at LIMIT, whatever the
-- statistics say (fresh queue tables have none, and a bitmap scan plus sort of the whole
-- backlog would make claims O(backlog)). The claim itself touches only unpartitioned tables and
-- runs on its cached generic plan: planning it afresh cost two thirds of a claim of ten (perf,
-- docs/performance.md). The message lookup, on the partitioned `messages`, is the stream's own
-- function (`_lookup_define`): a generic plan of a lookup that takes the stream as a parameter
-- would lock every partition of every stream (PostgreSQL 15 prunes them only at run time).
SET enable_sort = off SET enable_bitmapscan = off SET enable_seqscan = off
SET enable_hashjoin = off SET enable_mergejoin = off SET jit = off
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
    sid       integer;
    v_lease   interval;
    v_max     integer;
    v_ordered boolean;
    v_cap     integer;
    v_kcap    integer;
    v_rate    double precision;
    v_burst   integer;
    v_krate   double precision;
    v_kburst  integer;
    v_fair    boolean;
    v_lined   boolean;
    c_ids     uuid[];
    c_att     integer[];
    c_vis     timestamptz[];
    c_exp     boolean[];
    c_tok     bigint[];
    c_due     timestamptz[];
    x_ids     uuid[];
    v_acked   uuid[];
    v_buried  integer := 0;
BEGIN
    SELECT s.id, coalesce(p_lease, s.lease), s.max_deliver, g.ordered, g.max_in_flight,
           g.rate, g.burst, g.key_rate, g.key_burst, g.fair, g.max_in_flight_per_key
    INTO sid, v_lease, v_max, v_ordered, v_cap, v_rate, v_burst, v_krate, v_kburst, v_fair, v_kcap
    FROM @ns@.groups g JOIN @ns@.streams s ON s.id = g.stream_id WHERE g.id = p_group;
    IF sid IS NULL THEN
        RAISE EXCEPTION 'pgtide: group id % does not exist', p_group USING ERRCODE = 'PT003';
    END IF;
    -- Ordered groups and groups with a per-key limit (key lines, ordering.sql).
    v_lined := v_ordered OR v_kcap IS NOT NULL;
    IF cardinality(p_ack_ids) > 0 THEN
        IF v_lined THEN
            -- Key lines: `_ack`'s own path (the acked heads' keys move on).
            v_acked := ARRAY(SELECT a.x FROM @ns@._ack(p_group, p_ack_ids, p_ack_attempts, p_ack_tokens) AS a (x));
        ELSE
            -- `_ack`'s statement for groups without key lines (keep the two alike).
            WITH done AS (
                DELETE FROM @ns@.delivery_state d
                USING (SELECT p_group AS gid, v.* FROM unnest(p_ack_ids, p_ack_attempts, p_ack_tokens)
                       AS v (id, attempt, token) OFFSET 0) AS u
                WHERE d.group_id = u.gid AND d.message_id = u.id AND d.consumer IS NOT NULL
                  AND (u.attempt IS NULL OR d.attempts = u.attempt)
                  AND (u.token IS NULL OR d.lease_token = u.token)
                RETURNING d.message_id
            ), counted AS (
                INSERT INTO @ns@.counter_deltas (group_id, pending)
                SELECT p_group, -count(*) FROM done HAVING count(*) > 0
            )
            SELECT array_agg(dn.message_id) INTO v_acked FROM done dn;
        END IF;
        IF cardinality(v_acked) > 0 THEN
            -- The acks in a row of their own, the first (the OUT columns but `acked` are NULL):
            -- RETURN NEXT runs no statement, and the claimed rows do not carry the ids.
            acked := v_acked;
            RETURN NEXT;
            acked := NULL;
        END IF;
    END IF;
    IF v_cap IS NOT NULL THEN
        -- A limited group: claims take turns (the group's row lock, held to commit) and take
        -- at most what the limit leaves (`_in_flight_room`).
        p_limit := least(p_limit, @ns@._in_flight_room(p_group, v_cap));
        IF p_limit <= 0 THEN
            RETURN;
        END IF;
    END IF;
    IF v_fair THEN
        -- A fair group: what came due at a real time joins the virtual queue first (fair.sql),
        -- then the same walk serves the queue in stamp order.
        PERFORM @ns@._fair_restamp(p_group, p_limit);
        -- No floor either: restamped deliveries join just below the group's virtual time.
        p_floor := NULL;
    END IF;
    IF v_rate IS NOT NULL OR v_krate IS NOT NULL THEN
        -- Rate limits: a statement of their own (flow_control.sql), off the unlimited path.
        RETURN QUERY SELECT l.*, NULL::timestamptz, NULL::uuid[] FROM @ns@._claim_limited(p_group, p_limit, p_consumer, sid,
                                                       v_lease, v_max, v_rate, v_burst, v_krate, v_kburst) l;
        RETURN;
    END IF;
    -- Key lines: the same walk (only heads are due), on the same cached plan; heads that die
    -- here let their keys move on below. No floor: an advanced head comes back at its old due
    -- time.
    IF v_lined THEN
        p_floor := NULL;
    END IF;
    WITH picked AS MATERIALIZED (
        SELECT d.message_id, d.attempts, d.consumer, d.visible_at AS due FROM @ns@.delivery_state d
        -- coalesce: the generic plan takes the floor as an index bound whether or not it is set
        WHERE d.group_id = p_group AND d.visible_at >= coalesce(p_floor, '-infinity')
          AND d.visible_at <= now()
        ORDER BY d.visible_at
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    ), claimed AS (
        UPDATE @ns@.delivery_state d
        SET attempts = d.attempts + 1, visible_at = now() + v_lease, consumer = p_consumer,
            -- the fence: a fresh random token, whatever happens to attempts (core.sql)
            lease_token = @ns@._lease_token()
        FROM picked p
        WHERE d.group_id = p_group AND d.message_id = p.message_id AND p.attempts < v_max
        -- a claimed row that still names a consumer was never settled: its lease expired
        RETURNING d.message_id, d.attempts, d.visible_at, p.consumer IS NOT NULL AS expired,
                  d.lease_token, p.due
    )
    SELECT array_agg(c.message_id), array_agg(c.attempts), array_agg(c.visible_at),
           array_agg(c.expired), array_agg(c.lease_token), array_agg(c.due),
           (SELECT array_agg(p.message_id) FROM picked p WHERE p.attempts >= v_max)
    INTO c_ids, c_att, c_vis, c_exp, c_tok, c_due, x_ids
    FROM claimed c;
    IF x_ids IS NOT NULL THEN
        -- The lease of the last allowed attempt expired: dead-letter instead of delivering again,
        -- in a statement of its own, run only when there is one (the claim above holds their
        -- locks): three more modifying CTEs on every claim cost more than this call does.
        v_buried := @ns@._bury_exhausted(p_group, x_ids);
    END IF;
    IF v_fair OR v_lined THEN
        -- A fair group's stamps are virtual, and an advanced head comes back at its old due
        -- time: the engine keeps no floor for either.
        c_due := NULL;
    END IF;
    IF c_ids IS NULL THEN
        IF v_lined AND v_buried > 0 THEN
            -- Dead heads let their keys' next messages go, which this claim did not see (they
            -- moved in a later statement): nothing claimed, but come back at once. The engine's
            -- pool does not notify, so nothing else would wake a fetch for them.
            RETURN QUERY SELECT c.*, NULL::timestamptz, NULL::uuid[] FROM @ns@._come_back(interval '0') c;
        END IF;
        RETURN;
    END IF;
    -- The messages, through the stream's own lookup function (`_lookup_define` below): its
    -- statement names the stream as a constant, so its cached plan holds only this stream's
    -- partitions. The EXECUTE here plans a function call, not the lookup.
    -- It returns `_claim`'s row type as it is (`acked` NULL: the acks have their own row), so
    -- the rows pass through without a projection.
    RETURN QUERY EXECUTE 'SELECT * FROM @ns@._lookup_s' || sid || '($1, $2, $3, $4, $5, $6, $7)'
        USING c_ids, c_att, c_vis, c_exp, c_tok, c_due, NULL::uuid[];
END $$;

-- Dead-letters deliveries whose last allowed attempt's lease expired (`_claim`, `_claim_limited`):
-- the caller picked them under lock and checked their attempts. Returns how many were buried.
CREATE OR REPLACE FUNCTION @ns@._bury_exhausted(p_group integer, p_ids uuid[]) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
SET jit = off
AS $$
DECLARE
    v_n    integer;
    v_keys text[];
    v_seqs bigint[];
BEGIN
    WITH exhausted AS (
        DELETE FROM @ns@.delivery_state d
        WHERE d.group_id = p_group AND d.message_id = ANY (p_ids)
        RETURNING d.message_id, d.attempts, d.last_error, d.key, d.key_seq
    ), dead AS (
        INSERT INTO @ns@.dead_letter_state (group_id, message_id, attempts, reason, error)
        SELECT p_group, e.message_id, e.attempts, 'max_deliver',
               coalesce(e.last_error, 'lease expired on attempt ' || e.attempts)
        FROM exhausted e
        RETURNING 1
    ), counted AS (
        INSERT INTO @ns@.counter_deltas (group_id, pending, dead)
        SELECT p_group, -count(*), count(*) FROM dead HAVING count(*) > 0
    )
    SELECT count(*), array_agg(e.key) FILTER (WHERE e.key IS NOT NULL),
           array_agg(e.key_seq) FILTER (WHERE e.key IS NOT NULL)
    INTO v_n, v_keys, v_seqs
    FROM exhausted e;
    IF v_keys IS NOT NULL THEN
        -- Dead heads leave their keys' lines: the next of each becomes its head (a statement
        -- after the deletes, so `_advance_keys` sees them gone).
        PERFORM @ns@._advance_keys(p_group, v_keys, v_seqs);
    END IF;
    RETURN v_n;
END $$;

-- Each stream's message lookup for `_claim`: `@ns@._lookup_s<stream id>` takes the claimed
-- deliveries (arrays in `_claim`'s order) and returns `_claim`'s rows, with each message's columns
-- from one primary-key lookup (LATERAL ... LIMIT 1, never a join strategy that walks the
-- stream's messages).
--
-- Why one function per stream: a lookup whose statement takes the stream as a parameter either
-- is planned afresh on every claim (a third of a claim of ten and its ack, icount, as `_claim`
-- did through EXECUTE until 2026-12-04) or runs on a generic plan, which holds every partition
-- of every stream, and PostgreSQL 15 locks all of them before pruning at run time (thousands of
-- locks per claim with many streams, which fill the server's lock table). Here the stream is a
-- constant in the statement's text, so its cached generic plan prunes to the stream's own
-- partitions when it is made: one plan per stream and session, re-made only when the stream's
-- partitions change. It has no SET clauses (saving their save and restore on every claim): its
-- only caller, `_claim`, runs it under `_claim`'s settings, which pin its plan to index lookups;
-- it is not SECURITY DEFINER (`_claim`, the owner, calls it), so a runtime role calling it
-- directly reads nothing.
--
-- Created by `create_stream`, re-created for every stream whenever this file is applied (below),
-- dropped by `delete_stream`.
CREATE OR REPLACE FUNCTION @ns@._lookup_define(p_stream integer) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    f      regprocedure;
    v_name text := '_lookup_s' || p_stream;
    v_args text := 'uuid[], integer[], timestamptz[], boolean[], bigint[], timestamptz[], uuid[]';
    v_body text;
BEGIN
    -- The first line says what changed last, so that any change to the function changes its text.
    v_body := format($b$
-- %s
BEGIN
    RETURN QUERY
    SELECT c.id, c.attempt, c.visible_at, m.payload, m.is_json, m.headers, c.expired, c.token, m.key, c.due, c_acked
    FROM unnest(c_ids, c_att, c_vis, c_exp, c_tok, c_due) AS c (id, attempt, visible_at, expired, token, due)
    CROSS JOIN LATERAL (
        SELECT mm.payload, mm.is_json, mm.headers, mm.key FROM @ns@.messages mm
        WHERE mm.stream_id = %s AND mm.id = c.id LIMIT 1
    ) m;
END
$b$, 'no SET clauses: run under _claim''s settings', p_stream);
    -- Unchanged (this file re-applied for another reason): nothing to do, so a migrate() of a
    -- namespace with thousands of streams takes no lock per stream.
    IF EXISTS (SELECT 1 FROM pg_proc p
               WHERE p.oid = to_regprocedure(format('@ns@.%I(%s)', v_name, v_args)) AND p.prosrc = v_body) THEN
        RETURN;
    END IF;
    -- Versions with other arguments go; the current one is replaced in place (a claim running
    -- meanwhile keeps calling the function it resolved). A new result type needs new arguments.
    FOR f IN SELECT p.oid::regprocedure FROM pg_proc p
             WHERE p.pronamespace = @ns_lit@::regnamespace AND p.proname = v_name
               AND p.oid IS DISTINCT FROM to_regprocedure(format('@ns@.%I(%s)', v_name, v_args))
    LOOP
        EXECUTE format('DROP FUNCTION %s', f);
    END LOOP;
    EXECUTE format('CREATE OR REPLACE FUNCTION @ns@.%I(c_ids uuid[], c_att integer[], c_vis timestamptz[], c_exp boolean[],
                                                   c_tok bigint[], c_due timestamptz[], c_acked uuid[])
                    RETURNS TABLE (id uuid, attempt integer, lease_expires_at timestamptz, payload bytea, is_json boolean,
                                   headers jsonb, lease_expired boolean, lease_token bigint, key text, due_at timestamptz,
                                   acked uuid[])
                    LANGUAGE plpgsql AS %L', v_name, v_body);
    EXECUTE format('REVOKE ALL ON FUNCTION @ns@.%I(%s) FROM PUBLIC', v_name, v_args);
END $$;

-- Drops the lookup function of stream `p_stream` (`delete_stream`).
CREATE OR REPLACE FUNCTION @ns@._lookup_drop(p_stream integer) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN SELECT p.oid::regprocedure FROM pg_proc p
             WHERE p.pronamespace = @ns_lit@::regnamespace AND p.proname = '_lookup_s' || p_stream
    LOOP
        EXECUTE format('DROP FUNCTION %s', f);
    END LOOP;
END $$;

-- Every stream's lookup, as this file defines it (a stream created by a release before it has none).
SELECT @ns@._lookup_define(s.id) FROM @ns@.streams s ORDER BY s.id;

---------------------------------------------------------------------------------------------------
-- settle. Every settle is fenced: the delivery must still be leased (consumer set) and, when the
-- caller passes lease tokens, still be held under the token its claim returned (a release, a
-- replay or a later claim always draws a new random token, `_lease_token`, even after a crash
-- lost the claim that drew the old one). A consumer whose lease lapsed and whose delivery was
-- claimed again changes nothing. Callers that pass no token are fenced only by the lease (and by
-- attempt numbers, kept for callers from before the tokens). Each returns the ids it settled.

-- Whether a settle in group `p_group` may let a waiting consumer claim something it could not
-- before: the group has a concurrency limit (a settle that ends a lease makes room) or key lines
-- (the key's next delivery becomes its head). Read at the time of the settle, never cached, so a
-- limit set while consumers run counts at once. The engine's settle statements return it (its
-- pool's connections do not notify: the engine wakes the group's consumers itself after the
-- commit); the settles of SQL callers notify at commit (`_wake_room`, `_advance_keys`).
CREATE OR REPLACE FUNCTION @ns@._settle_wakes(p_group integer) RETURNS boolean
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN coalesce((SELECT g.ordered OR g.max_in_flight IS NOT NULL OR g.max_in_flight_per_key IS NOT NULL
                     FROM @ns@.groups g WHERE g.id = p_group), false);
END $$;

-- After `p_settled` deliveries of group `p_group` let go of their leases: when the group has a
-- concurrency limit, a consumer may be waiting for the room they made, so SQL callers notify the
-- stream at commit. The engine's pool (`pgtide.notify = off`) wakes the consumers itself.
-- Called only from the settles (which run as the namespace owner, on their own search_path).
CREATE OR REPLACE FUNCTION @ns@._wake_room(p_group integer, p_settled bigint) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF p_settled > 0 AND coalesce(current_setting('pgtide.notify', true), '') <> 'off' THEN
        PERFORM pg_notify('pgtide.' || @ns_lit@, s.name)
        FROM @ns@.groups g JOIN @ns@.streams s ON s.id = g.stream_id
        WHERE g.id = p_group AND g.max_in_flight IS NOT NULL;
    END IF;
END $$;

DROP FUNCTION IF EXISTS @ns@._ack(integer, uuid[], integer[]);
CREATE OR REPLACE FUNCTION @ns@._ack(p_group integer, p_ids uuid[], p_attempts integer[] DEFAULT NULL,
                                     p_tokens bigint[] DEFAULT NULL)
RETURNS SETOF uuid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
-- Settles look deliveries up by primary key, never by scanning or hashing the table. The ids come
-- from a subquery that also carries the group (`OFFSET 0`: not flattened), so the table has no
-- condition of its own and each delivery is a probe of the key from the ids: on statistics taken
-- while the group was empty (a backlog filled since the last ANALYZE), `d.group_id = p_group`
-- had the planner scan the whole group once instead, for every ack (65 ms at 1 M;
-- tests/it/postgres/plans.rs).
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
SET jit = off
AS $$
DECLARE
    v_ids    uuid[];
    v_keys   text[];
    v_seqs   bigint[];
    v_n      bigint;
    v_lines  boolean;
    v_capped boolean;
BEGIN
    -- Inline rather than `_is_ordered`: a SQL function called from here is parsed and planned
    -- on every call (a tenth of a claim-and-ack of ten, perf), this statement's plan is cached.
    -- Groups with key lines: ordered ones and those with a per-key limit.
    SELECT g.ordered OR g.max_in_flight_per_key IS NOT NULL, g.max_in_flight IS NOT NULL
    INTO v_lines, v_capped FROM @ns@.groups g WHERE g.id = p_group;
    IF NOT coalesce(v_lines, false) THEN
        RETURN QUERY
        WITH done AS (
            DELETE FROM @ns@.delivery_state d
            USING (SELECT p_group AS gid, v.* FROM unnest(p_ids, p_attempts, p_tokens) AS v (id, attempt, token) OFFSET 0) AS u
            WHERE d.group_id = u.gid AND d.message_id = u.id AND d.consumer IS NOT NULL
              AND (u.attempt IS NULL OR d.attempts = u.attempt)
              AND (u.token IS NULL OR d.lease_token = u.token)
            RETURNING d.message_id
        ), counted AS (
            INSERT INTO @ns@.counter_deltas (group_id, pending)
            SELECT p_group, -count(*) FROM done HAVING count(*) > 0
        )
        SELECT message_id FROM done;
        -- Only a capped group's acks wake anyone: an uncapped group's hot path checks nothing more.
        IF v_capped THEN
            GET DIAGNOSTICS v_n = ROW_COUNT;
            PERFORM @ns@._wake_room(p_group, v_n);
        END IF;
        RETURN;
    END IF;
    -- Key lines: the acked heads' keys move on once the deletes are seen (a statement later).
    WITH done AS (
        DELETE FROM @ns@.delivery_state d
        USING (SELECT p_group AS gid, v.* FROM unnest(p_ids, p_attempts, p_tokens) AS v (id, attempt, token) OFFSET 0) AS u
        WHERE d.group_id = u.gid AND d.message_id = u.id AND d.consumer IS NOT NULL
          AND (u.attempt IS NULL OR d.attempts = u.attempt)
          AND (u.token IS NULL OR d.lease_token = u.token)
        RETURNING d.message_id, d.key, d.key_seq
    ), counted AS (
        INSERT INTO @ns@.counter_deltas (group_id, pending)
        SELECT p_group, -count(*) FROM done HAVING count(*) > 0
    )
    SELECT array_agg(message_id), array_agg(key) FILTER (WHERE key IS NOT NULL),
           array_agg(key_seq) FILTER (WHERE key IS NOT NULL)
    INTO v_ids, v_keys, v_seqs FROM done;
    PERFORM @ns@._advance_keys(p_group, v_keys, v_seqs);
    PERFORM @ns@._wake_room(p_group, coalesce(cardinality(v_ids), 0));
    RETURN QUERY SELECT x FROM unnest(v_ids) x;
END $$;

-- Retry later: after the given delay, or the stream's backoff for the attempt. A delivery on its
-- last allowed attempt goes to the dead letters instead (`dead` = true).
DROP FUNCTION IF EXISTS @ns@._nack(integer, uuid[], integer[], interval[], text[]);
CREATE OR REPLACE FUNCTION @ns@._nack(p_group integer, p_ids uuid[], p_attempts integer[] DEFAULT NULL,
                           p_delays interval[] DEFAULT NULL, p_errors text[] DEFAULT NULL,
                           p_tokens bigint[] DEFAULT NULL)
RETURNS TABLE (id uuid, dead boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
-- Settles look deliveries up by primary key, never by scanning or hashing the table.
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
SET jit = off
AS $$
#variable_conflict use_column
DECLARE
    v_max     integer;
    v_backoff interval[];
    v_jitter  real;
    v_ids     uuid[];
    v_dead    boolean[];
    v_keys    text[];
BEGIN
    SELECT s.max_deliver, s.backoff, s.backoff_jitter INTO v_max, v_backoff, v_jitter
    FROM @ns@.groups g JOIN @ns@.streams s ON s.id = g.stream_id WHERE g.id = p_group;
    WITH t AS MATERIALIZED (
        SELECT d.message_id, d.attempts, u.delay, u.error, u.gid
        FROM @ns@.delivery_state d
        JOIN (SELECT p_group AS gid, v.* FROM unnest(p_ids, p_attempts, p_delays, p_errors, p_tokens)
              AS v (id, attempt, delay, error, token) OFFSET 0) AS u
          ON d.group_id = u.gid AND d.message_id = u.id
        WHERE d.consumer IS NOT NULL
          AND (u.attempt IS NULL OR d.attempts = u.attempt)
          AND (u.token IS NULL OR d.lease_token = u.token)
        FOR UPDATE OF d
    ), retry AS (
        UPDATE @ns@.delivery_state d
        SET consumer = NULL, lease_token = NULL, last_error = t.error,
            visible_at = now() + coalesce(
                t.delay,
                v_backoff[least(t.attempts, cardinality(v_backoff))] * (1 + v_jitter * (random() * 2 - 1)))
        FROM t
        WHERE d.group_id = t.gid AND d.message_id = t.message_id AND t.attempts < v_max
        RETURNING d.message_id
    ), exhausted AS (
        DELETE FROM @ns@.delivery_state d USING t
        WHERE d.group_id = t.gid AND d.message_id = t.message_id AND t.attempts >= v_max
        RETURNING d.message_id, d.attempts, t.error, d.key
    ), buried AS (
        INSERT INTO @ns@.dead_letter_state (group_id, message_id, attempts, reason, error)
        SELECT p_group, e.message_id, e.attempts, 'max_deliver', e.error FROM exhausted e
        RETURNING 1
    ), counted AS (
        INSERT INTO @ns@.counter_deltas (group_id, pending, dead)
        SELECT p_group, -count(*), count(*) FROM buried HAVING count(*) > 0
    )
    SELECT array_agg(r.message_id), array_agg(r.dead), array_agg(r.key) FILTER (WHERE r.dead AND r.key IS NOT NULL)
    INTO v_ids, v_dead, v_keys
    FROM (SELECT r.message_id, false AS dead, NULL::text AS key FROM retry r
          UNION ALL
          SELECT e.message_id, true, e.key FROM exhausted e) r;
    -- A dead head lets its key move on (ordered groups; nothing to do elsewhere).
    PERFORM @ns@._advance_keys(p_group, v_keys);
    PERFORM @ns@._wake_room(p_group, coalesce(cardinality(v_ids), 0));
    RETURN QUERY SELECT x.id, x.dead FROM unnest(v_ids, v_dead) AS x (id, dead);
    -- SQL callers (not the engine's pool, which hints after its commit): a transactional hint,
    -- delivered at commit, so the scout also covers a retry committed after its due time.
    IF cardinality(v_ids) > 0 AND coalesce(current_setting('pgtide.notify', true), '') <> 'off' THEN
        PERFORM pg_notify('pgtide.' || @ns_lit@, '@' || floor(extract(epoch FROM now()) * 1000)::bigint);
    END IF;
END $$;

-- Dead-letter now, with a reason.
DROP FUNCTION IF EXISTS @ns@._term(integer, uuid[], integer[], text[]);
CREATE OR REPLACE FUNCTION @ns@._term(p_group integer, p_ids uuid[], p_attempts integer[] DEFAULT NULL,
                           p_reasons text[] DEFAULT NULL, p_tokens bigint[] DEFAULT NULL)
RETURNS SETOF uuid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
-- Settles look deliveries up by primary key, never by scanning or hashing the table.
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
SET jit = off
AS $$
DECLARE
    v_ids  uuid[];
    v_keys text[];
BEGIN
    WITH gone AS (
        DELETE FROM @ns@.delivery_state d
        USING (SELECT p_group AS gid, v.* FROM unnest(p_ids, p_attempts, p_reasons, p_tokens)
               AS v (id, attempt, reason, token) OFFSET 0) AS u
        WHERE d.group_id = u.gid AND d.message_id = u.id AND d.consumer IS NOT NULL
          AND (u.attempt IS NULL OR d.attempts = u.attempt)
          AND (u.token IS NULL OR d.lease_token = u.token)
        RETURNING d.message_id, d.attempts, coalesce(u.reason, 'terminated') AS reason, d.last_error, d.key
    ), buried AS (
        INSERT INTO @ns@.dead_letter_state (group_id, message_id, attempts, reason, error)
        SELECT p_group, message_id, attempts, reason, last_error FROM gone
        RETURNING 1
    ), counted AS (
        INSERT INTO @ns@.counter_deltas (group_id, pending, dead)
        SELECT p_group, -count(*), count(*) FROM buried HAVING count(*) > 0
    )
    SELECT array_agg(message_id), array_agg(key) FILTER (WHERE key IS NOT NULL) INTO v_ids, v_keys FROM gone;
    -- A dead-lettered head lets the next delivery of its key go (ordered groups).
    PERFORM @ns@._advance_keys(p_group, v_keys);
    PERFORM @ns@._wake_room(p_group, coalesce(cardinality(v_ids), 0));
    RETURN QUERY SELECT x FROM unnest(v_ids) x;
END $$;

-- Extend the lease (in_progress): visible again only `p_lease` (default: the stream's lease) from now.
DROP FUNCTION IF EXISTS @ns@._extend(integer, uuid[], integer[], interval);
CREATE OR REPLACE FUNCTION @ns@._extend(p_group integer, p_ids uuid[], p_attempts integer[] DEFAULT NULL,
                             p_lease interval DEFAULT NULL, p_tokens bigint[] DEFAULT NULL)
RETURNS TABLE (id uuid, lease_expires_at timestamptz)
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
-- Settles look deliveries up by primary key, never by scanning or hashing the table.
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
SET jit = off
AS $$
    UPDATE @ns@.delivery_state d
    SET visible_at = now() + coalesce(p_lease, (SELECT s.lease FROM @ns@.groups g
                                                JOIN @ns@.streams s ON s.id = g.stream_id
                                                WHERE g.id = p_group))
    FROM (SELECT p_group AS gid, v.* FROM unnest(p_ids, p_attempts, p_tokens) AS v (id, attempt, token) OFFSET 0) AS u
    WHERE d.group_id = u.gid AND d.message_id = u.id AND d.consumer IS NOT NULL
      AND (u.attempt IS NULL OR d.attempts = u.attempt)
      AND (u.token IS NULL OR d.lease_token = u.token)
    RETURNING d.message_id, d.visible_at
$$;

-- Hand deliveries back unprocessed (shutdown): visible at once, and the attempt does not count.
DROP FUNCTION IF EXISTS @ns@._release(integer, uuid[], integer[]);
CREATE OR REPLACE FUNCTION @ns@._release(p_group integer, p_ids uuid[], p_attempts integer[] DEFAULT NULL,
                                         p_tokens bigint[] DEFAULT NULL)
RETURNS SETOF uuid
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
-- Settles look deliveries up by primary key, never by scanning or hashing the table.
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
SET jit = off
AS $$
    UPDATE @ns@.delivery_state d
    SET visible_at = now(), consumer = NULL, lease_token = NULL,
        attempts = greatest(d.attempts - 1, 0)
    FROM (SELECT p_group AS gid, v.* FROM unnest(p_ids, p_attempts, p_tokens) AS v (id, attempt, token) OFFSET 0) AS u
    WHERE d.group_id = u.gid AND d.message_id = u.id AND d.consumer IS NOT NULL
      AND (u.attempt IS NULL OR d.attempts = u.attempt)
      AND (u.token IS NULL OR d.lease_token = u.token)
    RETURNING d.message_id
$$;

-- Dead letters back into the group with a fresh attempt count (all of the group's when p_ids is NULL).
-- In an ordered group (or one with a per-key limit) a keyed message rejoins its key at the end
-- of the line (or becomes a head when the key has room).
DROP FUNCTION IF EXISTS @ns@._replay_dead(integer, uuid[]);
CREATE OR REPLACE FUNCTION @ns@._replay_dead(p_group integer, p_ids uuid[] DEFAULT NULL)
RETURNS SETOF uuid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_ids     uuid[];
    v_keys    text[];
    v_stream  integer;
    v_ordered boolean;
BEGIN
    -- One at a time with the group's resets (`reset_group`, the same locks in the same order):
    -- a reset queueing the same message between the check of what is pending below and the
    -- insert would make the ordered insert fail on the unique key, or deadlock on the keys.
    PERFORM pg_advisory_xact_lock_shared(@ns@._key_limit_lock(p_group));
    PERFORM pg_advisory_xact_lock(hashtext(@ns_lit@ || '.reset.' || p_group));
    SELECT g.stream_id, g.ordered OR g.max_in_flight_per_key IS NOT NULL INTO v_stream, v_ordered
    FROM @ns@.groups g WHERE g.id = p_group;
    WITH back AS (
        DELETE FROM @ns@.dead_letter_state d
        WHERE d.group_id = p_group AND (p_ids IS NULL OR d.message_id = ANY (p_ids))
        RETURNING d.message_id
    ), counted AS (
        INSERT INTO @ns@.counter_deltas (group_id, pending, dead)
        SELECT p_group, count(*), -count(*) FROM back HAVING count(*) > 0
    )
    SELECT array_agg(message_id ORDER BY message_id) INTO v_ids FROM back;
    IF v_ids IS NULL THEN
        RETURN;
    END IF;
    IF v_ordered THEN
        -- A message somehow pending in the group already goes as keyless, so that the insert
        -- below skips it (`_enqueue_keyed` expects ids not pending in an ordered group).
        SELECT array_agg(CASE WHEN EXISTS (SELECT 1 FROM @ns@.delivery_state p
                                           WHERE p.group_id = p_group AND p.message_id = u.id)
                              THEN NULL ELSE m.key END ORDER BY u.i) INTO v_keys
        FROM unnest(v_ids) WITH ORDINALITY AS u (id, i)
        LEFT JOIN LATERAL (SELECT mm.key FROM @ns@.messages mm
                           WHERE mm.stream_id = v_stream AND mm.id = u.id LIMIT 1) m ON true;
        PERFORM @ns@._enqueue_keyed(p_group, v_ids, v_keys, array_fill(now(), ARRAY[cardinality(v_ids)]));
    END IF;
    INSERT INTO @ns@.delivery_state (group_id, message_id, visible_at)
    SELECT p_group, u.id, now() FROM unnest(v_ids, v_keys) AS u (id, key)
    WHERE u.key IS NULL
    ON CONFLICT (group_id, message_id) DO NOTHING;
    RETURN QUERY SELECT x FROM unnest(v_ids) x;
END $$;

CREATE OR REPLACE FUNCTION @ns@._purge_dead(p_group integer, p_ids uuid[] DEFAULT NULL)
RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH gone AS (
        DELETE FROM @ns@.dead_letter_state d
        WHERE d.group_id = p_group AND (p_ids IS NULL OR d.message_id = ANY (p_ids))
        RETURNING 1
    ), counted AS (
        INSERT INTO @ns@.counter_deltas (group_id, dead)
        SELECT p_group, -count(*) FROM gone HAVING count(*) > 0
    )
    SELECT count(*) FROM gone
$$;

---------------------------------------------------------------------------------------------------
-- public read / settle by name (psql and other languages). Each checks its arguments first, with
-- the Rust API's rules (`_check*` in core.sql): a bad argument raises PT001 before anything is
-- claimed or changed.

-- The most deliveries one `read` claims, as the Rust consumer's fetch clamps.
CREATE OR REPLACE FUNCTION @ns@._max_batch() RETURNS integer
LANGUAGE sql IMMUTABLE AS $$ SELECT 10000 $$;

-- Returns `lease_token` (migration 0008): pass it back to the settle functions to fence them.
-- And `key` (migration 0010), the message's ordering key.
DROP FUNCTION IF EXISTS @ns@.read(text, text, text, integer, interval);
CREATE OR REPLACE FUNCTION @ns@.read(stream text, "group" text, consumer text, n integer DEFAULT 1,
                          lease interval DEFAULT NULL)
RETURNS TABLE (id uuid, payload jsonb, payload_bytes bytea, headers jsonb, attempt integer,
               published_at timestamptz, lease_expires_at timestamptz, lease_token bigint, key text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    gid integer;
BEGIN
    PERFORM @ns@._check_name('stream', stream);
    PERFORM @ns@._check_name('group', "group");
    -- A NULL consumer would leave the delivery un-ackable (settles need a holder).
    PERFORM @ns@._check_name('consumer', consumer);
    PERFORM @ns@._check(n BETWEEN 1 AND @ns@._max_batch(),
        format('n must be between 1 and %s, not %s', @ns@._max_batch(), coalesce(n::text, 'NULL')),
        'read at most 10000 deliveries per call; call read() again for more');
    gid := @ns@.group_id(stream, "group");
    RETURN QUERY
    SELECT c.id,
           CASE WHEN c.is_json THEN convert_from(c.payload, 'UTF8')::jsonb END,
           c.payload, c.headers, c.attempt, @ns@.uuid_time(c.id), c.lease_expires_at, c.lease_token, c.key
    FROM @ns@._claim(gid, n, consumer, @ns@._check_duration('lease', lease, false)) c
    -- a rate-limited claim that got nothing says when to come back in a row without an id
    WHERE c.id IS NOT NULL;
END $$;

-- The by-name settles take the `lease_token`s that `read` returned, in the order of `ids`, and
-- then settle only deliveries still held under those tokens. Without `tokens` they settle any
-- delivery that is leased to someone: unfenced, for callers that cannot keep the tokens.
DROP FUNCTION IF EXISTS @ns@.ack(text, text, uuid[]);
CREATE OR REPLACE FUNCTION @ns@.ack(stream text, "group" text, ids uuid[], tokens bigint[] DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM @ns@._check_settle(stream, "group", ids, tokens);
    RETURN (SELECT count(*)::integer FROM @ns@._ack(@ns@.group_id(stream, "group"), ids, NULL, tokens));
END $$;

DROP FUNCTION IF EXISTS @ns@.nack(text, text, uuid[], interval, text);
CREATE OR REPLACE FUNCTION @ns@.nack(stream text, "group" text, ids uuid[], delay interval DEFAULT NULL,
                          error text DEFAULT NULL, tokens bigint[] DEFAULT NULL) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM @ns@._check_settle(stream, "group", ids, tokens);
    RETURN (SELECT count(*)::integer FROM @ns@._nack(
        @ns@.group_id(stream, "group"), ids, NULL,
        CASE WHEN delay IS NULL THEN NULL
             ELSE array_fill(@ns@._check_duration('delay', delay, true), ARRAY[cardinality(ids)]) END,
        CASE WHEN error IS NULL THEN NULL ELSE array_fill(error, ARRAY[cardinality(ids)]) END,
        tokens));
END $$;

DROP FUNCTION IF EXISTS @ns@.term(text, text, uuid[], text);
CREATE OR REPLACE FUNCTION @ns@.term(stream text, "group" text, ids uuid[], reason text DEFAULT 'terminated',
                          tokens bigint[] DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM @ns@._check_settle(stream, "group", ids, tokens);
    RETURN (SELECT count(*)::integer FROM @ns@._term(
        @ns@.group_id(stream, "group"), ids, NULL, array_fill(reason, ARRAY[cardinality(ids)]), tokens));
END $$;

-- Extends the leases of deliveries still being worked on: visible again only `lease` (default:
-- the stream's lease) from now. Returns how many were extended (a lapsed lease is not).
DROP FUNCTION IF EXISTS @ns@.in_progress(text, text, uuid[], interval);
CREATE OR REPLACE FUNCTION @ns@.in_progress(stream text, "group" text, ids uuid[], lease interval DEFAULT NULL,
                                 tokens bigint[] DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM @ns@._check_settle(stream, "group", ids, tokens);
    RETURN (SELECT count(*)::integer FROM @ns@._extend(@ns@.group_id(stream, "group"), ids, NULL,
                                                       @ns@._check_duration('lease', lease, false), tokens));
END $$;

-- `extend`: the earlier name of `in_progress`, kept as an alias.
DROP FUNCTION IF EXISTS @ns@.extend(text, text, uuid[], interval);
CREATE OR REPLACE FUNCTION @ns@.extend(stream text, "group" text, ids uuid[], lease interval DEFAULT NULL,
                            tokens bigint[] DEFAULT NULL)
RETURNS integer
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$ SELECT @ns@.in_progress(stream, "group", ids, lease, tokens) $$;

-- `ids` NULL: every dead letter of the group.
CREATE OR REPLACE FUNCTION @ns@.replay_dead(stream text, "group" text, ids uuid[] DEFAULT NULL) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM @ns@._check_name('stream', stream);
    PERFORM @ns@._check_name('group', "group");
    RETURN (SELECT count(*)::integer FROM @ns@._replay_dead(@ns@.group_id(stream, "group"), ids));
END $$;

CREATE OR REPLACE FUNCTION @ns@.purge_dead(stream text, "group" text, ids uuid[] DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM @ns@._check_name('stream', stream);
    PERFORM @ns@._check_name('group', "group");
    RETURN @ns@._purge_dead(@ns@.group_id(stream, "group"), ids);
END $$;
