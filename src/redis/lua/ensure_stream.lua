-- Creates a stream's registry entry unless it exists. Returns 1 if created.
-- KEYS: 1 meta
-- ARGV: lease_ms, max_deliver, retention_ms, dedupe_ms, max_payload, config (JSON)
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], 'lease_ms', ARGV[1], 'max_deliver', ARGV[2], 'retention_ms', ARGV[3],
  'dedupe_ms', ARGV[4], 'max_payload', ARGV[5], 'config', ARGV[6], 'created_ms', now_ms())
return 1
