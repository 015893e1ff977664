-- pgtide registry: create, delete and purge streams and groups.
--
-- `migrate()` re-applies this file (after the versioned migrations, in one transaction with the
-- other function files, under the namespace's migration lock) whenever its text changes; the
-- checksum of what was applied is kept in `@ns@._pgtide_sql`. Every statement here must be
-- re-runnable: CREATE OR REPLACE. It cannot change a function's result type or argument names, or
-- drop or retype a view's columns: such a change needs a `DROP ... IF EXISTS` just before it in
-- this file (and dependants recreated in the same file). Tables, indexes and data changes belong
-- in `migrations/`, never here.

CREATE OR REPLACE FUNCTION @ns@.create_stream(
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
    -- The rules of the Rust StreamConfig, checked before the insert so a bad option is PT001 with
    -- a hint, never a table constraint's error. (Durations: `_check_duration`.)
    PERFORM @ns@._check_name('stream', stream);
    PERFORM @ns@._check(max_deliver >= 1, format('max_deliver must be at least 1, not %s', coalesce(max_deliver::text, 'NULL')),
        'max_deliver is how many attempts a message gets before it is dead-lettered');
    PERFORM @ns@._check(max_payload >= 1, format('max_payload must be between 1 and 2147483647 bytes, not %s', coalesce(max_payload::text, 'NULL')),
        'max_payload is the largest payload a publish accepts, in bytes');
    PERFORM @ns@._check(cardinality(backoff) >= 1 AND array_position(backoff, NULL) IS NULL,
        'backoff needs at least one step and no NULL step',
        'e.g. backoff => ''{1s,5s,30s}'': attempt n waits step n, the last step repeats');
    PERFORM @ns@._check(backoff_jitter BETWEEN 0 AND 1, format('backoff_jitter must be between 0 and 1, not %s', coalesce(backoff_jitter::text, 'NULL')),
        'backoff_jitter scales each backoff step by a random factor in 1 +- jitter');
    PERFORM @ns@._check(if_not_exists IS NOT NULL, 'if_not_exists must not be NULL',
        'pass true to accept an existing stream, false to raise PT005');
    PERFORM @ns@._check_duration('lease', lease, false), @ns@._check_duration('retention', retention, false),
            @ns@._check_duration('dedupe_window', dedupe_window, true),
            @ns@._check_duration('partition_interval', partition_interval, false),
            (SELECT count(@ns@._check_duration('backoff step', b, true)) FROM unnest(backoff) b);
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
    -- Only the stream's own table and its default partition here (six relations with their keys
    -- and TOAST tables): every relation created stays locked to commit, and the lock table is
    -- shared by the whole server (max_locks_per_transaction x max_connections entries), so the
    -- time partitions (four more relations each) come from `ensure_partitions`, which the Rust
    -- API and the CLI call in their own transaction right after, and from `maintain()`. Until
    -- then publishes land in the default partition, and `ensure_partition` moves them.
    BEGIN
        EXECUTE format('CREATE TABLE %I.%I PARTITION OF %I.messages FOR VALUES IN (%s) PARTITION BY RANGE (id)',
                       @ns_lit@, 'messages_s' || sid, @ns_lit@, sid);
        EXECUTE format('CREATE TABLE %I.%I PARTITION OF %I.%I DEFAULT',
                       @ns_lit@, 'messages_s' || sid || '_default', @ns_lit@, 'messages_s' || sid);
        -- `_claim`'s message lookup for this stream (delivery.sql).
        PERFORM @ns@._lookup_define(sid);
    EXCEPTION WHEN out_of_memory THEN
        -- "out of shared memory": the lock table is full, nearly always because this transaction
        -- created hundreds of streams. Say so, with what to do, as a pgtide error.
        RAISE EXCEPTION 'pgtide: cannot create stream %: the server''s lock table is full (%)', quote_literal(stream), SQLERRM
            USING ERRCODE = 'PT010',
                  HINT = format('each stream created in a transaction holds locks on %s relations until commit: '
                                'create streams in separate transactions (or batches of at most %s), or raise '
                                'max_locks_per_transaction (now %s)', 6, @ns@.streams_per_transaction(),
                                current_setting('max_locks_per_transaction'));
    END;
    RETURN true;
END $$;

-- How many streams one transaction can safely create: the lock table has
-- max_locks_per_transaction x (max_connections + max_prepared_transactions) entries for the whole
-- server and each stream created holds about 6 to commit (1 167 fitted in one transaction with
-- the defaults, 64 x 100, on an idle server). Other sessions' locks share the table, so this
-- plans with 8 per stream and half the table.
CREATE OR REPLACE FUNCTION @ns@.streams_per_transaction() RETURNS integer
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT (current_setting('max_locks_per_transaction')::int
            * (current_setting('max_connections')::int + current_setting('max_prepared_transactions')::int)
            / 8 / 2)
$$;

-- Creates the time partitions of `stream` for now and the next interval; `maintain()` (every
-- minute in the scout) adds the two after. Returns how many it created. Run it in its own
-- transaction after `create_stream`: its relations then are locked only briefly. Two, not four:
-- each costs about as much as creating the stream, and creation time matters when a deployment
-- provisions hundreds of streams.
CREATE OR REPLACE FUNCTION @ns@.ensure_partitions(stream text) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    sid   integer;
    width interval;
    n     integer := 0;
BEGIN
    PERFORM @ns@._check_name('stream', stream);
    sid := @ns@.stream_id(stream);
    SELECT partition_interval INTO width FROM @ns@.streams WHERE id = sid;
    FOR i IN 0..1 LOOP
        IF @ns@.ensure_partition(sid, now() + width * i) THEN
            n := n + 1;
        END IF;
    END LOOP;
    RETURN n;
END $$;

CREATE OR REPLACE FUNCTION @ns@.delete_stream(stream text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    sid integer;
BEGIN
    PERFORM @ns@._check_name('stream', stream);
    SELECT id INTO sid FROM @ns@.streams WHERE name = stream;
    IF sid IS NULL OR to_regclass(format('%I.%I', @ns_lit@, 'messages_s' || sid)) IS NULL THEN
        RETURN false;
    END IF;
    -- The stream's table before any row (the stream's own included), the order maintenance
    -- (ensure_partition) takes them in; the other order deadlocked with it.
    EXECUTE format('LOCK TABLE %I.%I IN ACCESS EXCLUSIVE MODE', @ns_lit@, 'messages_s' || sid);
    PERFORM 1 FROM @ns@.streams WHERE id = sid FOR UPDATE;
    IF NOT FOUND THEN RETURN false; END IF;
    DELETE FROM @ns@.delivery_state WHERE group_id IN (SELECT id FROM @ns@.groups WHERE stream_id = sid);
    DELETE FROM @ns@.key_heads WHERE group_id IN (SELECT id FROM @ns@.groups WHERE stream_id = sid);
    DELETE FROM @ns@.dead_letter_state WHERE group_id IN (SELECT id FROM @ns@.groups WHERE stream_id = sid);
    DELETE FROM @ns@.group_counters WHERE group_id IN (SELECT id FROM @ns@.groups WHERE stream_id = sid);
    DELETE FROM @ns@.counter_deltas WHERE group_id IN (SELECT id FROM @ns@.groups WHERE stream_id = sid);
    DELETE FROM @ns@.dedupe WHERE stream_id = sid;
    DELETE FROM @ns@.wake_waiters WHERE stream_id = sid;
    EXECUTE format('DROP TABLE %I.%I', @ns_lit@, 'messages_s' || sid);
    PERFORM @ns@._lookup_drop(sid);
    DELETE FROM @ns@.streams WHERE id = sid;
    RETURN true;
END $$;

-- `start`: 'new' (messages published from now on) or 'oldest' (every retained message too).
-- `ordered`: deliver the messages of one key one at a time, in publish order (ordering.sql).
-- Fixed at creation: an existing group with the other setting raises PT001.
-- `max_in_flight`: at most this many deliveries leased at once across every consumer (NULL: no
-- limit); set at creation, changed with `set_max_in_flight`.
-- `max_in_flight_per_key`: at most this many deliveries of one key at once (ordering.sql;
-- NULL: no limit; 1 or NULL in an ordered group); changed with `set_max_in_flight_per_key`.
DROP FUNCTION IF EXISTS @ns@.create_group(text, text, text, boolean);
-- The rate limits joined the arguments in migration 0011: a new signature needs the DROP.
DROP FUNCTION IF EXISTS @ns@.create_group(text, text, text, boolean, boolean, integer);
-- `fair` joined the arguments in migration 0012 and the per-key limit in 0013.
-- `fair`: share the group's deliveries between keys by weight (fair.sql); fixed at creation,
-- and not with `ordered` or a per-key limit.
DROP FUNCTION IF EXISTS @ns@.create_group(text, text, text, boolean, boolean, integer,
                                          double precision, integer, double precision, integer);
CREATE OR REPLACE FUNCTION @ns@.create_group(stream text, "group" text, start text DEFAULT 'new',
                                  if_not_exists boolean DEFAULT true, ordered boolean DEFAULT false,
                                  max_in_flight integer DEFAULT NULL,
                                  rate double precision DEFAULT NULL, burst integer DEFAULT NULL,
                                  key_rate double precision DEFAULT NULL, key_burst integer DEFAULT NULL,
                                  fair boolean DEFAULT false,
                                  max_in_flight_per_key integer DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    sid      integer;
    gid      integer;
    was      boolean;
    was_fair boolean;
    n        bigint;
    lined    boolean := ordered OR max_in_flight_per_key IS NOT NULL;
BEGIN
    PERFORM @ns@._check_name('stream', stream);
    PERFORM @ns@._check_name('group', "group");
    PERFORM @ns@._check(start IN ('new', 'oldest'), format('group start %s is invalid', quote_nullable(start)),
        'use ''new'' (messages published from now on) or ''oldest'' (every retained message)');
    PERFORM @ns@._check(if_not_exists IS NOT NULL, 'if_not_exists must not be NULL',
        'pass true to accept an existing group, false to raise PT006');
    PERFORM @ns@._check(ordered IS NOT NULL, 'ordered must not be NULL',
        'pass true for per-key order, false (the default) for none');
    PERFORM @ns@._check(max_in_flight IS NULL OR max_in_flight > 0,
        format('max_in_flight must be positive, not %s', max_in_flight),
        'leave it out (NULL) for no limit');
    PERFORM @ns@._check_rate('the rate', rate, burst);
    PERFORM @ns@._check_rate('the per-key rate', key_rate, key_burst);
    PERFORM @ns@._check(fair IS NOT NULL, 'fair must not be NULL',
        'pass true to share deliveries between keys by weight, false (the default) for none');
    PERFORM @ns@._check(NOT (fair AND ordered), 'a group cannot be both ordered and fair',
        'an ordered group already serves its keys one at a time each: choose one of the two');
    PERFORM @ns@._check_key_limit(ordered, max_in_flight_per_key);
    PERFORM @ns@._check(NOT (fair AND max_in_flight_per_key IS NOT NULL),
        'a fair group cannot have a per-key limit',
        'fair share and max_in_flight_per_key do not combine: choose one of the two');
    sid := @ns@.stream_id(stream);
    IF fair THEN
        -- `streams.fair` is kept under the stream's row lock (see delete_group); publishers
        -- only take a key-share lock on it.
        PERFORM 1 FROM @ns@.streams s WHERE s.id = sid FOR NO KEY UPDATE;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext(@ns_lit@ || '.group.' || sid || '.' || "group"));
    SELECT g.ordered, g.fair INTO was, was_fair FROM @ns@.groups g WHERE g.stream_id = sid AND g.name = "group";
    IF FOUND THEN
        IF NOT if_not_exists THEN
            RAISE EXCEPTION 'pgtide: group % already exists on stream %', quote_literal("group"), quote_literal(stream)
                USING ERRCODE = 'PT006';
        END IF;
        PERFORM @ns@._check(was = ordered,
            format('group %s on stream %s exists and is %s', quote_literal("group"), quote_literal(stream),
                   CASE WHEN was THEN 'ordered' ELSE 'not ordered' END),
            'ordering is fixed when a group is created: delete the group and create it again to change it');
        PERFORM @ns@._check(was_fair = fair,
            format('group %s on stream %s exists and is %s', quote_literal("group"), quote_literal(stream),
                   CASE WHEN was_fair THEN 'fair' ELSE 'not fair' END),
            'fair share is fixed when a group is created: delete the group and create it again to change it');
        RETURN false;
    END IF;
    INSERT INTO @ns@.groups (stream_id, name, ordered, max_in_flight, rate, burst, key_rate, key_burst, fair,
                             max_in_flight_per_key)
    VALUES (sid, "group", ordered, max_in_flight, rate, coalesce(burst, @ns@._default_burst(rate)),
            key_rate, coalesce(key_burst, @ns@._default_burst(key_rate)), fair, max_in_flight_per_key)
    RETURNING id INTO gid;
    INSERT INTO @ns@.group_counters (group_id) VALUES (gid);
    IF fair THEN
        -- In the transaction that creates the group: a publish sees both or neither.
        UPDATE @ns@.streams s SET fair = true WHERE s.id = sid AND NOT s.fair;
    END IF;
    IF start = 'oldest' AND fair THEN
        -- The retained backlog is stamped like a publish of it, in id order per key.
        SELECT coalesce(sum(@ns@._enqueue_fair(gid, x.ids, x.keys, x.visible)), 0) INTO n
        FROM (SELECT array_agg(m.id ORDER BY m.id) AS ids, array_agg(m.key ORDER BY m.id) AS keys,
                     array_agg(@ns@.uuid_time(m.id) ORDER BY m.id) AS visible
              FROM @ns@.messages m WHERE m.stream_id = sid HAVING count(*) > 0) x;
        UPDATE @ns@.group_counters SET pending = n WHERE group_id = gid;
    ELSIF start = 'oldest' THEN
        -- Ordered (or a per-key limit: `lined`): keyed messages wait in their keys' lines (id
        -- order), then each key gets its heads.
        INSERT INTO @ns@.delivery_state (group_id, message_id, visible_at, key, key_seq, key_limited)
        SELECT gid, m.id,
               @ns@.uuid_time(m.id)
                   + CASE WHEN lined AND m.key IS NOT NULL THEN @ns@._parked_offset() ELSE interval '0' END,
               CASE WHEN lined THEN m.key END,
               CASE WHEN lined AND m.key IS NOT NULL THEN nextval('@ns@.key_seq') END,
               CASE WHEN lined AND NOT ordered AND m.key IS NOT NULL THEN true END
        FROM @ns@.messages m WHERE m.stream_id = sid
        ORDER BY m.id
        ON CONFLICT (group_id, message_id) DO NOTHING;
        GET DIAGNOSTICS n = ROW_COUNT;
        UPDATE @ns@.group_counters SET pending = n WHERE group_id = gid;
        IF lined THEN
            PERFORM @ns@._repair_keys(gid);
        END IF;
    END IF;
    RETURN true;
