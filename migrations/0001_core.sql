-- pgtide core schema. `@ns@` is replaced by the quoted namespace (schema) name and
-- `@ns_lit@` by the same name as a string literal before this file runs.
--
-- Invariants:
--  * messages are written once (payload never copied per group) and removed by dropping partitions;
--  * delivery_state holds one narrow row per (group, pending message): the only rows claims and
--    settles touch; `visible_at <= now()` means claimable;
--  * counter_deltas is append-only on hot paths (no index, no row contention) and folded into
--    group_counters by maintenance, so stats never count the backlog.

CREATE TABLE @ns@.streams (
    id                 integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name               text NOT NULL UNIQUE CHECK (name ~ '^[a-z0-9][a-z0-9._-]{0,63}$'),
    lease              interval NOT NULL DEFAULT '30 seconds' CHECK (lease > '0'),
    max_deliver        integer NOT NULL DEFAULT 5 CHECK (max_deliver >= 1),
    backoff            interval[] NOT NULL DEFAULT '{1s,5s,15s,30s,60s}' CHECK (cardinality(backoff) >= 1),
    backoff_jitter     real NOT NULL DEFAULT 0.1 CHECK (backoff_jitter >= 0 AND backoff_jitter <= 1),
    retention          interval NOT NULL DEFAULT '7 days' CHECK (retention > '0'),
    partition_interval interval NOT NULL DEFAULT '1 day' CHECK (partition_interval >= '1 minute'),
    dedupe_window      interval NOT NULL DEFAULT '1 hour' CHECK (dedupe_window >= '0'),
    max_payload        integer NOT NULL DEFAULT 1048576 CHECK (max_payload > 0),
    created_at         timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE @ns@.groups (
    id         integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream_id  integer NOT NULL REFERENCES @ns@.streams (id) ON DELETE CASCADE,
    name       text NOT NULL CHECK (name ~ '^[a-z0-9][a-z0-9._-]{0,63}$'),
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (stream_id, name)
);

-- Messages: LIST partition per stream, RANGE sub-partitions on the UUID v7 id (time-ordered),
-- so the primary key is the only index and retention is DROP TABLE.
CREATE TABLE @ns@.messages (
    stream_id  integer NOT NULL,
    id         uuid NOT NULL,
    payload    bytea NOT NULL,
    is_json    boolean NOT NULL DEFAULT false,
    headers    jsonb,
    dedupe_key text,
    PRIMARY KEY (stream_id, id)
) PARTITION BY LIST (stream_id);

-- Range partitions that exist, so maintenance never parses catalog bounds.
CREATE TABLE @ns@.partitions (
    stream_id  integer NOT NULL REFERENCES @ns@.streams (id) ON DELETE CASCADE,
    lower      timestamptz NOT NULL,
    upper      timestamptz NOT NULL,
    table_name text NOT NULL,
    PRIMARY KEY (stream_id, lower)
);

CREATE TABLE @ns@.delivery_state (
    group_id   integer NOT NULL,
    message_id uuid NOT NULL,
    visible_at timestamptz NOT NULL,
    attempts   integer NOT NULL DEFAULT 0,
    consumer   text,
    last_error text,
    PRIMARY KEY (group_id, message_id)
);
-- The claim index: equality on group, then the ORDER BY; `visible_at <= now()` bounds the scan so
-- leased and delayed rows (visible_at in the future) are never walked by a claim.
CREATE INDEX delivery_state_claim ON @ns@.delivery_state (group_id, visible_at);

CREATE TABLE @ns@.dead_letter_state (
    group_id   integer NOT NULL,
    message_id uuid NOT NULL,
    attempts   integer NOT NULL,
    reason     text NOT NULL,
    error      text,
    dead_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, message_id)
);

CREATE TABLE @ns@.dedupe (
    stream_id  integer NOT NULL,
    key        text NOT NULL,
    message_id uuid NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (stream_id, key)
);

CREATE TABLE @ns@.counter_deltas (
    group_id integer NOT NULL,
    pending  bigint NOT NULL DEFAULT 0,
    dead     bigint NOT NULL DEFAULT 0
);

