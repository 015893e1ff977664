SELECT id FROM @ns@._ack($1, $2::uuid[], $3::int4[]) AS id
