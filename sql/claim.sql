SELECT id, attempt, lease_expires_at, payload, is_json, headers, lease_expired, lease_token, key
FROM @ns@._claim($1, $2, $3, $4::int8 * interval '1 microsecond')
