-- pgtide delivery functions: publish, claim, settle, dead letters and the SQL inspection surface.
-- Internal functions start with `_` and take ids; the public ones take stream/group names and are
-- what psql users and other languages call. The Rust engine calls the internal ones, so there is
-- one implementation of each rule.

---------------------------------------------------------------------------------------------------
-- publish

-- Publishes one message (any options, including a dedupe key). Returns the id that holds the
-- message and whether this call was a duplicate of an earlier publish inside the dedupe window.
CREATE FUNCTION @ns@._publish(
    p_stream     text,
    p_id         uuid,
    p_payload    bytea,
    p_is_json    boolean,
    p_headers    jsonb,
    p_visible_at timestamptz,
    p_dedupe_key text,
    p_priority   integer DEFAULT 0
) RETURNS TABLE (message_id uuid, duplicate boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    s        record;
    existing uuid;
BEGIN
    SELECT id, max_payload, dedupe_window INTO s FROM @ns@.streams WHERE name = p_stream;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgtide: stream % does not exist', quote_literal(p_stream)
            USING ERRCODE = 'PT002', HINT = 'create it with create_stream()';
    END IF;
    IF octet_length(p_payload) > s.max_payload THEN
        RAISE EXCEPTION 'pgtide: payload of % bytes exceeds the limit of % bytes of stream %',
            octet_length(p_payload), s.max_payload, quote_literal(p_stream)
            USING ERRCODE = 'PT004';
    END IF;
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
    INSERT INTO @ns@.messages (stream_id, id, payload, is_json, headers, dedupe_key)
    VALUES (s.id, p_id, p_payload, p_is_json, p_headers, p_dedupe_key);
    INSERT INTO @ns@.delivery_state (group_id, message_id, visible_at)
    SELECT g.id, p_id, coalesce(p_visible_at, now() - make_interval(secs => greatest(p_priority, 0)))
    FROM @ns@.groups g WHERE g.stream_id = s.id;
    INSERT INTO @ns@.counter_deltas (group_id, pending)
    SELECT g.id, 1 FROM @ns@.groups g WHERE g.stream_id = s.id;
    message_id := p_id;
    duplicate := false;
    RETURN NEXT;
END $$;

CREATE FUNCTION @ns@.publish(
    stream     text,
    payload    jsonb,
    headers    jsonb DEFAULT NULL,
    delay      interval DEFAULT NULL,
    dedupe_key text DEFAULT NULL,
    priority   integer DEFAULT 0
) RETURNS uuid
LANGUAGE sql AS $$
    SELECT message_id FROM @ns@._publish(
        stream, @ns@.uuid_v7(), convert_to(payload::text, 'UTF8'), true, headers,
        CASE WHEN delay IS NOT NULL THEN now() + delay END, dedupe_key, priority)
$$;

CREATE FUNCTION @ns@.publish_bytes(
    stream     text,
    payload    bytea,
    headers    jsonb DEFAULT NULL,
    delay      interval DEFAULT NULL,
    dedupe_key text DEFAULT NULL,
    priority   integer DEFAULT 0
) RETURNS uuid
LANGUAGE sql AS $$
    SELECT message_id FROM @ns@._publish(
        stream, @ns@.uuid_v7(), payload, false, headers,
        CASE WHEN delay IS NOT NULL THEN now() + delay END, dedupe_key, priority)
$$;

---------------------------------------------------------------------------------------------------
-- claim

CREATE FUNCTION @ns@._claim(p_group integer, p_limit integer, p_consumer text, p_lease interval DEFAULT NULL)
RETURNS TABLE (id uuid, attempt integer, lease_expires_at timestamptz, payload bytea, is_json boolean, headers jsonb,
               lease_expired boolean)
LANGUAGE plpgsql
-- Pin the plan to an ordered scan of the claim index that stops at LIMIT, whatever the
-- statistics say (fresh queue tables have none, and a bitmap scan plus sort of the whole
-- backlog would make claims O(backlog)).
SET enable_sort = off SET enable_bitmapscan = off SET enable_seqscan = off
AS $$
#variable_conflict use_column
DECLARE
    sid     integer;
    v_lease interval;
    v_max   integer;
BEGIN
    SELECT s.id, coalesce(p_lease, s.lease), s.max_deliver INTO sid, v_lease, v_max
    FROM @ns@.groups g JOIN @ns@.streams s ON s.id = g.stream_id WHERE g.id = p_group;
    IF sid IS NULL THEN
        RAISE EXCEPTION 'pgtide: group id % does not exist', p_group USING ERRCODE = 'PT003';
    END IF;
    RETURN QUERY
    WITH picked AS MATERIALIZED (
        SELECT d.message_id, d.attempts, d.consumer FROM @ns@.delivery_state d
        WHERE d.group_id = p_group AND d.visible_at <= now()
        ORDER BY d.visible_at
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    ), exhausted AS (
        -- the lease of the last allowed attempt expired: dead-letter instead of delivering again
        DELETE FROM @ns@.delivery_state d USING picked p
        WHERE d.group_id = p_group AND d.message_id = p.message_id AND p.attempts >= v_max
        RETURNING d.message_id, d.attempts, d.last_error
    ), dead AS (
        INSERT INTO @ns@.dead_letter_state (group_id, message_id, attempts, reason, error)
        SELECT p_group, e.message_id, e.attempts, 'max_deliver',
               coalesce(e.last_error, 'lease expired on attempt ' || e.attempts)
        FROM exhausted e
        RETURNING 1
    ), counted AS (
        INSERT INTO @ns@.counter_deltas (group_id, pending, dead)
        SELECT p_group, -count(*), count(*) FROM dead HAVING count(*) > 0
    ), claimed AS (
        UPDATE @ns@.delivery_state d
        SET attempts = d.attempts + 1, visible_at = now() + v_lease, consumer = p_consumer
        FROM picked p
        WHERE d.group_id = p_group AND d.message_id = p.message_id AND p.attempts < v_max
        -- a claimed row that still names a consumer was never settled: its lease expired
        RETURNING d.message_id, d.attempts, d.visible_at, p.consumer IS NOT NULL AS expired
    )
    -- LATERAL ... LIMIT 1: one primary-key lookup per claimed row, never a join strategy that
    -- walks the stream's messages.
    SELECT c.message_id, c.attempts, c.visible_at, m.payload, m.is_json, m.headers, c.expired
    FROM claimed c
    CROSS JOIN LATERAL (
        SELECT mm.payload, mm.is_json, mm.headers FROM @ns@.messages mm
        WHERE mm.stream_id = sid AND mm.id = c.message_id LIMIT 1
    ) m;
END $$;

---------------------------------------------------------------------------------------------------
-- settle. Every settle is fenced: the delivery must still be leased (consumer set) and, when the
-- caller passes attempt numbers, still be the attempt it claimed. A consumer whose lease lapsed
-- and whose delivery was claimed again changes nothing. Each returns the ids it settled.

CREATE FUNCTION @ns@._ack(p_group integer, p_ids uuid[], p_attempts integer[] DEFAULT NULL)
RETURNS SETOF uuid
LANGUAGE sql
-- Settles look deliveries up by primary key, never by scanning or hashing the table.
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
    WITH done AS (
        DELETE FROM @ns@.delivery_state d USING unnest(p_ids, p_attempts) AS u(id, attempt)
        WHERE d.group_id = p_group AND d.message_id = u.id AND d.consumer IS NOT NULL
          AND (u.attempt IS NULL OR d.attempts = u.attempt)
        RETURNING d.message_id
    ), counted AS (
        INSERT INTO @ns@.counter_deltas (group_id, pending)
        SELECT p_group, -count(*) FROM done HAVING count(*) > 0
    )
    SELECT message_id FROM done
$$;

-- Retry later: after the given delay, or the stream's backoff for the attempt. A delivery on its
-- last allowed attempt goes to the dead letters instead (`dead` = true).
CREATE FUNCTION @ns@._nack(p_group integer, p_ids uuid[], p_attempts integer[] DEFAULT NULL,
                           p_delays interval[] DEFAULT NULL, p_errors text[] DEFAULT NULL)
RETURNS TABLE (id uuid, dead boolean)
LANGUAGE plpgsql
-- Settles look deliveries up by primary key, never by scanning or hashing the table.
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
#variable_conflict use_column
DECLARE
    v_max     integer;
    v_backoff interval[];
    v_jitter  real;
BEGIN
    SELECT s.max_deliver, s.backoff, s.backoff_jitter INTO v_max, v_backoff, v_jitter
    FROM @ns@.groups g JOIN @ns@.streams s ON s.id = g.stream_id WHERE g.id = p_group;
    RETURN QUERY
    WITH t AS MATERIALIZED (
        SELECT d.message_id, d.attempts, u.delay, u.error
        FROM @ns@.delivery_state d
        JOIN unnest(p_ids, p_attempts, p_delays, p_errors) AS u(id, attempt, delay, error)
          ON d.message_id = u.id
        WHERE d.group_id = p_group AND d.consumer IS NOT NULL
          AND (u.attempt IS NULL OR d.attempts = u.attempt)
        FOR UPDATE OF d
    ), retry AS (
        UPDATE @ns@.delivery_state d
        SET consumer = NULL, last_error = t.error,
            visible_at = now() + coalesce(
                t.delay,
                v_backoff[least(t.attempts, cardinality(v_backoff))] * (1 + v_jitter * (random() * 2 - 1)))
        FROM t
        WHERE d.group_id = p_group AND d.message_id = t.message_id AND t.attempts < v_max
        RETURNING d.message_id
    ), exhausted AS (
        DELETE FROM @ns@.delivery_state d USING t
        WHERE d.group_id = p_group AND d.message_id = t.message_id AND t.attempts >= v_max
        RETURNING d.message_id, d.attempts, t.error
    ), buried AS (
        INSERT INTO @ns@.dead_letter_state (group_id, message_id, attempts, reason, error)
        SELECT p_group, e.message_id, e.attempts, 'max_deliver', e.error FROM exhausted e
        RETURNING 1
    ), counted AS (
        INSERT INTO @ns@.counter_deltas (group_id, pending, dead)
        SELECT p_group, -count(*), count(*) FROM buried HAVING count(*) > 0
    )
    SELECT r.message_id, false FROM retry r
    UNION ALL
    SELECT e.message_id, true FROM exhausted e;
END $$;

-- Dead-letter now, with a reason.
CREATE FUNCTION @ns@._term(p_group integer, p_ids uuid[], p_attempts integer[] DEFAULT NULL,
                           p_reasons text[] DEFAULT NULL)
RETURNS SETOF uuid
LANGUAGE sql
-- Settles look deliveries up by primary key, never by scanning or hashing the table.
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
    WITH gone AS (
        DELETE FROM @ns@.delivery_state d
        USING unnest(p_ids, p_attempts, p_reasons) AS u(id, attempt, reason)
        WHERE d.group_id = p_group AND d.message_id = u.id AND d.consumer IS NOT NULL
          AND (u.attempt IS NULL OR d.attempts = u.attempt)
        RETURNING d.message_id, d.attempts, coalesce(u.reason, 'terminated') AS reason, d.last_error
    ), buried AS (
        INSERT INTO @ns@.dead_letter_state (group_id, message_id, attempts, reason, error)
        SELECT p_group, message_id, attempts, reason, last_error FROM gone
        RETURNING 1
    ), counted AS (
        INSERT INTO @ns@.counter_deltas (group_id, pending, dead)
        SELECT p_group, -count(*), count(*) FROM buried HAVING count(*) > 0
    )
    SELECT message_id FROM gone
$$;

-- Extend the lease (in_progress): visible again only `p_lease` (default: the stream's lease) from now.
CREATE FUNCTION @ns@._extend(p_group integer, p_ids uuid[], p_attempts integer[] DEFAULT NULL,
                             p_lease interval DEFAULT NULL)
RETURNS TABLE (id uuid, lease_expires_at timestamptz)
LANGUAGE sql
-- Settles look deliveries up by primary key, never by scanning or hashing the table.
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
    UPDATE @ns@.delivery_state d
    SET visible_at = now() + coalesce(p_lease, (SELECT s.lease FROM @ns@.groups g
                                                JOIN @ns@.streams s ON s.id = g.stream_id
                                                WHERE g.id = p_group))
    FROM unnest(p_ids, p_attempts) AS u(id, attempt)
    WHERE d.group_id = p_group AND d.message_id = u.id AND d.consumer IS NOT NULL
      AND (u.attempt IS NULL OR d.attempts = u.attempt)
    RETURNING d.message_id, d.visible_at
$$;

-- Hand deliveries back unprocessed (shutdown): visible at once, and the attempt does not count.
CREATE FUNCTION @ns@._release(p_group integer, p_ids uuid[], p_attempts integer[] DEFAULT NULL)
RETURNS SETOF uuid
LANGUAGE sql
-- Settles look deliveries up by primary key, never by scanning or hashing the table.
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
    UPDATE @ns@.delivery_state d
    SET visible_at = now(), consumer = NULL, attempts = greatest(d.attempts - 1, 0)
    FROM unnest(p_ids, p_attempts) AS u(id, attempt)
    WHERE d.group_id = p_group AND d.message_id = u.id AND d.consumer IS NOT NULL
      AND (u.attempt IS NULL OR d.attempts = u.attempt)
    RETURNING d.message_id
$$;

-- Dead letters back into the group with a fresh attempt count (all of the group's when p_ids is NULL).
CREATE FUNCTION @ns@._replay_dead(p_group integer, p_ids uuid[] DEFAULT NULL)
RETURNS SETOF uuid
LANGUAGE sql AS $$
    WITH back AS (
        DELETE FROM @ns@.dead_letter_state d
        WHERE d.group_id = p_group AND (p_ids IS NULL OR d.message_id = ANY (p_ids))
        RETURNING d.message_id
    ), queued AS (
        INSERT INTO @ns@.delivery_state (group_id, message_id, visible_at)
        SELECT p_group, message_id, now() FROM back
        ON CONFLICT DO NOTHING
    ), counted AS (
        INSERT INTO @ns@.counter_deltas (group_id, pending, dead)
        SELECT p_group, count(*), -count(*) FROM back HAVING count(*) > 0
    )
    SELECT message_id FROM back
$$;

CREATE FUNCTION @ns@._purge_dead(p_group integer, p_ids uuid[] DEFAULT NULL)
RETURNS bigint
LANGUAGE sql AS $$
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
-- public read / settle by name (psql and other languages)

CREATE FUNCTION @ns@.read(stream text, "group" text, consumer text, n integer DEFAULT 1,
                          lease interval DEFAULT NULL)
RETURNS TABLE (id uuid, payload jsonb, payload_bytes bytea, headers jsonb, attempt integer,
               published_at timestamptz, lease_expires_at timestamptz)
LANGUAGE sql AS $$
    SELECT c.id,
           CASE WHEN c.is_json THEN convert_from(c.payload, 'UTF8')::jsonb END,
           c.payload, c.headers, c.attempt, @ns@.uuid_time(c.id), c.lease_expires_at
    FROM @ns@._claim(@ns@.group_id(stream, "group"), n, consumer, lease) c
$$;

CREATE FUNCTION @ns@.ack(stream text, "group" text, ids uuid[]) RETURNS integer
LANGUAGE sql AS $$ SELECT count(*)::integer FROM @ns@._ack(@ns@.group_id(stream, "group"), ids) $$;

CREATE FUNCTION @ns@.nack(stream text, "group" text, ids uuid[], delay interval DEFAULT NULL,
                          error text DEFAULT NULL) RETURNS integer
LANGUAGE sql AS $$
    SELECT count(*)::integer FROM @ns@._nack(
        @ns@.group_id(stream, "group"), ids, NULL,
        CASE WHEN delay IS NULL THEN NULL ELSE array_fill(delay, ARRAY[cardinality(ids)]) END,
        CASE WHEN error IS NULL THEN NULL ELSE array_fill(error, ARRAY[cardinality(ids)]) END)
$$;

CREATE FUNCTION @ns@.term(stream text, "group" text, ids uuid[], reason text DEFAULT 'terminated')
RETURNS integer
LANGUAGE sql AS $$
    SELECT count(*)::integer FROM @ns@._term(
        @ns@.group_id(stream, "group"), ids, NULL, array_fill(reason, ARRAY[cardinality(ids)]))
$$;

CREATE FUNCTION @ns@.extend(stream text, "group" text, ids uuid[], lease interval DEFAULT NULL)
RETURNS integer
LANGUAGE sql AS $$
    SELECT count(*)::integer FROM @ns@._extend(@ns@.group_id(stream, "group"), ids, NULL, lease)
$$;

CREATE FUNCTION @ns@.replay_dead(stream text, "group" text, ids uuid[] DEFAULT NULL) RETURNS integer
LANGUAGE sql AS $$ SELECT count(*)::integer FROM @ns@._replay_dead(@ns@.group_id(stream, "group"), ids) $$;

CREATE FUNCTION @ns@.purge_dead(stream text, "group" text, ids uuid[] DEFAULT NULL) RETURNS bigint
LANGUAGE sql AS $$ SELECT @ns@._purge_dead(@ns@.group_id(stream, "group"), ids) $$;

---------------------------------------------------------------------------------------------------
-- inspection

-- Per (stream, group): counts come from folded counters plus the (small) unfolded deltas, and the
-- non-ready part of the claim index (leased and delayed rows); the ready backlog is never counted.
CREATE FUNCTION @ns@.stats()
RETURNS TABLE (stream text, "group" text, ready bigint, delayed bigint, in_flight bigint,
               dead bigint, oldest_ready_age interval)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    PERFORM @ns@.fold_counters();
    RETURN QUERY
    SELECT s.name, g.name,
           greatest(coalesce(c.pending, 0) + coalesce(x.pending, 0) - f.in_flight - f.delayed, 0)::bigint,
           f.delayed, f.in_flight,
           (coalesce(c.dead, 0) + coalesce(x.dead, 0))::bigint,
           o.age
    FROM @ns@.streams s
    LEFT JOIN @ns@.groups g ON g.stream_id = s.id
    LEFT JOIN @ns@.group_counters c ON c.group_id = g.id
    LEFT JOIN LATERAL (
        SELECT sum(cd.pending) AS pending, sum(cd.dead) AS dead
        FROM @ns@.counter_deltas cd WHERE cd.group_id = g.id
    ) x ON true
    LEFT JOIN LATERAL (
        SELECT count(*) FILTER (WHERE d.consumer IS NOT NULL) AS in_flight,
               count(*) FILTER (WHERE d.consumer IS NULL) AS delayed
        FROM @ns@.delivery_state d WHERE d.group_id = g.id AND d.visible_at > now()
    ) f ON true
    LEFT JOIN LATERAL (
        SELECT greatest(now() - @ns@.uuid_time(d.message_id), interval '0') AS age
        FROM @ns@.delivery_state d WHERE d.group_id = g.id AND d.visible_at <= now()
        ORDER BY d.visible_at LIMIT 1
    ) o ON true
    ORDER BY s.name, g.name;
END $$;

CREATE VIEW @ns@.stream_stats AS SELECT * FROM @ns@.stats();

CREATE VIEW @ns@.deliveries AS
SELECT s.name AS stream, g.name AS "group", d.message_id, d.consumer, d.attempts AS attempt,
       CASE WHEN d.visible_at <= now() THEN 'ready'
            WHEN d.consumer IS NOT NULL THEN 'in_flight'
            ELSE 'delayed' END AS state,
       d.visible_at,
       CASE WHEN d.consumer IS NOT NULL AND d.visible_at > now() THEN d.visible_at END AS lease_expires_at,
       d.last_error,
       @ns@.uuid_time(d.message_id) AS published_at
FROM @ns@.delivery_state d
JOIN @ns@.groups g ON g.id = d.group_id
JOIN @ns@.streams s ON s.id = g.stream_id;

CREATE VIEW @ns@.dead_letters AS
SELECT s.name AS stream, g.name AS "group", d.message_id, d.attempts, d.reason, d.error, d.dead_at,
       CASE WHEN m.is_json THEN convert_from(m.payload, 'UTF8')::jsonb END AS payload,
       m.payload AS payload_bytes, m.headers,
       @ns@.uuid_time(d.message_id) AS published_at
FROM @ns@.dead_letter_state d
JOIN @ns@.groups g ON g.id = d.group_id
JOIN @ns@.streams s ON s.id = g.stream_id
LEFT JOIN @ns@.messages m ON m.stream_id = s.id AND m.id = d.message_id;

CREATE VIEW @ns@.messages_view AS
SELECT s.name AS stream, m.id, @ns@.uuid_time(m.id) AS published_at,
       CASE WHEN m.is_json THEN convert_from(m.payload, 'UTF8')::jsonb END AS payload,
       m.payload AS payload_bytes, m.headers, m.dedupe_key
FROM @ns@.messages m JOIN @ns@.streams s ON s.id = m.stream_id;
