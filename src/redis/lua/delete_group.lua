-- Deletes a group with its pending deliveries, retries and dead letters. Returns 1 if it existed.
-- KEYS: 1 meta, 2 groups, 3 log, 4 retry, 5 later, 6 leases, 7 dead
local group = ARGV[1]
if redis.call('EXISTS', KEYS[1]) == 0 then
  return no_stream()
end
if redis.call('HEXISTS', KEYS[2], group) == 0 then
  return 0
end
redis.pcall('XGROUP', 'DESTROY', KEYS[3], group)
redis.call('DEL', KEYS[4], KEYS[5], KEYS[6], KEYS[7])
redis.call('HDEL', KEYS[2], group)
return 1