CREATE TABLE @ns@.group_counters (
    group_id integer PRIMARY KEY,
    pending  bigint NOT NULL DEFAULT 0,
    dead     bigint NOT NULL DEFAULT 0
);

---------------------------------------------------------------------------------------------------
-- helpers

CREATE FUNCTION @ns@.uuid_v7(ts timestamptz DEFAULT clock_timestamp()) RETURNS uuid
LANGUAGE sql VOLATILE PARALLEL SAFE AS $$
    SELECT encode(
        set_bit(set_bit(
            overlay(uuid_send(gen_random_uuid())
                    PLACING substring(int8send(floor(extract(epoch FROM ts) * 1000)::bigint) FROM 3)
                    FROM 1 FOR 6),
            52, 1), 53, 1),
        'hex')::uuid
$$;

-- Smallest UUID v7 of the millisecond `ts`: partition bounds.
CREATE FUNCTION @ns@.uuid_floor(ts timestamptz) RETURNS uuid
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT (lpad(to_hex(floor(extract(epoch FROM ts) * 1000)::bigint), 12, '0')
            || '00000000000000000000')::uuid
$$;

-- Publish time of a UUID v7 message id.
CREATE FUNCTION @ns@.uuid_time(id uuid) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT to_timestamp(('x' || lpad(substr(replace(id::text, '-', ''), 1, 12), 16, '0'))::bit(64)::bigint / 1000.0)
$$;

