-- Ordering keys (issue 12). A message may carry a key (`messages.key`); a group declared
-- `ordered` delivers the messages of one key one at a time, in the order they were stored.
--
-- In an ordered group every key's deliveries form a line: the first is the head, an ordinary
-- delivery row that claims, settles, retries and leases treat like any other; the rest wait
-- with `visible_at` pushed past year 5000 (their own due time plus `_parked_offset()`), where
-- the claim index's `visible_at <= now()` bound never reaches them. When the head leaves
-- (ack, term, dead letter) the next of the line becomes the head (`_advance_keys`). Claims
-- therefore stay the same O(batch) walk of the claim index; unordered groups never set these
-- columns and never enter the two partial indexes below.
ALTER TABLE @ns@.messages ADD COLUMN key text;
ALTER TABLE @ns@.groups ADD COLUMN ordered boolean NOT NULL DEFAULT false;
-- Concurrency limit (issue 12.2): at most this many deliveries of the group leased at once,
-- across every consumer and process; NULL for none.
ALTER TABLE @ns@.groups ADD COLUMN max_in_flight integer CHECK (max_in_flight > 0);
-- `key`: the message's key, set only in ordered groups. `key_seq`: place in the key's line
-- (taken under the key's lock at enqueue, so it is the order publishes of the key committed).
ALTER TABLE @ns@.delivery_state ADD COLUMN key text, ADD COLUMN key_seq bigint;
CREATE SEQUENCE @ns@.key_seq AS bigint;
-- At most one head per key and group, enforced by the database itself.
CREATE UNIQUE INDEX delivery_state_key_head ON @ns@.delivery_state (group_id, key)
    WHERE key IS NOT NULL AND visible_at < '5000-01-01 00:00:00+00';
-- The waiting part of each line, in line order: the next head is its first entry.
CREATE INDEX delivery_state_key_line ON @ns@.delivery_state (group_id, key, key_seq)
    WHERE key IS NOT NULL AND visible_at >= '5000-01-01 00:00:00+00';
