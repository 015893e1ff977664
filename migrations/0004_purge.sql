-- Purge: drop every message of a stream and every pending delivery and dead letter of its
-- groups, keeping the stream, its groups and its partitions.
CREATE FUNCTION @ns@.purge_stream(stream text) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    sid integer := @ns@.stream_id(stream);
    n   bigint;
BEGIN
    SELECT count(*) INTO n FROM @ns@.delivery_state
    WHERE group_id IN (SELECT id FROM @ns@.groups WHERE stream_id = sid);
    DELETE FROM @ns@.delivery_state WHERE group_id IN (SELECT id FROM @ns@.groups WHERE stream_id = sid);
    DELETE FROM @ns@.dead_letter_state WHERE group_id IN (SELECT id FROM @ns@.groups WHERE stream_id = sid);
    DELETE FROM @ns@.counter_deltas WHERE group_id IN (SELECT id FROM @ns@.groups WHERE stream_id = sid);
    UPDATE @ns@.group_counters SET pending = 0, dead = 0
    WHERE group_id IN (SELECT id FROM @ns@.groups WHERE stream_id = sid);
    DELETE FROM @ns@.dedupe WHERE stream_id = sid;
    EXECUTE format('TRUNCATE %I.%I', @ns_lit@, 'messages_s' || sid);
    RETURN n;
END $$;
