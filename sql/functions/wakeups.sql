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

CREATE OR REPLACE FUNCTION @ns@._notify_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    due timestamptz;
BEGIN
    PERFORM pg_notify('pgtide.' || @ns_lit@, s.name)
    FROM @ns@.streams s
    WHERE s.id IN (SELECT g.stream_id FROM @ns@.groups g
                   WHERE g.id IN (SELECT n.group_id FROM new_rows n WHERE n.visible_at <= now()));
    SELECT min(n.visible_at) INTO due FROM new_rows n WHERE n.visible_at > now();
    IF due IS NOT NULL THEN
        PERFORM pg_notify('pgtide.' || @ns_lit@, '@' || floor(extract(epoch FROM due) * 1000)::bigint);
    END IF;
    RETURN NULL;
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
-- the owner.
CREATE OR REPLACE FUNCTION @ns@._scout_maintain(p_holder text, p_term bigint)
RETURNS TABLE (partitions_created integer, partitions_dropped integer, dedupe_removed integer)
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT m.partitions_created, m.partitions_dropped, m.dedupe_removed FROM @ns@.maintain() m
    WHERE EXISTS (SELECT 1 FROM @ns@.scout_lease l
                  WHERE l.holder = p_holder AND l.term = p_term AND l.expires_at > now())
$$;
