-- Fence tokens that are never reused. Every claim of a delivery takes the next value of
-- `lease_tokens` into `delivery_state.lease_token`; settles name the token they hold. The attempt
-- number cannot fence on its own: a release gives the attempt back and a replayed dead letter
-- starts again at zero, so a stale handle could carry the same attempt as the next holder.
-- NULL while nobody holds the delivery (and for deliveries claimed before this migration).
CREATE SEQUENCE @ns@.lease_tokens AS bigint;
ALTER TABLE @ns@.delivery_state ADD COLUMN lease_token bigint;
