-- Deletes a stream (ARGV[1] = 'delete') or empties it (ARGV[1] = 'purge': messages, delayed
-- publishes, and every group's pending deliveries, retries and dead letters; the stream and its
-- groups stay). Dedupe keys are removed by the caller (SCAN). Returns 1 if the stream existed.
-- KEYS: 1 meta, 2 groups, 3 log, 4 delayed, 5 wake
-- ARGV: 1 'delete' or 'purge', 2 key prefix of the stream's groups (their keys are the prefix,
-- the group name, and a suffix, all in the same hash slot as KEYS)
local delete = ARGV[1] == 'delete'
if redis.call('EXISTS', KEYS[1]) == 0 then
  if delete then
    return 0
  end
  return no_stream()
end
local groups = redis.call('HKEYS', KEYS[2])
if not delete then
  redis.call('XTRIM', KEYS[3], 'MAXLEN', 0)
end
for _, g in ipairs(groups) do
  local p = ARGV[2] .. g .. ':'
  redis.call('DEL', p .. 'retry', p .. 'later', p .. 'leases', p .. 'dead')
  if not delete then
    -- Recreating the group drops its pending list in O(1) per group.
    redis.pcall('XGROUP', 'DESTROY', KEYS[3], g)
    redis.call('XGROUP', 'CREATE', KEYS[3], g, '$', 'MKSTREAM')
    redis.call('XGROUP', 'CREATE', p .. 'retry', g, '$', 'MKSTREAM')
  end
end
redis.call('DEL', KEYS[4])
if delete then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[5])
end
return 1
