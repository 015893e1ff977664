-- Creates a group unless it exists. Returns 1 if created.
-- KEYS: 1 meta, 2 groups, 3 log, 4 retry (group stream)
-- ARGV: 1 group, 2 start id ('$' new messages only, '0' every retained message), 3 info (JSON)
local group = ARGV[1]
if redis.call('EXISTS', KEYS[1]) == 0 then
  return no_stream()
end
if redis.call('HEXISTS', KEYS[2], group) == 1 then
  return 0
end
for _, c in ipairs({{KEYS[3], ARGV[2]}, {KEYS[4], '$'}}) do
  local r = redis.pcall('XGROUP', 'CREATE', c[1], group, c[2], 'MKSTREAM')
  if type(r) == 'table' and r.err and not string.find(r.err, 'BUSYGROUP', 1, true) then
    return r
  end
end
redis.call('HSET', KEYS[2], group, ARGV[3])
return 1
