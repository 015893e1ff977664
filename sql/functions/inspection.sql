-- pgtide inspection: stats and the views psql users read.
--
-- `migrate()` re-applies this file (after the versioned migrations, in one transaction with the
-- other function files, under the namespace's migration lock) whenever its text changes; the
-- checksum of what was applied is kept in `@ns@._pgtide_sql`. Every statement here must be
-- re-runnable: CREATE OR REPLACE. It cannot change a function's result type or argument names, or
-- drop or retype a view's columns: such a change needs a `DROP ... IF EXISTS` just before it in
-- this file (and dependants recreated in the same file). Tables, indexes and data changes belong
-- in `migrations/`, never here.

-- Counts of one group (by id): folded counters plus the (small) unfolded deltas, and the
-- non-ready part of the claim index (leased and delayed rows); the ready backlog is never counted.
-- Reads only the group's rows and folds nothing. The one counting rule of `stats()` and
-- `group_stats()`. A NULL group (a stream without groups in `stats()`) counts as empty.
CREATE OR REPLACE FUNCTION @ns@._group_stats(p_group integer)
RETURNS TABLE (ready bigint, delayed bigint, in_flight bigint, dead bigint, oldest_ready_age interval)
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp STABLE SET jit = off
-- Index range scans only: with an ordered group's key lines (past year 5000) most of the group's
-- rows lie after now(), and the planner would otherwise scan the table for the in-flight count.
SET enable_seqscan = off SET enable_bitmapscan = off
AS $$
    SELECT greatest(coalesce(c.pending, 0) + coalesce(x.pending, 0) - f.in_flight - f.delayed, 0)::bigint,
           f.delayed, f.in_flight,
           (coalesce(c.dead, 0) + coalesce(x.dead, 0))::bigint,
           o.age
    FROM (SELECT p_group AS id) g
    LEFT JOIN @ns@.group_counters c ON c.group_id = g.id
    LEFT JOIN LATERAL (
        SELECT sum(cd.pending) AS pending, sum(cd.dead) AS dead
        FROM @ns@.counter_deltas cd WHERE cd.group_id = g.id
    ) x ON true
    LEFT JOIN LATERAL (
        SELECT count(*) FILTER (WHERE d.consumer IS NOT NULL) AS in_flight,
               count(*) FILTER (WHERE d.consumer IS NULL) AS delayed
        -- Deliveries waiting in an ordered group's key lines (past `_parked_bound()`) are not
        -- walked: they count as ready.
        FROM @ns@.delivery_state d
        WHERE d.group_id = g.id AND d.visible_at > now() AND d.visible_at < @ns@._parked_bound()
    ) f ON true
    LEFT JOIN LATERAL (
        SELECT greatest(now() - @ns@.uuid_time(d.message_id), interval '0') AS age
        FROM @ns@.delivery_state d WHERE d.group_id = g.id AND d.visible_at <= now()
        ORDER BY d.visible_at LIMIT 1
    ) o ON true
$$;

-- Per (stream, group) of the namespace; folds the counter deltas first (cheap, skipped when
-- another session is folding).
CREATE OR REPLACE FUNCTION @ns@.stats()
RETURNS TABLE (stream text, "group" text, ready bigint, delayed bigint, in_flight bigint,
               dead bigint, oldest_ready_age interval)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off AS $$
#variable_conflict use_column
BEGIN
    PERFORM @ns@.fold_counters();
    RETURN QUERY
    SELECT s.name, g.name, st.ready, st.delayed, st.in_flight, st.dead, st.oldest_ready_age
    FROM @ns@.streams s
    LEFT JOIN @ns@.groups g ON g.stream_id = s.id
    CROSS JOIN LATERAL @ns@._group_stats(g.id) st
    ORDER BY s.name, g.name;
END $$;

-- One group, by name: PT001 for a bad name, PT002 for a missing stream, PT003 for a missing
-- group. Reads only that group's rows (no fold, no namespace-wide scan).
CREATE OR REPLACE FUNCTION @ns@.group_stats(stream text, "group" text)
RETURNS TABLE (ready bigint, delayed bigint, in_flight bigint, dead bigint, oldest_ready_age interval)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp STABLE SET jit = off AS $$
DECLARE
    gid integer;
BEGIN
    PERFORM @ns@._check_name('stream', stream);
    PERFORM @ns@._check_name('group', "group");
    gid := @ns@.group_id(stream, "group");
    RETURN QUERY
    SELECT st.ready, st.delayed, st.in_flight, st.dead, st.oldest_ready_age
    FROM @ns@._group_stats(gid) st;
END $$;

CREATE OR REPLACE VIEW @ns@.stream_stats AS SELECT * FROM @ns@.stats();

-- `state` 'waiting': behind its key's head in an ordered group (`visible_at` then is its own
-- due time, without the line's offset). `key`: its ordering key in an ordered group.
CREATE OR REPLACE VIEW @ns@.deliveries AS
SELECT s.name AS stream, g.name AS "group", d.message_id, d.consumer, d.attempts AS attempt,
       CASE WHEN d.visible_at >= @ns@._parked_bound() THEN 'waiting'
            WHEN d.visible_at <= now() THEN 'ready'
            WHEN d.consumer IS NOT NULL THEN 'in_flight'
            ELSE 'delayed' END AS state,
       CASE WHEN d.visible_at >= @ns@._parked_bound() THEN d.visible_at - @ns@._parked_offset()
            ELSE d.visible_at END AS visible_at,
       CASE WHEN d.consumer IS NOT NULL AND d.visible_at > now() THEN d.visible_at END AS lease_expires_at,
       d.last_error,
       @ns@.uuid_time(d.message_id) AS published_at,
       d.key
FROM @ns@.delivery_state d
JOIN @ns@.groups g ON g.id = d.group_id
JOIN @ns@.streams s ON s.id = g.stream_id;

CREATE OR REPLACE VIEW @ns@.dead_letters AS
SELECT s.name AS stream, g.name AS "group", d.message_id, d.attempts, d.reason, d.error, d.dead_at,
       CASE WHEN m.is_json THEN convert_from(m.payload, 'UTF8')::jsonb END AS payload,
       m.payload AS payload_bytes, m.headers,
       @ns@.uuid_time(d.message_id) AS published_at
FROM @ns@.dead_letter_state d
JOIN @ns@.groups g ON g.id = d.group_id
JOIN @ns@.streams s ON s.id = g.stream_id
LEFT JOIN @ns@.messages m ON m.stream_id = s.id AND m.id = d.message_id;

CREATE OR REPLACE VIEW @ns@.messages_view AS
SELECT s.name AS stream, m.id, @ns@.uuid_time(m.id) AS published_at,
       CASE WHEN m.is_json THEN convert_from(m.payload, 'UTF8')::jsonb END AS payload,
       m.payload AS payload_bytes, m.headers, m.dedupe_key, m.key
FROM @ns@.messages m JOIN @ns@.streams s ON s.id = m.stream_id;

CREATE OR REPLACE VIEW @ns@.scout AS
SELECT holder, term, acquired_at AS since, renewed_at, expires_at,
       holder IS NOT NULL AND expires_at > now() AS active
FROM @ns@.scout_lease;

-- Ordering keys of ordered groups (issue 12): per (stream, group, key) the pending deliveries,
-- how many wait behind the head, the head's state (ready, delayed — a retry or a handler's
-- PauseKey — or in_flight), when a delayed head resumes, who holds an in-flight head, and the
-- age of the key's oldest pending message. Walks the keyed rows of the groups it reads:
-- filter by stream and group for large backlogs (e.g. top keys:
-- `SELECT * FROM pgtide.keys WHERE "group" = 'shipping' ORDER BY pending DESC LIMIT 10`).
CREATE OR REPLACE VIEW @ns@.keys AS
SELECT s.name AS stream, g.name AS "group", d.key,
       count(*) AS pending,
       count(*) FILTER (WHERE d.visible_at >= @ns@._parked_bound()) AS waiting,
       min(CASE WHEN d.visible_at >= @ns@._parked_bound() THEN NULL
                WHEN d.visible_at <= now() THEN 'ready'
                WHEN d.consumer IS NOT NULL THEN 'in_flight'
                ELSE 'delayed' END) AS head_state,
       min(d.visible_at) FILTER (WHERE d.visible_at > now() AND d.visible_at < @ns@._parked_bound()
                                   AND d.consumer IS NULL) AS resumes_at,
       min(d.consumer) FILTER (WHERE d.visible_at > now() AND d.visible_at < @ns@._parked_bound())
           AS consumer,
       greatest(now() - min(@ns@.uuid_time(d.message_id)), interval '0') AS oldest_age
FROM @ns@.delivery_state d
JOIN @ns@.groups g ON g.id = d.group_id
JOIN @ns@.streams s ON s.id = g.stream_id
WHERE d.key IS NOT NULL
GROUP BY s.name, g.name, d.key;
