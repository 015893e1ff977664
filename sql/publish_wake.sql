-- The fast path with its wake-up inside the transaction (the adaptive notifier,
-- src/postgres/background/notifier.rs): `sql/publish.sql`, and when it wrote messages, a
-- `pg_notify($9, $1)` committed with them. A notifying commit holds PostgreSQL's database-wide
-- notify lock through its WAL flush, which serialises notifying publishers, so this notifies only
-- when it takes pgtide's advisory key without waiting: every in-transaction notifier holds that
-- key until its commit ends, as long as the notify lock, so a taken key means another notifying
-- commit is under way and this one would queue behind it. Then the caller hands the wake-up to
-- the coalescing notifier after the commit instead. The key is database-wide, as the notify lock
-- is; it is the two-int4 advisory key (1885828196 = 'pgtd', 1), a space apart from bigint keys.
-- $1 stream name, $2–$8 as in `sql/publish.sql`, $9 the namespace's channel. Returns how many
-- messages were written (0: no such stream) and whether the NOTIFY was sent.
SELECT p.n,
       CASE WHEN p.n > 0 AND pg_try_advisory_xact_lock(1885828196, 1)
            THEN pg_notify($9, $1) IS NOT NULL
            ELSE false END AS notified
FROM (SELECT @ns@._publish_batch($1, $2::uuid[], $3::bytea[], $4::bool[], $5::jsonb[],
                                 $6::timestamptz[], $7::int8[], $8::int4[]) AS n) AS p
