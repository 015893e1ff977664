SELECT id, lease_expires_at FROM @ns@._extend($1, $2::uuid[], $3::int4[], $4::int8 * interval '1 microsecond')
