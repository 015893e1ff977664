-- pgtide publish: the publish rule (visibility, payload limit), `_publish` (dedupe keys),
-- `_publish_batch` (the engine's fast path) and the public publish functions. Every function that
-- writes runs as the namespace owner (SECURITY DEFINER): runtime roles hold no table privileges.
--
-- `migrate()` re-applies this file (after the versioned migrations, in one transaction with the
-- other function files, under the namespace's migration lock) whenever its text changes; the
-- checksum of what was applied is kept in `@ns@._pgtide_sql`. Every statement here must be
-- re-runnable: CREATE OR REPLACE. It cannot change a function's result type or argument names, or
-- drop or retype a view's columns: such a change needs a `DROP ... IF EXISTS` just before it in
-- this file (and dependants recreated in the same file). Tables, indexes and data changes belong
-- in `migrations/`, never here.

---------------------------------------------------------------------------------------------------
-- the publish rule: every publish path (`_publish_batch`, `_publish`, `publish()`,
-- `publish_bytes()`) goes through these two functions, so the rule is written once. Both are
-- plain SQL expressions the planner inlines into the calling statement: no call overhead on the
-- publish hot path.

-- When a new delivery becomes visible: at `p_deliver_at`, else `p_delay` from now, else now
-- minus the priority in seconds (a priority `p > 0` counts as ready `p` seconds earlier, so it
-- overtakes; negative priorities count as 0).
CREATE OR REPLACE FUNCTION @ns@._visible_at(p_deliver_at timestamptz, p_delay interval, p_priority integer)
RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT coalesce(p_deliver_at, now() + p_delay,
                    now() - make_interval(secs => greatest(p_priority, 0)))
$$;

-- Raises PT004 (payload too large); DETAIL carries `size=<bytes> limit=<bytes>` for the engine's
-- typed error. Only called for a payload over the limit.
CREATE OR REPLACE FUNCTION @ns@._payload_too_large(p_stream text, p_size integer, p_limit integer)
RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'pgtide: payload of % bytes exceeds the limit of % bytes of stream %',
        p_size, p_limit, quote_literal(p_stream)
        USING ERRCODE = 'PT004', DETAIL = format('size=%s limit=%s', p_size, p_limit),
              HINT = 'raise the stream''s max_payload or store the body elsewhere';
END $$;

-- True when the payload fits the stream's limit; raises PT004 otherwise (never returns false).
CREATE OR REPLACE FUNCTION @ns@._payload_ok(p_stream text, p_payload bytea, p_limit integer)
RETURNS boolean
LANGUAGE sql AS $$
    SELECT octet_length(p_payload) <= p_limit
           OR @ns@._payload_too_large(p_stream, octet_length(p_payload), p_limit)
$$;

---------------------------------------------------------------------------------------------------
-- publish

-- Publishes one message (any options, including a dedupe key). Returns the id that holds the
-- message and whether this call was a duplicate of an earlier publish inside the dedupe window.
-- `p_visible_at` is the delivery's visibility (`_visible_at` of deliver_at/delay), NULL for now
-- adjusted by `p_priority`.
-- `p_key`: the ordering key (migration 0010); a new argument needs the DROP.
DROP FUNCTION IF EXISTS @ns@._publish(text, uuid, bytea, boolean, jsonb, timestamptz, text, integer);
CREATE OR REPLACE FUNCTION @ns@._publish(
    p_stream     text,
    p_id         uuid,
    p_payload    bytea,
    p_is_json    boolean,
    p_headers    jsonb,
    p_visible_at timestamptz,
    p_dedupe_key text,
    p_priority   integer DEFAULT 0,
    p_key        text DEFAULT NULL
) RETURNS TABLE (message_id uuid, duplicate boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET enable_hashjoin = off SET enable_mergejoin = off SET jit = off
AS $$
#variable_conflict use_column
DECLARE
    s        record;
    existing uuid;
    v_lined  integer[];
BEGIN
    SELECT id, max_payload, dedupe_window INTO s FROM @ns@.streams WHERE name = p_stream;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgtide: stream % does not exist', quote_literal(p_stream)
            USING ERRCODE = 'PT002', HINT = 'create it with create_stream()';
    END IF;
    PERFORM @ns@._payload_ok(p_stream, p_payload, s.max_payload);
    IF p_dedupe_key IS NOT NULL AND s.dedupe_window > '0' THEN
        LOOP
            INSERT INTO @ns@.dedupe AS d (stream_id, key, message_id, expires_at)
            VALUES (s.id, p_dedupe_key, p_id, now() + s.dedupe_window)
            ON CONFLICT (stream_id, key) DO UPDATE
                SET message_id = excluded.message_id, expires_at = excluded.expires_at
                WHERE d.expires_at < now()
            RETURNING d.message_id INTO existing;
            EXIT WHEN FOUND;
            SELECT d.message_id INTO existing FROM @ns@.dedupe d
            WHERE d.stream_id = s.id AND d.key = p_dedupe_key;
            IF FOUND THEN
                message_id := existing;
                duplicate := true;
                RETURN NEXT;
                RETURN;
            END IF;
            -- the entry vanished between the two statements (cleanup): try again
        END LOOP;
    END IF;
    INSERT INTO @ns@.messages (stream_id, id, payload, is_json, headers, dedupe_key, key)
    VALUES (s.id, p_id, p_payload, p_is_json, p_headers, p_dedupe_key, @ns@._check_key(p_key));
    IF p_key IS NOT NULL THEN
        -- The groups with key lines, read once: a per-key limit set or removed meanwhile must
        -- not leave a group out of both inserts (`_enqueue_keyed` rereads it under its lock).
        SELECT array_agg(g.id ORDER BY g.id) INTO v_lined FROM @ns@.groups g
        WHERE g.stream_id = s.id AND (g.ordered OR g.max_in_flight_per_key IS NOT NULL);
    END IF;
    INSERT INTO @ns@.delivery_state (group_id, message_id, visible_at)
    SELECT g.id, p_id, @ns@._visible_at(p_visible_at, NULL, p_priority)
    FROM @ns@.groups g WHERE g.stream_id = s.id AND NOT g.fair
      AND (v_lined IS NULL OR g.id <> ALL (v_lined));
    -- Fair groups stamp it (fair.sql).
    PERFORM @ns@._enqueue_fair(g.id, ARRAY[p_id], ARRAY[p_key],
                               ARRAY[@ns@._visible_at(p_visible_at, NULL, p_priority)])
    FROM @ns@.groups g WHERE g.stream_id = s.id AND g.fair ORDER BY g.id;
    IF v_lined IS NOT NULL THEN
        -- Ordered groups and groups with a per-key limit queue it in its key's line (ordering.sql).
        PERFORM @ns@._enqueue_keyed(x.id, ARRAY[p_id], ARRAY[p_key],
                                    ARRAY[@ns@._visible_at(p_visible_at, NULL, p_priority)])
        FROM unnest(v_lined) WITH ORDINALITY AS x (id, i) ORDER BY x.i;
    END IF;
    INSERT INTO @ns@.counter_deltas (group_id, pending)
    SELECT g.id, 1 FROM @ns@.groups g WHERE g.stream_id = s.id;
    message_id := p_id;
    duplicate := false;
    RETURN NEXT;
END $$;

-- The engine's fast path for publishes without dedupe key (`sql/publish.sql` calls it): the
-- messages, one delivery row per group of the stream and the counter delta, in one statement.
-- Arrays hold one element per message. Returns how many messages were written: 0 when the stream
-- does not exist (the engine then says so). A PL/pgSQL function, so the statement's plan is
-- cached per session like the prepared statement it replaces; the rule functions are inlined
-- into it.
CREATE OR REPLACE FUNCTION @ns@._publish_batch(
    p_stream     text,
    p_ids        uuid[],
    p_payloads   bytea[],
    p_is_json    boolean[],
    p_headers    jsonb[],
    p_deliver_at timestamptz[],
    p_delay_us   bigint[],
    p_priority   integer[]
) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n     bigint;
    v_sid integer;
BEGIN
    -- `streams.fair` (migration 0014, kept by create_group and delete_group): whether the
    -- stream has a fair group, read with the stream's row instead of looking at its groups
    -- (benches/icount: the look cost a single publish 6 %).
    WITH s AS (
        SELECT st.id, st.max_payload, st.fair FROM @ns@.streams st WHERE st.name = p_stream
    ), m AS (
        INSERT INTO @ns@.messages (stream_id, id, payload, is_json, headers)
        SELECT s.id, u.id, u.payload, u.is_json, u.headers
        FROM s, unnest(p_ids, p_payloads, p_is_json, p_headers) AS u (id, payload, is_json, headers)
        WHERE @ns@._payload_ok(p_stream, u.payload, s.max_payload)
        RETURNING 1
    ), d AS (
        -- LATERAL ... OFFSET 0 (here and below): the stream's groups looked up per stream, never
        -- a hash join that builds a table of every group for each publish (benches/icount: 8 %
        -- of a single publish once the namespace had a few more groups than streams).
        INSERT INTO @ns@.delivery_state (group_id, message_id, visible_at)
        SELECT g.id, u.id, @ns@._visible_at(u.deliver_at, u.delay_us * interval '1 microsecond', u.priority)
        FROM s CROSS JOIN LATERAL (SELECT g.id FROM @ns@.groups g WHERE g.stream_id = s.id AND NOT g.fair
                                   OFFSET 0) g,
             unnest(p_ids, p_deliver_at, p_delay_us, p_priority) AS u (id, deliver_at, delay_us, priority)
    ), c AS (
        INSERT INTO @ns@.counter_deltas (group_id, pending)
        SELECT g.id, cardinality(p_ids)
        FROM s CROSS JOIN LATERAL (SELECT g.id FROM @ns@.groups g WHERE g.stream_id = s.id OFFSET 0) g
    )
    SELECT (SELECT count(*) FROM m), (SELECT s.id FROM s WHERE s.fair) INTO n, v_sid;
    IF v_sid IS NOT NULL THEN
        -- Fair groups stamp their deliveries (fair.sql), in group order (the keys' row locks).
        -- A statement of its own: the publishes of streams without fair groups do not set it
        -- up (benches/icount: +16 % instructions for a single publish when it was a CTE above).
        PERFORM @ns@._enqueue_fair(g.id, p_ids, NULL::text[], ARRAY(
                    SELECT @ns@._visible_at(u.deliver_at, u.delay_us * interval '1 microsecond', u.priority)
                    FROM unnest(p_deliver_at, p_delay_us, p_priority) WITH ORDINALITY
                         AS u (deliver_at, delay_us, priority, i)
                    ORDER BY u.i))
        FROM @ns@.groups g WHERE g.stream_id = v_sid AND g.fair
        ORDER BY g.id;
    END IF;
    RETURN n;
END $$;

-- The engine's path for batches in which some message has an ordering key
-- (`sql/publish_keyed.sql`): `_publish_batch` plus the keys. Unordered groups get plain
-- deliveries; each ordered group (or group with a per-key limit) queues keyed messages in their
-- keys' lines (`_enqueue_keyed`,
-- in group id order, so publishers take key locks in one global order). Returns how many
-- messages were written (0: no such stream).
CREATE OR REPLACE FUNCTION @ns@._publish_keyed(
    p_stream     text,
    p_ids        uuid[],
    p_payloads   bytea[],
    p_is_json    boolean[],
    p_headers    jsonb[],
    p_deliver_at timestamptz[],
    p_delay_us   bigint[],
    p_priority   integer[],
    p_keys       text[]
) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET enable_hashjoin = off SET enable_mergejoin = off SET jit = off
AS $$
DECLARE
    sid       integer;
    v_limit   integer;
    v_visible timestamptz[];
    grp       integer;
    v_fair    boolean;
    n         bigint;
    v_lined   integer[];
BEGIN
    SELECT id, max_payload INTO sid, v_limit FROM @ns@.streams WHERE name = p_stream;
    IF sid IS NULL THEN
        RETURN 0;
    END IF;
    PERFORM @ns@._check_keys(p_keys);
    INSERT INTO @ns@.messages (stream_id, id, payload, is_json, headers, key)
    SELECT sid, u.id, u.payload, u.is_json, u.headers, u.key
    FROM unnest(p_ids, p_payloads, p_is_json, p_headers, p_keys) AS u (id, payload, is_json, headers, key)
    WHERE @ns@._payload_ok(p_stream, u.payload, v_limit);
    GET DIAGNOSTICS n = ROW_COUNT;
    SELECT array_agg(@ns@._visible_at(u.deliver_at, u.delay_us * interval '1 microsecond', u.priority) ORDER BY u.i)
    INTO v_visible
    FROM unnest(p_deliver_at, p_delay_us, p_priority) WITH ORDINALITY AS u (deliver_at, delay_us, priority, i);
    -- The groups with key lines, read once: a per-key limit set or removed meanwhile must not
    -- leave a group out of both inserts (`_enqueue_keyed` rereads it under its lock).
    SELECT coalesce(array_agg(g.id ORDER BY g.id), '{}') INTO v_lined FROM @ns@.groups g
    WHERE g.stream_id = sid AND (g.ordered OR g.max_in_flight_per_key IS NOT NULL);
    INSERT INTO @ns@.delivery_state (group_id, message_id, visible_at)
    SELECT g.id, u.id, u.visible
    FROM @ns@.groups g, unnest(p_ids, p_keys, v_visible) AS u (id, key, visible)
    WHERE g.stream_id = sid AND NOT g.fair AND (u.key IS NULL OR g.id <> ALL (v_lined));
    -- Groups with key lines (ordered, or a per-key limit) queue keyed messages in their lines,
    -- fair groups stamp every message (fair.sql); in group id order (the key locks), and a group
    -- is never both.
    FOR grp, v_fair IN SELECT g.id, g.fair FROM @ns@.groups g
                       WHERE g.stream_id = sid AND (g.fair OR g.id = ANY (v_lined)) ORDER BY g.id LOOP
        IF v_fair THEN
            PERFORM @ns@._enqueue_fair(grp, p_ids, p_keys, v_visible);
        ELSE
            PERFORM @ns@._enqueue_keyed(grp, p_ids, p_keys, v_visible);
        END IF;
    END LOOP;
    INSERT INTO @ns@.counter_deltas (group_id, pending)
    SELECT g.id, cardinality(p_ids) FROM @ns@.groups g WHERE g.stream_id = sid;
    RETURN n;
END $$;

-- The checks both public publish functions share (the Rust API's rules): a valid stream name, a
-- payload, headers as a JSON object, a priority. PT001 with a hint; nothing is written.
CREATE OR REPLACE FUNCTION @ns@._check_publish(p_stream text, p_has_payload boolean, p_headers jsonb,
                                               p_priority integer)
RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    PERFORM @ns@._check_name('stream', p_stream);
    PERFORM @ns@._check(p_has_payload, 'payload must not be NULL',
        'publish a JSON null as ''null''::jsonb, or an empty body as ''''::bytea');
    PERFORM @ns@._check(p_headers IS NULL OR jsonb_typeof(p_headers) = 'object',
        format('headers must be a JSON object, not %s', jsonb_typeof(p_headers)),
        'e.g. headers => ''{"trace": "abc"}''');
    PERFORM @ns@._check(p_priority IS NOT NULL, 'priority must not be NULL',
        'leave it out for 0; a priority p > 0 counts as ready p seconds earlier');
END $$;

-- `key` (migration 0010): a new argument needs the DROP.
DROP FUNCTION IF EXISTS @ns@.publish(text, jsonb, jsonb, interval, text, integer);
CREATE OR REPLACE FUNCTION @ns@.publish(
    stream     text,
    payload    jsonb,
    headers    jsonb DEFAULT NULL,
    delay      interval DEFAULT NULL,
    dedupe_key text DEFAULT NULL,
    priority   integer DEFAULT 0,
    key        text DEFAULT NULL
) RETURNS uuid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM @ns@._check_publish(stream, payload IS NOT NULL, headers, priority);
    RETURN (SELECT p.message_id FROM @ns@._publish(
        stream, @ns@.uuid_v7(), convert_to(payload::text, 'UTF8'), true, headers,
        @ns@._visible_at(NULL, @ns@._check_duration('delay', delay, true), priority), dedupe_key, priority,
        @ns@._check_key(key)) p);
END $$;

-- `key` (migration 0010): a new argument needs the DROP.
DROP FUNCTION IF EXISTS @ns@.publish_bytes(text, bytea, jsonb, interval, text, integer);
CREATE OR REPLACE FUNCTION @ns@.publish_bytes(
    stream     text,
    payload    bytea,
    headers    jsonb DEFAULT NULL,
    delay      interval DEFAULT NULL,
    dedupe_key text DEFAULT NULL,
    priority   integer DEFAULT 0,
    key        text DEFAULT NULL
) RETURNS uuid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM @ns@._check_publish(stream, payload IS NOT NULL, headers, priority);
    RETURN (SELECT p.message_id FROM @ns@._publish(
        stream, @ns@.uuid_v7(), payload, false, headers,
        @ns@._visible_at(NULL, @ns@._check_duration('delay', delay, true), priority), dedupe_key, priority,
        @ns@._check_key(key)) p);
END $$;