END $$;

-- Sets (or, with NULL, removes) the group's concurrency limit: at most `max_in_flight`
-- deliveries leased at once across every consumer and process. Claims already made keep their
-- leases; new claims wait for room. Returns false when the group does not exist.
CREATE OR REPLACE FUNCTION @ns@.set_max_in_flight(stream text, "group" text, max_in_flight integer)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM @ns@._check_name('stream', stream);
    PERFORM @ns@._check_name('group', "group");
    PERFORM @ns@._check(max_in_flight IS NULL OR max_in_flight > 0,
        format('max_in_flight must be positive, not %s', max_in_flight),
        'pass NULL to remove the limit');
    UPDATE @ns@.groups g SET max_in_flight = set_max_in_flight.max_in_flight
    FROM @ns@.streams s WHERE s.id = g.stream_id AND s.name = stream AND g.name = "group";
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    -- A raised or removed limit makes room: wake the consumers waiting for it at commit (the
    -- engine's pool, which does not notify, wakes them itself).
    IF coalesce(current_setting('pgtide.notify', true), '') <> 'off' THEN
        PERFORM pg_notify('pgtide.' || @ns_lit@, stream);
    END IF;
    RETURN true;
END $$;

CREATE OR REPLACE FUNCTION @ns@.delete_group(stream text, "group" text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    gid    integer;
    sid    integer;
    v_fair boolean;
BEGIN
    PERFORM @ns@._check_name('stream', stream);
    PERFORM @ns@._check_name('group', "group");
    SELECT g.id, g.stream_id, g.fair INTO gid, sid, v_fair FROM @ns@.groups g JOIN @ns@.streams s ON s.id = g.stream_id
    WHERE s.name = stream AND g.name = "group" FOR UPDATE OF g;
    IF gid IS NULL THEN RETURN false; END IF;
    IF v_fair THEN
        -- `streams.fair` is recomputed under the stream's row lock, which create_group takes
        -- before adding a fair group: the groups read below include every committed one.
        PERFORM 1 FROM @ns@.streams s WHERE s.id = sid FOR NO KEY UPDATE;
    END IF;
    DELETE FROM @ns@.delivery_state WHERE group_id = gid;
    DELETE FROM @ns@.key_heads WHERE group_id = gid;
    DELETE FROM @ns@.dead_letter_state WHERE group_id = gid;
    DELETE FROM @ns@.group_counters WHERE group_id = gid;
    DELETE FROM @ns@.counter_deltas WHERE group_id = gid;
    DELETE FROM @ns@.groups WHERE id = gid;
    IF v_fair THEN
        UPDATE @ns@.streams s
        SET fair = EXISTS (SELECT 1 FROM @ns@.groups g WHERE g.stream_id = s.id AND g.fair)
        WHERE s.id = sid;
    END IF;
    RETURN true;
END $$;

-- Purge: drop every message of a stream and every pending delivery and dead letter of its
-- groups, keeping the stream, its groups and its partitions.
CREATE OR REPLACE FUNCTION @ns@.purge_stream(stream text) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    sid integer;
    n   bigint;
BEGIN
    PERFORM @ns@._check_name('stream', stream);
    sid := @ns@.stream_id(stream);
    -- The stream's messages first, before any row lock: maintenance (draining the default
    -- partition, retention) holds the partitions and then waits on delivery rows, so taking the
    -- rows first and the TRUNCATE's lock last deadlocked with it.
    EXECUTE format('LOCK TABLE %I.%I IN ACCESS EXCLUSIVE MODE', @ns_lit@, 'messages_s' || sid);
    SELECT count(*) INTO n FROM @ns@.delivery_state
    WHERE group_id IN (SELECT id FROM @ns@.groups WHERE stream_id = sid);
    DELETE FROM @ns@.delivery_state WHERE group_id IN (SELECT id FROM @ns@.groups WHERE stream_id = sid);
    -- Every key of the stream's ordered groups is left without deliveries (ordering.sql).
    DELETE FROM @ns@.key_heads WHERE group_id IN (SELECT id FROM @ns@.groups WHERE stream_id = sid);
    DELETE FROM @ns@.dead_letter_state WHERE group_id IN (SELECT id FROM @ns@.groups WHERE stream_id = sid);
    DELETE FROM @ns@.counter_deltas WHERE group_id IN (SELECT id FROM @ns@.groups WHERE stream_id = sid);
    UPDATE @ns@.group_counters SET pending = 0, dead = 0
    WHERE group_id IN (SELECT id FROM @ns@.groups WHERE stream_id = sid);
    DELETE FROM @ns@.dedupe WHERE stream_id = sid;
    EXECUTE format('TRUNCATE %I.%I', @ns_lit@, 'messages_s' || sid);
    RETURN n;
END $$;

---------------------------------------------------------------------------------------------------
-- reading the registry: runtime and read-only roles hold no table privileges, so the engine reads
-- streams and groups through these. (Not `_streams`: that name is the array type of `streams`.)

-- The stream named `p_name`, or every stream when it is NULL.
CREATE OR REPLACE FUNCTION @ns@._stream_list(p_name text DEFAULT NULL) RETURNS SETOF @ns@.streams
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT * FROM @ns@.streams s WHERE p_name IS NULL OR s.name = p_name
$$;

-- Groups of the stream `p_stream` (of every stream when NULL), by stream and name.
-- The result gained `ordered` and `max_in_flight` (migration 0010), the rate limits (0011) and
-- `fair` (0012) and `max_in_flight_per_key` (0013): a new result type needs the DROP.
DROP FUNCTION IF EXISTS @ns@._group_list(text);
CREATE OR REPLACE FUNCTION @ns@._group_list(p_stream text DEFAULT NULL)
RETURNS TABLE (stream text, "group" text, created_at timestamptz, ordered boolean, max_in_flight integer,
               rate double precision, burst integer, key_rate double precision, key_burst integer,
               fair boolean, max_in_flight_per_key integer)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT s.name, g.name, g.created_at, g.ordered, g.max_in_flight, g.rate, g.burst, g.key_rate, g.key_burst,
           g.fair, g.max_in_flight_per_key
    FROM @ns@.groups g JOIN @ns@.streams s ON s.id = g.stream_id
    WHERE p_stream IS NULL OR s.name = p_stream
    ORDER BY s.name, g.name
$$;

-- The id of a group and whether it keeps key lines (ordered, or a per-key limit), by name
-- (PT002 / PT003 when missing): what a consumer needs to know about its group.
CREATE OR REPLACE FUNCTION @ns@._group_ref(p_stream text, p_group text)
RETURNS TABLE (id integer, ordered boolean)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT g.id, g.ordered OR g.max_in_flight_per_key IS NOT NULL FROM @ns@.groups g
    WHERE g.id = @ns@.group_id(p_stream, p_group)
$$;
