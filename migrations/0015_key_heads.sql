-- A row per key of an ordered group that has deliveries, and key lines without their heads
-- (issue 12: an ordered group at 0.5x an unordered group's throughput).
--
-- Up to 0014 the one key index held every delivery of a key, heads included: each claim of a
-- head (its `visible_at` changes, so the update is never HOT) and each advance of a line wrote a
-- new entry into it, and a keyed publish's "has this key a delivery?" read every entry of the
-- key on the leaf page it landed on (PostgreSQL 15's B-tree reads a whole page of matches even
-- under LIMIT 1). Now:
--
-- * `key_heads (group_id, key)`: one row per key of an ordered group while the key has a
--   delivery in the group (which is then its head, or a line behind it). Inserted by the
--   publish that makes the head, deleted by the advance that finds the line empty, both under
--   the key's advisory lock; bulk paths (reset, trim, retention, a group created from the
--   oldest message) reconcile it (`_repair_keys`). So the publish's question is one unique probe.
--   `key` in the "C" collation: byte comparisons, the order does not matter.
-- * `delivery_state_key` holds the waiting deliveries of every key line, and every keyed
--   delivery of a group with a per-key limit (`key_limited`: `_key_room` counts its heads
--   there); the heads of ordered groups stay out of it, so claiming and advancing them writes
--   only the primary key and the claim index, as in an unordered group.
CREATE TABLE @ns@.key_heads (
    group_id integer NOT NULL,
    key      text COLLATE "C" NOT NULL,
    PRIMARY KEY (group_id, key)
);
INSERT INTO @ns@.key_heads (group_id, key)
SELECT DISTINCT d.group_id, d.key
FROM @ns@.delivery_state d JOIN @ns@.groups g ON g.id = d.group_id
WHERE g.ordered AND d.key IS NOT NULL;
DROP INDEX @ns@.delivery_state_key;
CREATE INDEX delivery_state_key ON @ns@.delivery_state (group_id, key, key_seq)
    WHERE key IS NOT NULL AND (key_limited OR visible_at >= '5000-01-01 00:00:00+00');
