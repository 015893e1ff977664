-- One index for the key lines instead of three, and a per-stream flag for fair groups (issue 12:
-- unordered throughput unchanged). Every INSERT into `delivery_state` opened the three partial
-- indexes of 0010/0013 and prepared their predicates although no unordered row enters them
-- (~10 000 instructions a statement each, benches/icount), and `_publish_batch` looked for fair
-- groups on every publish.
--
-- Within a key of an ordered group or of a group with a per-key limit, the heads are always the
-- rows with the lowest `key_seq` still present: a delivery becomes a head only when its key has
-- no row at all, or has room and an empty line (so it is the key's last row), or as the first
-- of the line (`_advance_keys`); heads stay heads until they leave. One index in line order
-- therefore serves the line (its first waiting entries), the heads (its first entries) and the
-- count of heads (stopping at the first waiting one). The one-head rule of ordered groups rests
-- on the key's advisory lock, which every statement that makes a head holds (ordering.sql).
DROP INDEX @ns@.delivery_state_key_head;
DROP INDEX @ns@.delivery_state_key_line;
DROP INDEX @ns@.delivery_state_key_slots;
-- Renumber the lines that break the rule above (set_max_in_flight_per_key up to 0013 numbered a
-- newly limited group's deliveries in id order but made the leased ones heads first): heads
-- first, then the waiting ones, each in their old order. New numbers are taken from the sequence
-- in that order, so later publishes still queue behind them.
UPDATE @ns@.delivery_state d SET key_seq = r.seq
FROM (SELECT x.group_id, x.message_id, nextval('@ns@.key_seq') AS seq
      FROM (SELECT d2.group_id, d2.message_id,
                   row_number() OVER (ORDER BY d2.group_id, d2.key,
                                               d2.visible_at >= '5000-01-01 00:00:00+00', d2.key_seq) AS place
            FROM @ns@.delivery_state d2
            JOIN (SELECT b.group_id, b.key FROM @ns@.delivery_state b
                  WHERE b.key IS NOT NULL
                  GROUP BY b.group_id, b.key
                  HAVING max(b.key_seq) FILTER (WHERE b.visible_at < '5000-01-01 00:00:00+00')
                       > min(b.key_seq) FILTER (WHERE b.visible_at >= '5000-01-01 00:00:00+00')) bad
              ON bad.group_id = d2.group_id AND bad.key = d2.key) x
      ORDER BY x.place) r
WHERE d.group_id = r.group_id AND d.message_id = r.message_id;
CREATE INDEX delivery_state_key ON @ns@.delivery_state (group_id, key, key_seq) WHERE key IS NOT NULL;
-- True while the stream has a fair group (kept by create_group and delete_group under the
-- stream's row lock): publishes into other streams skip the fair path without looking.
ALTER TABLE @ns@.streams ADD COLUMN fair boolean NOT NULL DEFAULT false;
UPDATE @ns@.streams s SET fair = true
WHERE EXISTS (SELECT 1 FROM @ns@.groups g WHERE g.stream_id = s.id AND g.fair);
