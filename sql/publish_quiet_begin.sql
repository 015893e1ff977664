-- Unnamed statement mode (behind a transaction-mode pooler, where the pool cannot set
-- `pgtide.notify = off` as a startup option): a publish from the engine's pool opens its
-- transaction with this, so the NOTIFY trigger stays quiet and the coalescing notifier wakes
-- consumers after commit, as in prepared mode. Sent pipelined with the publish and COMMIT.
BEGIN; SET LOCAL pgtide.notify = off
