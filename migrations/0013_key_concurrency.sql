-- Per-key concurrency limit (issue 12): `max_in_flight_per_key = N` lets at most N deliveries
-- of one ordering key be pending-and-due (ready, delayed, retrying or leased) in the group at
-- once, across every consumer and process; the key's other deliveries wait in its line, as in
-- an ordered group (which is the case N = 1 with publish order kept), and move up as the key's
-- deliveries leave the group. NULL: no per-key limit.
ALTER TABLE @ns@.groups ADD COLUMN max_in_flight_per_key integer CHECK (max_in_flight_per_key > 0);
-- Marks the keyed deliveries of a group with a per-key limit (NULL elsewhere, and in ordered
-- groups): such a key has up to N heads, so its rows must stay out of the unique one-head index
-- of ordered groups and be counted through an index of their own.
ALTER TABLE @ns@.delivery_state ADD COLUMN key_limited boolean;
-- The one-head rule of migration 0010, now for ordered groups only (same name, same columns).
DROP INDEX @ns@.delivery_state_key_head;
CREATE UNIQUE INDEX delivery_state_key_head ON @ns@.delivery_state (group_id, key)
    WHERE key IS NOT NULL AND visible_at < '5000-01-01 00:00:00+00' AND key_limited IS NULL;
-- The heads of each key of a group with a per-key limit: counted (at most N entries) under the
-- key's advisory lock before a publish or an advance makes another one.
CREATE INDEX delivery_state_key_slots ON @ns@.delivery_state (group_id, key)
    WHERE key IS NOT NULL AND visible_at < '5000-01-01 00:00:00+00' AND key_limited;
