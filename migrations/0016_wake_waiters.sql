-- Wake-up registrations (issue 11, goal 6: SQL publishes under concurrency).
--
-- A NOTIFY holds PostgreSQL's database-wide notify lock through its transaction's commit, so SQL
-- publishes that each NOTIFY commit one at a time. A process whose consumers of a stream wait for
-- a wake-up now registers here (one row per stream and process, written by its registrar through
-- `_wake_register`), and the NOTIFY trigger notifies a stream only when it has a registration:
-- busy consumers, or none at all, cost SQL publishers no NOTIFY. The protocol that makes a
-- skipped NOTIFY safe is in sql/functions/wakeups.sql (`_notify_inserted`, `_wake_register`).
--
-- UNLOGGED: the rows are a cache of live processes' state. A crash empties the table, and every
-- listener reconnects after a crash, forgets its registrations and registers again. A process
-- killed outright leaves its rows behind: `maintain()` deletes the rows whose listener session
-- (`listener_pid`) is gone; until then its streams are simply notified on every publish.
CREATE UNLOGGED TABLE @ns@.wake_waiters (
    stream_id    integer NOT NULL,
    holder       text NOT NULL,
    listener_pid integer NOT NULL,
    since        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream_id, holder)
);
