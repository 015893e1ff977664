-- Publishes of a batch in which some message has an ordering key (`_publish_keyed`,
-- sql/functions/publish.sql): `sql/publish.sql` plus $9, the keys (NULL for none). Returns how
-- many messages were written (0: no such stream).
SELECT @ns@._publish_keyed($1, $2::uuid[], $3::bytea[], $4::bool[], $5::jsonb[], $6::timestamptz[],
                           $7::int8[], $8::int4[], $9::text[])
