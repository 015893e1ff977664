SELECT id FROM @ns@._release($1, $2::uuid[], $3::int4[]) AS id
