-- Wake-ups: a statement-level INSERT trigger on delivery_state notifies the namespace channel
-- `pgtide.<ns>` once per stream per statement with the stream name as payload. Connections that
-- coalesce notifications themselves (the Rust engine's pool) set `pgtide.notify = off`.
-- Payloads: a stream name (new ready work), `@<epoch ms>` (new earliest due time for the scout),
-- `!scout` (the scout resigned).

CREATE FUNCTION @ns@._notify_inserted() RETURNS trigger
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

CREATE TRIGGER delivery_state_notify
    AFTER INSERT ON @ns@.delivery_state
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT
    WHEN (coalesce(current_setting('pgtide.notify', true), '') <> 'off')
    EXECUTE FUNCTION @ns@._notify_inserted();

-- The scout lease: one row. A holder keeps it by renewing before `expires_at`; `term` grows on
-- every change of holder and fences a deposed scout.
CREATE TABLE @ns@.scout_lease (
    id          boolean PRIMARY KEY DEFAULT true CHECK (id),
    holder      text,
    term        bigint NOT NULL DEFAULT 0,
    acquired_at timestamptz,
    renewed_at  timestamptz,
    expires_at  timestamptz NOT NULL DEFAULT '-infinity'
);
INSERT INTO @ns@.scout_lease DEFAULT VALUES;

CREATE VIEW @ns@.scout AS
SELECT holder, term, acquired_at AS since, renewed_at, expires_at,
       holder IS NOT NULL AND expires_at > now() AS active
FROM @ns@.scout_lease;

-- Takes the lease if it is free or expired, or renews it for the current holder and term.
-- Returns the term held, or NULL when another holder has it.
CREATE FUNCTION @ns@._scout_acquire(p_holder text, p_term bigint, p_ttl interval) RETURNS bigint
LANGUAGE sql AS $$
    UPDATE @ns@.scout_lease
    SET holder = p_holder,
        term = CASE WHEN holder = p_holder AND term = p_term THEN term ELSE term + 1 END,
        acquired_at = CASE WHEN holder = p_holder AND term = p_term THEN acquired_at ELSE now() END,
        renewed_at = now(),
        expires_at = now() + p_ttl
    WHERE (holder = p_holder AND term = p_term) OR holder IS NULL OR expires_at <= now()
    RETURNING term
$$;

CREATE FUNCTION @ns@._scout_resign(p_holder text, p_term bigint) RETURNS boolean
LANGUAGE plpgsql AS $$
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
CREATE FUNCTION @ns@._scout_due(p_since timestamptz)
RETURNS TABLE (due_streams text[], next_due timestamptz, checked_at timestamptz)
LANGUAGE sql STABLE AS $$
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