CREATE FUNCTION @ns@.valid_name(name text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$ SELECT name ~ '^[a-z0-9][a-z0-9._-]{0,63}$' $$;

CREATE FUNCTION @ns@.stream_id(stream text) RETURNS integer
LANGUAGE plpgsql STABLE AS $$
DECLARE v integer;
BEGIN
    SELECT id INTO v FROM @ns@.streams WHERE name = stream;
    IF v IS NULL THEN
        RAISE EXCEPTION 'pgtide: stream % does not exist', quote_literal(stream)
            USING ERRCODE = 'PT002', HINT = 'create it with create_stream()';
    END IF;
    RETURN v;
END $$;

CREATE FUNCTION @ns@.group_id(stream text, "group" text) RETURNS integer
LANGUAGE plpgsql STABLE AS $$
DECLARE v integer;
BEGIN
    SELECT g.id INTO v FROM @ns@.groups g JOIN @ns@.streams s ON s.id = g.stream_id
    WHERE s.name = stream AND g.name = "group";
    IF v IS NULL THEN
        PERFORM @ns@.stream_id(stream);
        RAISE EXCEPTION 'pgtide: group % does not exist on stream %', quote_literal("group"), quote_literal(stream)
            USING ERRCODE = 'PT003', HINT = 'create it with create_group()';
    END IF;
    RETURN v;
END $$;

---------------------------------------------------------------------------------------------------
-- partitions and maintenance

-- Creates the range partition of `stream` that holds `at`, moving any rows the default partition
-- caught for that range (publishes while maintenance was not running are never lost).
CREATE FUNCTION @ns@.ensure_partition(p_stream_id integer, at timestamptz) RETURNS boolean
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
CREATE FUNCTION @ns@.drop_expired_partitions(p_stream_id integer, at timestamptz DEFAULT now())
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    p       record;
    n       integer := 0;
    keep    interval;
BEGIN
    SELECT retention INTO keep FROM @ns@.streams WHERE id = p_stream_id;
    FOR p IN SELECT * FROM @ns@.partitions
             WHERE stream_id = p_stream_id AND upper <= at - keep ORDER BY lower
    LOOP
        WITH gone AS (
            DELETE FROM @ns@.delivery_state d USING @ns@.groups g
            WHERE g.stream_id = p_stream_id AND d.group_id = g.id
              AND d.message_id >= @ns@.uuid_floor(p.lower) AND d.message_id < @ns@.uuid_floor(p.upper)
            RETURNING d.group_id
        )
        INSERT INTO @ns@.counter_deltas (group_id, pending)
        SELECT group_id, -count(*) FROM gone GROUP BY group_id;
        WITH gone AS (
            DELETE FROM @ns@.dead_letter_state d USING @ns@.groups g
            WHERE g.stream_id = p_stream_id AND d.group_id = g.id
              AND d.message_id >= @ns@.uuid_floor(p.lower) AND d.message_id < @ns@.uuid_floor(p.upper)
            RETURNING d.group_id
        )
        INSERT INTO @ns@.counter_deltas (group_id, dead)
        SELECT group_id, -count(*) FROM gone GROUP BY group_id;
        EXECUTE format('DROP TABLE %I.%I', @ns_lit@, p.table_name);
        DELETE FROM @ns@.partitions WHERE stream_id = p_stream_id AND lower = p.lower;
        n := n + 1;
    END LOOP;
    RETURN n;
END $$;

-- Folds counter deltas into group_counters. Cheap; skips if another session is folding.
CREATE FUNCTION @ns@.fold_counters() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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

-- One maintenance pass: partitions ahead, retention, dedupe window, counters. Returns a summary.
CREATE FUNCTION @ns@.maintain(at timestamptz DEFAULT now())
RETURNS TABLE (partitions_created integer, partitions_dropped integer, dedupe_removed integer)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s record;
    i integer;
BEGIN
    partitions_created := 0;
    partitions_dropped := 0;
    FOR s IN SELECT id, partition_interval FROM @ns@.streams ORDER BY id LOOP
        FOR i IN 0..3 LOOP
            IF @ns@.ensure_partition(s.id, at + s.partition_interval * i) THEN
                partitions_created := partitions_created + 1;
            END IF;
        END LOOP;
        partitions_dropped := partitions_dropped + @ns@.drop_expired_partitions(s.id, at);
    END LOOP;
    DELETE FROM @ns@.dedupe WHERE expires_at < at;
    GET DIAGNOSTICS dedupe_removed = ROW_COUNT;
    PERFORM @ns@.fold_counters();
    RETURN NEXT;
END $$;

---------------------------------------------------------------------------------------------------
-- registry

CREATE FUNCTION @ns@.create_stream(
    stream             text,
    lease              interval DEFAULT '30 seconds',
    max_deliver        integer DEFAULT 5,
    backoff            interval[] DEFAULT '{1s,5s,15s,30s,60s}',
    retention          interval DEFAULT '7 days',
    dedupe_window      interval DEFAULT '1 hour',
    max_payload        integer DEFAULT 1048576,
    partition_interval interval DEFAULT '1 day',
    backoff_jitter     real DEFAULT 0.1,
    if_not_exists      boolean DEFAULT true
) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    sid integer;
BEGIN
    IF stream IS NULL OR NOT @ns@.valid_name(stream) THEN
        RAISE EXCEPTION 'pgtide: stream name % is invalid: use 1-64 of a-z, 0-9, ''.'', ''_'', ''-'', starting with a letter or digit', quote_nullable(stream)
            USING ERRCODE = 'PT001';
    END IF;
    -- Serialise creators of the same name so concurrent ensure calls never collide on DDL.
    PERFORM pg_advisory_xact_lock(hashtext(@ns_lit@ || '.stream.' || stream));
    IF EXISTS (SELECT 1 FROM @ns@.streams WHERE name = stream) THEN
        IF if_not_exists THEN RETURN false; END IF;
        RAISE EXCEPTION 'pgtide: stream % already exists', quote_literal(stream) USING ERRCODE = 'PT005';
    END IF;
    INSERT INTO @ns@.streams (name, lease, max_deliver, backoff, retention, dedupe_window, max_payload,
                              partition_interval, backoff_jitter)
    VALUES (stream, lease, max_deliver, backoff, retention, dedupe_window, max_payload,
            partition_interval, backoff_jitter)
    RETURNING id INTO sid;
    EXECUTE format('CREATE TABLE %I.%I PARTITION OF %I.messages FOR VALUES IN (%s) PARTITION BY RANGE (id)',
                   @ns_lit@, 'messages_s' || sid, @ns_lit@, sid);
    EXECUTE format('CREATE TABLE %I.%I PARTITION OF %I.%I DEFAULT',
                   @ns_lit@, 'messages_s' || sid || '_default', @ns_lit@, 'messages_s' || sid);
    FOR i IN 0..3 LOOP
        PERFORM @ns@.ensure_partition(sid, now() + partition_interval * i);
    END LOOP;
    RETURN true;
END $$;

CREATE FUNCTION @ns@.delete_stream(stream text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    sid integer;
BEGIN
    SELECT id INTO sid FROM @ns@.streams WHERE name = stream FOR UPDATE;
    IF sid IS NULL THEN RETURN false; END IF;
    DELETE FROM @ns@.delivery_state WHERE group_id IN (SELECT id FROM @ns@.groups WHERE stream_id = sid);
    DELETE FROM @ns@.dead_letter_state WHERE group_id IN (SELECT id FROM @ns@.groups WHERE stream_id = sid);
    DELETE FROM @ns@.group_counters WHERE group_id IN (SELECT id FROM @ns@.groups WHERE stream_id = sid);
    DELETE FROM @ns@.counter_deltas WHERE group_id IN (SELECT id FROM @ns@.groups WHERE stream_id = sid);
    DELETE FROM @ns@.dedupe WHERE stream_id = sid;
    EXECUTE format('DROP TABLE %I.%I', @ns_lit@, 'messages_s' || sid);
    DELETE FROM @ns@.streams WHERE id = sid;
    RETURN true;
END $$;

-- `start`: 'new' (messages published from now on) or 'oldest' (every retained message too).
CREATE FUNCTION @ns@.create_group(stream text, "group" text, start text DEFAULT 'new',
                                  if_not_exists boolean DEFAULT true)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    sid integer := @ns@.stream_id(stream);
    gid integer;
    n   bigint;
BEGIN
    IF "group" IS NULL OR NOT @ns@.valid_name("group") THEN
        RAISE EXCEPTION 'pgtide: group name % is invalid: use 1-64 of a-z, 0-9, ''.'', ''_'', ''-'', starting with a letter or digit', quote_nullable("group")
            USING ERRCODE = 'PT001';
    END IF;
    IF start NOT IN ('new', 'oldest') THEN
        RAISE EXCEPTION 'pgtide: group start % is invalid: use ''new'' or ''oldest''', quote_nullable(start)
            USING ERRCODE = 'PT001';
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext(@ns_lit@ || '.group.' || sid || '.' || "group"));
    IF EXISTS (SELECT 1 FROM @ns@.groups WHERE stream_id = sid AND name = "group") THEN
        IF if_not_exists THEN RETURN false; END IF;
        RAISE EXCEPTION 'pgtide: group % already exists on stream %', quote_literal("group"), quote_literal(stream)
            USING ERRCODE = 'PT006';
    END IF;
    INSERT INTO @ns@.groups (stream_id, name) VALUES (sid, "group") RETURNING id INTO gid;
    INSERT INTO @ns@.group_counters (group_id) VALUES (gid);
    IF start = 'oldest' THEN
        INSERT INTO @ns@.delivery_state (group_id, message_id, visible_at)
        SELECT gid, m.id, @ns@.uuid_time(m.id) FROM @ns@.messages m WHERE m.stream_id = sid
        ON CONFLICT DO NOTHING;
        GET DIAGNOSTICS n = ROW_COUNT;
        UPDATE @ns@.group_counters SET pending = n WHERE group_id = gid;
    END IF;
    RETURN true;
END $$;

CREATE FUNCTION @ns@.delete_group(stream text, "group" text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    gid integer;
BEGIN
    SELECT g.id INTO gid FROM @ns@.groups g JOIN @ns@.streams s ON s.id = g.stream_id
    WHERE s.name = stream AND g.name = "group" FOR UPDATE OF g;
    IF gid IS NULL THEN RETURN false; END IF;
    DELETE FROM @ns@.delivery_state WHERE group_id = gid;
    DELETE FROM @ns@.dead_letter_state WHERE group_id = gid;
    DELETE FROM @ns@.group_counters WHERE group_id = gid;
    DELETE FROM @ns@.counter_deltas WHERE group_id = gid;
    DELETE FROM @ns@.groups WHERE id = gid;
    RETURN true;
END $$;
