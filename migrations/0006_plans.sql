-- Hot functions keep O(batch) plans whatever the plan cache and the statistics say.
--
-- A plpgsql function's statements may run with a generic plan (after five executions, or always
-- under `plan_cache_mode = force_generic_plan`). A generic plan cannot see `LIMIT p_limit` and
-- assumes it returns 10 % of the group, so with a large backlog and fresh statistics `_claim`'s
-- joins against the picked rows became hash joins that index-scan the whole group to build the
-- hash, and the inflated cost pushed the plan past `jit_above_cost` (JIT on every call). Every
-- statement on the claim and settle paths looks rows up by primary key or walks the claim index
-- to LIMIT, so nested loops over index scans are always the right plan: pin them, and keep JIT
-- off the hot path (its compile time alone is 100× a claim of ten).

ALTER FUNCTION @ns@._claim(integer, integer, text, interval)
    SET enable_hashjoin = off SET enable_mergejoin = off SET jit = off;
ALTER FUNCTION @ns@._ack(integer, uuid[], integer[]) SET jit = off;
ALTER FUNCTION @ns@._nack(integer, uuid[], integer[], interval[], text[]) SET jit = off;
ALTER FUNCTION @ns@._term(integer, uuid[], integer[], text[]) SET jit = off;
ALTER FUNCTION @ns@._extend(integer, uuid[], integer[], interval) SET jit = off;
ALTER FUNCTION @ns@._release(integer, uuid[], integer[]) SET jit = off;
ALTER FUNCTION @ns@._release_consumer(integer, text)
    SET enable_seqscan = off SET enable_bitmapscan = off SET enable_sort = off
    SET enable_hashjoin = off SET enable_mergejoin = off SET jit = off;
ALTER FUNCTION @ns@._publish(text, uuid, bytea, boolean, jsonb, timestamptz, text, integer)
    SET enable_hashjoin = off SET enable_mergejoin = off SET jit = off;
ALTER FUNCTION @ns@._scout_due(timestamptz)
    SET enable_seqscan = off SET enable_bitmapscan = off SET enable_sort = off
    SET enable_hashjoin = off SET enable_mergejoin = off SET jit = off;
ALTER FUNCTION @ns@.stats() SET jit = off;
ALTER FUNCTION @ns@.fold_counters() SET jit = off;
