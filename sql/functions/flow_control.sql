-- pgtide flow control: rate limits (migration 0011).
--
-- A group may have a token bucket of its own (`groups.rate`, `burst`) and one per ordering key
-- (`key_rate`, `key_burst`), kept in `rate_buckets` so every process draws on the same tokens.
-- Tokens are taken at claim time: a claim takes at most the group's tokens, and a delivery whose
-- key has none left is put off (its `visible_at` moved to when its key's next token comes) instead
-- of blocking the claim, so one busy key never holds back the group's other keys. A claim that
-- gets nothing because of a limit returns one row with a NULL id whose `lease_expires_at` says
-- when to try again: consumers sleep until then instead of asking the database in a loop.
--
-- Unlimited groups never come here: `_claim` routes only groups with a rate to `_claim_limited`.
--
-- `migrate()` re-applies this file (after the versioned migrations, in one transaction with the
-- other function files, under the namespace's migration lock) whenever its text changes; the
-- checksum of what was applied is kept in `@ns@._pgtide_sql`. Every statement here must be
-- re-runnable: CREATE OR REPLACE. It cannot change a function's result type or argument names:
-- such a change needs a `DROP ... IF EXISTS` just before it in this file. Tables, indexes and
-- data changes belong in `migrations/`, never here.

-- The rate rule (the Rust API's `RateLimit::validate`): a rate between one a day and 1 000 000
-- per second, a burst between 1 and 1 000 000. `what` names the setting in the message.
CREATE OR REPLACE FUNCTION @ns@._check_rate(what text, rate double precision, burst integer)
RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    -- NaN compares above every number in PostgreSQL, so the upper bound also refuses it.
    PERFORM @ns@._check(rate IS NULL OR (rate >= 1.0 / 86400 AND rate <= 1000000),
        format('%s must be between 1/86400 (one a day) and 1000000 deliveries per second, not %s',
               what, rate),
        'pass deliveries per second, e.g. 100 or 0.5; NULL for no limit');
    PERFORM @ns@._check(burst IS NULL OR burst BETWEEN 1 AND 1000000,
        format('the burst of %s must be between 1 and 1000000, not %s', what, burst),
        'leave it out (NULL) for one second''s worth of deliveries (at least 1)');
    PERFORM @ns@._check(burst IS NULL OR rate IS NOT NULL,
        format('a burst needs %s', what), 'pass the rate too, or leave the burst out');
END $$;

-- The burst a rate gets when none is given: one second's worth, at least one token.
CREATE OR REPLACE FUNCTION @ns@._default_burst(rate double precision) RETURNS integer
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN rate IS NOT NULL THEN greatest(1, least(1000000, ceil(rate)))::integer END
$$;

-- Sets (or, with a NULL rate, removes) a rate limit of the group: its own when `per_key` is
-- false, each ordering key's when true. `rate` in deliveries per second, `burst` the most
-- tokens a bucket holds (defaults to one second's worth). Claims already made keep their
-- leases. Returns false when the group does not exist.
CREATE OR REPLACE FUNCTION @ns@.set_rate_limit(stream text, "group" text, rate double precision,
                                               burst integer DEFAULT NULL, per_key boolean DEFAULT false)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    gid integer;
BEGIN
    PERFORM @ns@._check_name('stream', stream);
    PERFORM @ns@._check_name('group', "group");
    PERFORM @ns@._check(per_key IS NOT NULL, 'per_key must not be NULL',
        'pass false for the group''s own limit, true for each key''s');
    PERFORM @ns@._check_rate(CASE WHEN per_key THEN 'the per-key rate' ELSE 'the rate' END, rate, burst);
    SELECT g.id INTO gid FROM @ns@.groups g JOIN @ns@.streams s ON s.id = g.stream_id
    WHERE s.name = stream AND g.name = "group";
    IF gid IS NULL THEN
        RETURN false;
    END IF;
    IF per_key THEN
        UPDATE @ns@.groups g SET key_rate = set_rate_limit.rate,
                                 key_burst = coalesce(set_rate_limit.burst, @ns@._default_burst(set_rate_limit.rate))
        WHERE g.id = gid;
        DELETE FROM @ns@.rate_buckets b WHERE b.group_id = gid AND b.key <> '';
    ELSE
        UPDATE @ns@.groups g SET rate = set_rate_limit.rate,
                                 burst = coalesce(set_rate_limit.burst, @ns@._default_burst(set_rate_limit.rate))
        WHERE g.id = gid;
        DELETE FROM @ns@.rate_buckets b WHERE b.group_id = gid AND b.key = '';
    END IF;
    RETURN true;
END $$;

-- Tokens of a bucket holding `p_tokens` at `p_at`, refilled at `p_rate` per second up to
-- `p_burst`, by `p_now`.
CREATE OR REPLACE FUNCTION @ns@._refill(p_tokens double precision, p_at timestamptz, p_rate double precision,
                                        p_burst integer, p_now timestamptz)
RETURNS double precision
LANGUAGE sql IMMUTABLE AS $$
    SELECT least(p_burst::float8, p_tokens + p_rate * greatest(0, extract(epoch FROM p_now - p_at)::float8))
$$;

-- The row a limited claim that got nothing returns: no id, `lease_expires_at` when to claim
-- again, and the same wait in microseconds as `lease_token` (what the engine reads: a wait does
-- not depend on the client's clock agreeing with the server's).
CREATE OR REPLACE FUNCTION @ns@._come_back(p_wait interval)
RETURNS TABLE (id uuid, attempt integer, lease_expires_at timestamptz, payload bytea, is_json boolean, headers jsonb,
               lease_expired boolean, lease_token bigint, key text)
LANGUAGE sql VOLATILE AS $$
    SELECT NULL::uuid, NULL::integer, clock_timestamp() + greatest(p_wait, interval '0'), NULL::bytea,
           NULL::boolean, NULL::jsonb, NULL::boolean,
           ceil(extract(epoch FROM greatest(p_wait, interval '0')) * 1000000)::bigint, NULL::text
$$;

-- `_claim` of a group with a rate limit. In order:
--   1. read the group's tokens without a lock and pick at most that many ready deliveries
--      (FOR UPDATE SKIP LOCKED, the same O(batch) walk of the claim index as every claim);
--   2. dead-letter the picked deliveries past max_deliver (their keys move on);
--   3. lock the group's bucket and keep the first deliveries its tokens allow (the others stay
--      ready, untouched);
--   4. lock the kept deliveries' key buckets (sorted by key, so claims never deadlock on them)
--      and put off each delivery whose key has no token: due one token apart from the key's
--      horizon, the attempt not counted;
--   5. claim the rest and take their tokens.
-- Bucket locks are taken after every other lock of the claim and held to commit, so whoever
-- holds one never waits for anything but the buckets, which are taken in one order.
DROP FUNCTION IF EXISTS @ns@._claim_limited(integer, integer, text, integer, interval, integer,
                                            double precision, integer, double precision, integer);
CREATE OR REPLACE FUNCTION @ns@._claim_limited(p_group integer, p_limit integer, p_consumer text,
                                               p_stream integer, p_lease interval, p_max integer,
                                               p_rate double precision, p_burst integer,
                                               p_key_rate double precision, p_key_burst integer)
RETURNS TABLE (id uuid, attempt integer, lease_expires_at timestamptz, payload bytea, is_json boolean, headers jsonb,
               lease_expired boolean, lease_token bigint, key text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET enable_sort = off SET enable_bitmapscan = off SET enable_seqscan = off
SET enable_hashjoin = off SET enable_mergejoin = off SET jit = off
-- custom plans: see _claim (a generic plan locks every stream's partitions)
SET plan_cache_mode = force_custom_plan
AS $$
#variable_conflict use_column
DECLARE
    v_burst     integer := coalesce(p_burst, @ns@._default_burst(p_rate));
    v_key_burst integer := coalesce(p_key_burst, @ns@._default_burst(p_key_rate));
    v_tokens    double precision;
    v_ids       uuid[];
    v_att       integer[];
    v_keys      text[];
    v_exp       boolean[];
    v_take_exp  boolean[];
    v_take_keys text[];
    v_defer_keys text[];
    v_exhausted uuid[];
    v_dead      integer := 0;
    v_take      uuid[];
    v_defer     uuid[];
    v_defer_at  timestamptz[];
    v_n         integer;
BEGIN
    IF p_rate IS NOT NULL THEN
        SELECT @ns@._refill(b.tokens, b.refilled_at, p_rate, v_burst, clock_timestamp()) INTO v_tokens
        FROM @ns@.rate_buckets b WHERE b.group_id = p_group AND b.key = '';
        v_tokens := coalesce(v_tokens, v_burst);
        IF v_tokens < 1 THEN
            RETURN QUERY SELECT * FROM @ns@._come_back(make_interval(secs => (1 - v_tokens) / p_rate));
            RETURN;
        END IF;
        p_limit := least(p_limit, floor(v_tokens)::integer);
    END IF;

    -- 1. The keys come from the delivery (ordered groups) or the message (the others), and only
    -- when there are key buckets to ask.
    WITH picked AS MATERIALIZED (
        SELECT d.message_id, d.attempts, d.key, d.visible_at, d.consumer FROM @ns@.delivery_state d
        WHERE d.group_id = p_group AND d.visible_at <= now()
        ORDER BY d.visible_at
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    )
    SELECT array_agg(p.message_id ORDER BY p.visible_at, p.message_id),
           array_agg(p.attempts ORDER BY p.visible_at, p.message_id),
           -- a picked row that still names a consumer was never settled: its lease expired
           array_agg(p.consumer IS NOT NULL ORDER BY p.visible_at, p.message_id),
           array_agg(CASE WHEN p_key_rate IS NOT NULL THEN coalesce(p.key, (
                         SELECT mm.key FROM @ns@.messages mm
                         WHERE mm.stream_id = p_stream AND mm.id = p.message_id LIMIT 1)) END
                     ORDER BY p.visible_at, p.message_id)
    INTO v_ids, v_att, v_exp, v_keys
    FROM picked p;
    IF v_ids IS NULL THEN
        -- Nothing ready: come back when the group's next delivery is due (a put-off one, a
        -- retry, a lease that ends), the first entry past now in the claim index, so waiting
        -- consumers do not depend on a wake-up for deliveries this claim put off.
        RETURN QUERY SELECT c.* FROM (
            SELECT d.visible_at FROM @ns@.delivery_state d
            WHERE d.group_id = p_group AND d.visible_at > now()
            ORDER BY d.visible_at LIMIT 1
        ) n CROSS JOIN LATERAL @ns@._come_back(n.visible_at - clock_timestamp()) c
        WHERE n.visible_at < @ns@._parked_bound();
        RETURN;
    END IF;

    -- 2. Deliveries whose last allowed attempt's lease expired go to the dead letters
    -- (delivery.sql), in a statement of its own only when there are some.
    SELECT array_agg(u.id) INTO v_exhausted FROM unnest(v_ids, v_att) AS u (id, att) WHERE u.att >= p_max;
    IF v_exhausted IS NOT NULL THEN
        v_dead := @ns@._bury_exhausted(p_group, v_exhausted);
    END IF;

    -- 3.
    v_n := NULL;
    IF p_rate IS NOT NULL THEN
        INSERT INTO @ns@.rate_buckets AS b (group_id, key, tokens, refilled_at)
        VALUES (p_group, '', v_burst, clock_timestamp())
        ON CONFLICT (group_id, key) DO UPDATE
        SET tokens = @ns@._refill(b.tokens, b.refilled_at, p_rate, v_burst, clock_timestamp()),
            refilled_at = greatest(b.refilled_at, clock_timestamp())
        RETURNING b.tokens INTO v_tokens;
        v_n := greatest(floor(v_tokens)::integer, 0);
    END IF;

    -- 4. `r`: the delivery's place among this claim's deliveries of its key; `g`: how many of
    -- them the key's tokens allow.
    WITH alive AS (
        SELECT u.id, u.k, u.i, u.exp
        FROM unnest(v_ids, v_att, v_keys, v_exp) WITH ORDINALITY AS u (id, att, k, exp, i)
        WHERE u.att < p_max
        ORDER BY u.i
        LIMIT v_n
    ), ranked AS (
        SELECT a.id, a.k, a.i, a.exp, row_number() OVER (PARTITION BY a.k ORDER BY a.i) AS r FROM alive a
    ), wanted AS (
        SELECT r.k, count(*) AS n FROM ranked r WHERE r.k IS NOT NULL GROUP BY r.k
    ), buckets AS (
        INSERT INTO @ns@.rate_buckets AS b (group_id, key, tokens, refilled_at)
        SELECT p_group, w.k, v_key_burst, clock_timestamp() FROM wanted w ORDER BY w.k
        ON CONFLICT (group_id, key) DO UPDATE
        SET tokens = @ns@._refill(b.tokens, b.refilled_at, p_key_rate, v_key_burst, clock_timestamp()),
            refilled_at = greatest(b.refilled_at, clock_timestamp())
        RETURNING b.key, floor(b.tokens)::integer AS g,
                  greatest(coalesce(b.horizon, clock_timestamp()), clock_timestamp()) AS base
    ), decided AS (
        SELECT r.id, r.i, r.k, r.exp, (b.g IS NULL OR r.r <= b.g) AS take,
               b.base + make_interval(secs => (r.r - b.g) / p_key_rate) AS due
        FROM ranked r LEFT JOIN buckets b ON b.key = r.k
    )
    SELECT array_agg(d.id ORDER BY d.i) FILTER (WHERE d.take),
           array_agg(d.exp ORDER BY d.i) FILTER (WHERE d.take),
           array_agg(d.k ORDER BY d.i) FILTER (WHERE d.take),
           array_agg(d.id ORDER BY d.i) FILTER (WHERE NOT d.take),
           array_agg(d.due ORDER BY d.i) FILTER (WHERE NOT d.take),
           array_agg(d.k ORDER BY d.i) FILTER (WHERE NOT d.take)
    INTO v_take, v_take_exp, v_take_keys, v_defer, v_defer_at, v_defer_keys
    FROM decided d;

    IF v_defer IS NOT NULL THEN
        -- Put off, the attempt not counted; a lease that had expired is over (its holder's
        -- settles are refused, as after a release).
        UPDATE @ns@.delivery_state d SET visible_at = u.due, consumer = NULL, lease_token = NULL
        FROM (SELECT p_group AS gid, v.* FROM unnest(v_defer, v_defer_at) AS v (id, due) OFFSET 0) AS u
        WHERE d.group_id = u.gid AND d.message_id = u.id;
    END IF;
    IF p_key_rate IS NOT NULL THEN
        -- The keys' tokens taken, and their horizons moved past what was put off.
        UPDATE @ns@.rate_buckets b
        SET tokens = b.tokens - t.taken,
            horizon = CASE WHEN t.latest IS NOT NULL THEN greatest(b.horizon, t.latest) ELSE b.horizon END
        FROM (SELECT x.k, count(*) FILTER (WHERE x.take) AS taken, max(x.due) AS latest
              FROM (SELECT tk.k, true AS take, NULL::timestamptz AS due FROM unnest(v_take_keys) AS tk (k)
                    UNION ALL
                    SELECT f.k, false, f.due FROM unnest(v_defer_keys, v_defer_at) AS f (k, due)) x
              WHERE x.k IS NOT NULL GROUP BY x.k) t
        WHERE b.group_id = p_group AND b.key = t.k;
    END IF;

    -- 5.
    RETURN QUERY
    WITH claimed AS (
        UPDATE @ns@.delivery_state d
        SET attempts = d.attempts + 1, visible_at = now() + p_lease, consumer = p_consumer,
            lease_token = @ns@._lease_token()
        FROM unnest(v_take, v_take_exp) AS t (id, expired)
        WHERE d.group_id = p_group AND d.message_id = t.id
        RETURNING d.message_id, d.attempts, d.visible_at, t.expired, d.lease_token
    )
    SELECT c.message_id, c.attempts, c.visible_at, m.payload, m.is_json, m.headers, c.expired,
           c.lease_token, m.key
    FROM claimed c
    CROSS JOIN LATERAL (
        SELECT mm.payload, mm.is_json, mm.headers, mm.key FROM @ns@.messages mm
        WHERE mm.stream_id = p_stream AND mm.id = c.message_id LIMIT 1
    ) m;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    IF p_rate IS NOT NULL AND v_n > 0 THEN
        UPDATE @ns@.rate_buckets b SET tokens = b.tokens - v_n WHERE b.group_id = p_group AND b.key = '';
    END IF;
    IF v_n = 0 AND (v_defer IS NOT NULL OR v_dead > 0 OR p_rate IS NOT NULL) THEN
        -- Nothing claimed, yet there may be more to do: deliveries were put off or buried (others
        -- may be ready behind them: at once), or the group's tokens ran out (at the next token).
        RETURN QUERY SELECT * FROM @ns@._come_back(
            CASE WHEN v_defer IS NOT NULL OR v_dead > 0 THEN interval '0'
                 ELSE make_interval(secs => (1 - v_tokens) / p_rate) END);
    END IF;
END $$;

-- Deletes the key buckets that have refilled to their burst and promise nothing (a missing
-- bucket is a full one), at most `p_limit` per call. Run by `maintain()`.
CREATE OR REPLACE FUNCTION @ns@._trim_rate_buckets(p_limit integer DEFAULT 10000) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n integer;
BEGIN
    WITH doomed AS (
        SELECT b.group_id, b.key FROM @ns@.rate_buckets b JOIN @ns@.groups g ON g.id = b.group_id
        WHERE b.key <> '' AND (b.horizon IS NULL OR b.horizon < now())
          AND (g.key_rate IS NULL
               OR @ns@._refill(b.tokens, b.refilled_at, g.key_rate, coalesce(g.key_burst, 1), now())
                  >= coalesce(g.key_burst, 1))
        LIMIT p_limit
        FOR UPDATE OF b SKIP LOCKED
    )
    DELETE FROM @ns@.rate_buckets b USING doomed x WHERE b.group_id = x.group_id AND b.key = x.key;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END $$;
