-- pgtide fair share: weighted fair queueing between the keys of a group (migration 0012).
--
-- Start-time fair queueing on the claim index itself. A fair group's ready first-attempt
-- deliveries get a *virtual* `visible_at`, a stamp below `_fair_ceiling()` (year 1900): they are
-- due at once, and the claim, which walks `delivery_state_claim (group_id, visible_at)` in order,
-- serves them in stamp order with the same O(batch) statement as any group. At publish, a key's
-- messages are stamped one `_fair_step(weight)` apart from the key's finish line `vt`, never
-- below the group's virtual time V (`_fair_now`): while several keys have work, each gets
-- claims in proportion to its weight, and a key's backlog only pushes its own stamps further
-- out. A key that was idle starts at V (no credit for idleness), so the spare capacity always
-- goes to whoever has work (work-conserving: stamps are never waited for).
--
-- Deliveries that come due at a real time (delayed publish, retry, expired lease, release,
-- rate-limit put-off, pause) are moved into the virtual queue by the claim
-- (`_fair_restamp`): just before V, so they never starve behind a long virtual backlog.
--
-- Unfair groups never come here: their claims and the publishes of streams without fair
-- groups run the statements they ran before.
--
-- `migrate()` re-applies this file (after the versioned migrations, in one transaction with the
-- other function files, under the namespace's migration lock) whenever its text changes; the
-- checksum of what was applied is kept in `@ns@._pgtide_sql`. Every statement here must be
-- re-runnable: CREATE OR REPLACE. Tables, indexes and data changes belong in `migrations/`.

-- Every `visible_at` below this is a virtual stamp of a fair group (and due at once).
CREATE OR REPLACE FUNCTION @ns@._fair_ceiling() RETURNS timestamptz
LANGUAGE sql IMMUTABLE AS $$ SELECT timestamptz '1900-01-01 00:00:00+00' $$;

-- Where a fair group's virtual clock starts: about 5 900 years of virtual time below the
-- ceiling, at 10 ms per message of weight 1 (`_fair_step`), 1.8·10^13 messages of headroom.
CREATE OR REPLACE FUNCTION @ns@._fair_base() RETURNS timestamptz
LANGUAGE sql IMMUTABLE AS $$ SELECT timestamptz '4000-01-01 00:00:00+00 BC' $$;

-- The virtual time a message of a key with weight `w` (NULL: 1) takes: 10 ms / w, to the
-- microsecond (so weights up to 1 000 keep three significant digits).
CREATE OR REPLACE FUNCTION @ns@._fair_step(w double precision) RETURNS interval
LANGUAGE sql IMMUTABLE AS $$
    SELECT greatest(1, round(10000 / coalesce(w, 1)))::bigint * interval '1 microsecond'
$$;

-- The weight rule (the Rust API's `validate_weight`): finite, between 0.01 and 1000.
CREATE OR REPLACE FUNCTION @ns@._check_weight(weight double precision) RETURNS double precision
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    -- NaN compares above every number in PostgreSQL, so the upper bound also refuses it.
    PERFORM @ns@._check(weight IS NULL OR (weight >= 0.01 AND weight <= 1000),
        format('a key''s weight must be between 0.01 and 1000, not %s', weight),
        'pass a finite number such as 1 (the default), 3 or 0.5; NULL for the default');
    RETURN weight;
END $$;

-- The group's virtual time V: the lowest virtual stamp still queued (one probe of the claim
-- index) or, when nothing virtual is queued, the highest finish line of its keys (so an idle
-- key earns no credit and a drained group starts everyone level).
CREATE OR REPLACE FUNCTION @ns@._fair_now(p_group integer) RETURNS timestamptz
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_sort = off SET jit = off
AS $$
DECLARE
    v timestamptz;
BEGIN
    SELECT d.visible_at INTO v FROM @ns@.delivery_state d
    WHERE d.group_id = p_group AND d.visible_at < @ns@._fair_ceiling()
    ORDER BY d.visible_at LIMIT 1;
    IF v IS NULL THEN
        SELECT f.vt INTO v FROM @ns@.fair_keys f
        WHERE f.group_id = p_group AND f.vt > '-infinity'
        ORDER BY f.vt DESC LIMIT 1;
    END IF;
    RETURN coalesce(v, @ns@._fair_base());
END $$;

-- Queues deliveries of messages in the fair group `p_group`: a message due later than now
-- (`p_visible`, a delay or a deliver_at) keeps its real time; the others are stamped, in array
-- order per key, `_fair_step(weight)` apart from the key's finish line and never below V. The
-- keys' rows are locked to commit, in key order (so two publishers never deadlock on them).
-- A NULL key is the key ''. A message already pending in the group is skipped. Counters are the
-- caller's. Returns how many deliveries it queued.
CREATE OR REPLACE FUNCTION @ns@._enqueue_fair(p_group integer, p_ids uuid[], p_keys text[],
                                              p_visible timestamptz[])
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off SET enable_bitmapscan = off SET jit = off
AS $$
DECLARE
    v_keys text[];
    v      timestamptz;
    n      bigint;
    m      bigint;
BEGIN
    INSERT INTO @ns@.delivery_state (group_id, message_id, visible_at)
    SELECT p_group, u.id, u.visible
    FROM unnest(p_ids, p_visible) AS u (id, visible)
    WHERE u.visible > now()
    ON CONFLICT (group_id, message_id) DO NOTHING;
    GET DIAGNOSTICS n = ROW_COUNT;
    SELECT array_agg(DISTINCT coalesce(u.key, '') ORDER BY coalesce(u.key, ''))
    INTO v_keys
    FROM unnest(p_ids, p_keys, p_visible) AS u (id, key, visible)
    WHERE u.visible <= now() OR u.visible IS NULL;
    IF v_keys IS NULL THEN
        RETURN n;
    END IF;
    -- New keys' rows (locked by their insert), then every key's row locked in key order.
    INSERT INTO @ns@.fair_keys (group_id, key, vt)
    SELECT p_group, k, '-infinity' FROM unnest(v_keys) k ORDER BY k
    ON CONFLICT (group_id, key) DO NOTHING;
    PERFORM 1 FROM @ns@.fair_keys f
    WHERE f.group_id = p_group AND f.key = ANY (v_keys)
    ORDER BY f.key
    FOR UPDATE;
    -- V read under the locks: a publisher of the same key that committed before us has its
    -- messages queued (or claimed) by now.
    v := @ns@._fair_now(p_group);
    WITH u AS (
        SELECT x.id, coalesce(x.key, '') AS key,
               row_number() OVER (PARTITION BY coalesce(x.key, '') ORDER BY x.i) AS rn,
               count(*) OVER (PARTITION BY coalesce(x.key, '')) AS kn
        FROM unnest(p_ids, p_keys, p_visible) WITH ORDINALITY AS x (id, key, visible, i)
        WHERE x.visible <= now() OR x.visible IS NULL
    ), k AS (
        SELECT DISTINCT u.key, u.kn FROM u
    ), line AS (
        -- The key's new finish line: its first message at max(vt + step, V), the rest a step apart.
        UPDATE @ns@.fair_keys f
        SET vt = greatest(f.vt + @ns@._fair_step(f.weight), v) + (k.kn - 1) * @ns@._fair_step(f.weight)
        FROM k
        WHERE f.group_id = p_group AND f.key = k.key
        RETURNING f.key, f.vt, @ns@._fair_step(f.weight) AS step
    ), queued AS (
        INSERT INTO @ns@.delivery_state (group_id, message_id, visible_at)
        SELECT p_group, u.id, l.vt - (u.kn - u.rn) * l.step
        FROM u JOIN line l ON l.key = u.key
        ORDER BY 3
        ON CONFLICT (group_id, message_id) DO NOTHING
        RETURNING 1
    )
    SELECT count(*) INTO m FROM queued;
    RETURN n + m;
END $$;

-- Moves up to `p_limit` deliveries of the fair group `p_group` that came due at a real time
-- (a delayed publish, a retry, an expired lease, a release, a put-off or a pause) into the
-- virtual queue, just before V and in their due order, so that the claim that follows serves
-- them first instead of after the whole virtual backlog. Rows another claim holds are skipped.
-- O(what is due): leased and delayed rows lie past now() in the claim index.
CREATE OR REPLACE FUNCTION @ns@._fair_restamp(p_group integer, p_limit integer) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET enable_sort = off SET enable_bitmapscan = off SET enable_seqscan = off
SET enable_hashjoin = off SET enable_mergejoin = off SET jit = off
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_ids uuid[];
    v     timestamptz;
    n     integer;
BEGIN
    SELECT array_agg(x.message_id ORDER BY x.visible_at) INTO v_ids
    FROM (SELECT d.message_id, d.visible_at FROM @ns@.delivery_state d
          WHERE d.group_id = p_group AND d.visible_at >= @ns@._fair_ceiling() AND d.visible_at <= now()
          ORDER BY d.visible_at
          LIMIT p_limit
          FOR UPDATE SKIP LOCKED) x;
    n := coalesce(cardinality(v_ids), 0);
    IF n = 0 THEN
        RETURN 0;
    END IF;
    v := @ns@._fair_now(p_group);
    UPDATE @ns@.delivery_state d
    SET visible_at = v - (n - u.i + 1) * interval '1 microsecond'
    FROM (SELECT p_group AS gid, v.* FROM unnest(v_ids) WITH ORDINALITY AS v (id, i) OFFSET 0) AS u
    WHERE d.group_id = u.gid AND d.message_id = u.id;
    RETURN n;
END $$;

-- Sets (or, with NULL, resets to 1) the weight of `key` in the fair group `group` of `stream`.
-- `key` NULL is the key of messages without one. A new weight applies to the key's messages
-- published after it. Returns false when the group does not exist; PT001 when it is not fair.
CREATE OR REPLACE FUNCTION @ns@.set_key_weight(stream text, "group" text, key text,
                                               weight double precision)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    gid    integer;
    v_fair boolean;
BEGIN
    PERFORM @ns@._check_name('stream', stream);
    PERFORM @ns@._check_name('group', "group");
    PERFORM @ns@._check_key(key);
    PERFORM @ns@._check_weight(weight);
    SELECT g.id, g.fair INTO gid, v_fair FROM @ns@.groups g JOIN @ns@.streams s ON s.id = g.stream_id
    WHERE s.name = stream AND g.name = "group";
    IF gid IS NULL THEN
        RETURN false;
    END IF;
    PERFORM @ns@._check(v_fair,
        format('group %s on stream %s is not fair', quote_literal("group"), quote_literal(stream)),
        'weights apply to fair groups: create the group with fair => true');
    INSERT INTO @ns@.fair_keys AS f (group_id, key, vt, weight)
    VALUES (gid, coalesce(key, ''), '-infinity', weight)
    -- By constraint name: the column `key` would clash with the argument of that name.
    ON CONFLICT ON CONSTRAINT fair_keys_pkey DO UPDATE SET weight = excluded.weight;
    RETURN true;
END $$;

-- The keys of fair groups with a weight of their own (the default is 1), with their finish
-- lines. `key` '' stands for messages without a key.
CREATE OR REPLACE VIEW @ns@.key_weights AS
SELECT s.name AS stream, g.name AS "group", f.key, f.weight
FROM @ns@.fair_keys f
JOIN @ns@.groups g ON g.id = f.group_id
JOIN @ns@.streams s ON s.id = g.stream_id
WHERE f.weight IS NOT NULL;

-- Deletes the rows of keys with the default weight whose finish line lies a step or more behind
-- their group's V (such a key's next message is stamped at V with or without its row), at most
-- `p_limit` per call. Run by `maintain()`.
CREATE OR REPLACE FUNCTION @ns@._trim_fair_keys(p_limit integer DEFAULT 10000) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    gid   integer;
    total integer := 0;
    n     integer;
    v     timestamptz;
BEGIN
    FOR gid IN SELECT g.id FROM @ns@.groups g WHERE g.fair ORDER BY g.id LOOP
        EXIT WHEN total >= p_limit;
        v := @ns@._fair_now(gid) - @ns@._fair_step(NULL);
        DELETE FROM @ns@.fair_keys f
        WHERE (f.group_id, f.key) IN (
            SELECT x.group_id, x.key FROM @ns@.fair_keys x
            WHERE x.group_id = gid AND x.weight IS NULL
              AND x.vt <= v
            ORDER BY x.vt
            LIMIT p_limit - total
            FOR UPDATE SKIP LOCKED);
        GET DIAGNOSTICS n = ROW_COUNT;
        total := total + n;
    END LOOP;
    RETURN total;
END $$;
