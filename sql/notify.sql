-- The coalescing notifier's NOTIFY: $1 channel, $2 payloads. A NOTIFY-only transaction still
-- writes a commit record: it does not wait for its flush (the publishes it announces are already
-- durable; losing it in a crash loses nothing).
SELECT pg_notify($1, p)
FROM (SELECT set_config('synchronous_commit', 'off', true)) AS s, unnest($2::text[]) AS p
