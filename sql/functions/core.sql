-- pgtide helpers: UUID v7 ids and their time, name checks, name -> id lookups.
--
-- `migrate()` re-applies this file (after the versioned migrations, in one transaction with the
-- other function files, under the namespace's migration lock) whenever its text changes; the
-- checksum of what was applied is kept in `@ns@._pgtide_sql`. Every statement here must be
-- re-runnable: CREATE OR REPLACE. It cannot change a function's result type or argument names, or
-- drop or retype a view's columns: such a change needs a `DROP ... IF EXISTS` just before it in
-- this file (and dependants recreated in the same file). Tables, indexes and data changes belong
-- in `migrations/`, never here.

CREATE OR REPLACE FUNCTION @ns@.uuid_v7(ts timestamptz DEFAULT clock_timestamp()) RETURNS uuid
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
CREATE OR REPLACE FUNCTION @ns@.uuid_floor(ts timestamptz) RETURNS uuid
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT (lpad(to_hex(floor(extract(epoch FROM ts) * 1000)::bigint), 12, '0')
            || '00000000000000000000')::uuid
$$;

-- Publish time of a UUID v7 message id.
CREATE OR REPLACE FUNCTION @ns@.uuid_time(id uuid) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT to_timestamp(('x' || lpad(substr(replace(id::text, '-', ''), 1, 12), 16, '0'))::bit(64)::bigint / 1000.0)
$$;

-- A lease's fence token (`delivery_state.lease_token`): 62 random bits, drawn afresh by every
-- claim, from 1 to 2^62 (never 0, which the engine sends for a delivery without a token). Not a sequence: claims commit without waiting for their WAL flush (the engine's
-- `synchronous_claims`, docs/semantics.md "Claims and crashes"), and a sequence advance lost in a
-- crash could hand a lost claim's token to the next claim of the same delivery, which the lost
-- claim's holder would then settle. A random token repeats for one delivery with odds of 2^-62.
-- `random()` is seeded from the operating system's random source in every session (only a
-- session that calls `setseed()` makes it predictable, for itself). Plain SQL, so the claims
-- inline it (no call per row).
CREATE OR REPLACE FUNCTION @ns@._lease_token() RETURNS bigint
LANGUAGE sql VOLATILE AS $$
    SELECT (((random() * 1073741823)::int8 << 32) | (random() * 4294967295)::int8) + 1
$$;

CREATE OR REPLACE FUNCTION @ns@.valid_name(name text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$ SELECT name ~ '^[a-z0-9][a-z0-9._-]{0,63}$' $$;

-- Argument checks of the public functions: the rules of the Rust API (src/names.rs, the batch
-- limit, the stream options), raised as PT001 with a hint, so psql users and other languages meet
-- the same errors as Rust callers instead of constraint violations or silent NULL behaviour.

-- Raises PT001 unless `name` (of a stream, group or consumer: `kind`) follows the naming rule.
-- NULL is invalid. The message shows at most 80 characters of a long name.
CREATE OR REPLACE FUNCTION @ns@._check_name(kind text, name text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF name IS NULL OR NOT @ns@.valid_name(name) THEN
        RAISE EXCEPTION 'pgtide: % name % is invalid', kind,
            CASE WHEN length(name) > 80 THEN quote_literal(left(name, 80)) || '...'
                 ELSE quote_nullable(name) END
            USING ERRCODE = 'PT001',
                  HINT = 'use 1-64 of a-z, 0-9, ''.'', ''_'', ''-'', starting with a letter or digit';
    END IF;
END $$;

-- Raises PT001 with `message` and `hint` unless `ok` is true (NULL counts as false, so a check
-- written as `arg > 0` also rejects a NULL argument).
CREATE OR REPLACE FUNCTION @ns@._check(ok boolean, message text, hint text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF ok IS NOT TRUE THEN
        RAISE EXCEPTION 'pgtide: %', message USING ERRCODE = 'PT001', HINT = hint;
    END IF;
END $$;

-- The checks every by-name settle shares: stream and group names, `ids` given, and `tokens`, when
-- given, one per id.
CREATE OR REPLACE FUNCTION @ns@._check_settle(stream text, "group" text, ids uuid[], tokens bigint[])
RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    PERFORM @ns@._check_name('stream', stream);
    PERFORM @ns@._check_name('group', "group");
    PERFORM @ns@._check(ids IS NOT NULL AND array_position(ids, NULL) IS NULL,
        'ids must not be NULL or hold NULL', 'pass the ids that read() returned');
    PERFORM @ns@._check(tokens IS NULL OR (cardinality(tokens) = cardinality(ids)
                                           AND array_position(tokens, NULL) IS NULL),
        format('tokens must hold one lease token per id (%s ids, %s tokens)',
               cardinality(ids), cardinality(tokens)),
        'pass the lease_token column of read() in the order of ids, or no tokens at all');
END $$;

CREATE OR REPLACE FUNCTION @ns@.stream_id(stream text) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp STABLE AS $$
DECLARE v integer;
BEGIN
    SELECT id INTO v FROM @ns@.streams WHERE name = stream;
    IF v IS NULL THEN
        RAISE EXCEPTION 'pgtide: stream % does not exist', quote_literal(stream)
            USING ERRCODE = 'PT002', HINT = 'create it with create_stream()';
    END IF;
    RETURN v;
END $$;

CREATE OR REPLACE FUNCTION @ns@.group_id(stream text, "group" text) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp STABLE AS $$
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

-- The one duration rule (the Rust API's `MAX_DURATION`): a duration argument (delay, lease,
-- nack delay, a stream option) lies between zero and 36500 days, as PostgreSQL compares
-- intervals (a month counts as 30 days); `p_allow_zero` false also rejects zero. Past that bound
-- timestamps leave the range every client can decode. Returns `p_d` (NULL passes through) so
-- callers can wrap an argument in place; raises PT001 otherwise.
CREATE OR REPLACE FUNCTION @ns@._check_duration(p_name text, p_d interval, p_allow_zero boolean)
RETURNS interval
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_d > interval '36500 days' OR p_d < interval '0' OR (p_d = interval '0' AND NOT p_allow_zero) THEN
        RAISE EXCEPTION 'pgtide: % of % is out of range', p_name, p_d
            USING ERRCODE = 'PT001',
                  HINT = CASE WHEN p_allow_zero THEN 'use a duration between 0 and 36500 days (100 years)'
                              ELSE 'use a positive duration of at most 36500 days (100 years)' END;
    END IF;
    RETURN p_d;
END $$;
