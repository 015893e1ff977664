SELECT id FROM @ns@._term($1, $2::uuid[], $3::int4[], $4::text[]) AS id
