-- Weighted fair share between the keys of a group (issue 12, feature 5).
--
-- A fair group's ready first-attempt deliveries carry a *virtual* `visible_at`: a start-time
-- fair-queueing stamp far in the past (below `_fair_ceiling()`, year 1900), so they are due at
-- once and the claim, which walks the claim index in `visible_at` order, serves them in stamp
-- order. Claims therefore stay the same O(batch) statement; only publishes into fair groups and
-- the claims of fair groups do more (sql/functions/fair.sql).
ALTER TABLE @ns@.groups ADD COLUMN fair boolean NOT NULL DEFAULT false;
-- Per key of a fair group: `vt`, the stamp of the key's last queued message (its virtual
-- finish line), and its weight (NULL: the default, 1). The key '' stands for messages without a
-- key (no ordering key is empty). A publish of a key locks its row to commit.
CREATE TABLE @ns@.fair_keys (
    group_id integer NOT NULL REFERENCES @ns@.groups (id) ON DELETE CASCADE,
    key      text NOT NULL,
    vt       timestamptz NOT NULL,
    weight   double precision CHECK (weight >= 0.01 AND weight <= 1000),
    PRIMARY KEY (group_id, key)
);
-- The group's highest finish line (its virtual time when nothing virtual is queued) and the
-- rows maintenance may trim, without walking every key.
CREATE INDEX fair_keys_vt ON @ns@.fair_keys (group_id, vt);
