-- Rate limits (issue 12.3): token buckets kept in the database, so every process claiming for a
-- group draws on the same tokens.
--
-- `rate` / `burst`: the group's own bucket (deliveries per second, most tokens held at once);
-- `key_rate` / `key_burst`: one bucket per ordering key of the group. NULL rate: no limit.
ALTER TABLE @ns@.groups
    ADD COLUMN rate double precision CHECK (rate >= 1.0 / 86400 AND rate <= 1000000),
    ADD COLUMN burst integer CHECK (burst BETWEEN 1 AND 1000000),
    ADD COLUMN key_rate double precision CHECK (key_rate >= 1.0 / 86400 AND key_rate <= 1000000),
    ADD COLUMN key_burst integer CHECK (key_burst BETWEEN 1 AND 1000000);
-- The buckets themselves, created on a group's first limited claim (key '' is the group's own
-- bucket: no ordering key is empty). `tokens` as of `refilled_at`; `horizon`: up to when the
-- key's tokens are already promised to deliveries a claim put off (they come due one token
-- apart from there, instead of all at once). A bucket that has refilled to its burst says
-- nothing a missing one would not: maintenance deletes those.
CREATE TABLE @ns@.rate_buckets (
    group_id    integer NOT NULL REFERENCES @ns@.groups (id) ON DELETE CASCADE,
    key         text NOT NULL,
    tokens      double precision NOT NULL,
    refilled_at timestamptz NOT NULL,
    horizon     timestamptz,
    PRIMARY KEY (group_id, key)
);
