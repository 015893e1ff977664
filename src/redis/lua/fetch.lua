-- Claims up to ARGV[3] deliveries for consumer ARGV[2] of group ARGV[1].
-- KEYS: 1 meta, 2 groups, 3 log, 4 delayed (stream zset), 5 retry (group stream),
--       6 later (group zset), 7 leases (group zset), 8 dead (group stream), 9 wake
-- Order: move due delayed publishes and retries into place, reclaim expired leases (XCLAIM,
-- which counts a delivery), then read new entries (retry copies first, then the log).
-- Returns {now, next_due (-1 if none), lease, {last ids of log, retry, wake} or {}, deliveries}
-- with each delivery {src, entry id, delivery count, attempt, lease expiry, id, payload, json,
-- headers}.
local group, consumer, max = ARGV[1], ARGV[2], tonumber(ARGV[3])
if redis.call('EXISTS', KEYS[1]) == 0 then
  return no_stream()
end
if redis.call('HEXISTS', KEYS[2], group) == 0 then
  return no_group()
end
local cfg = redis.call('HMGET', KEYS[1], 'lease_ms', 'max_deliver', 'retention_ms')
local lease, max_deliver = tonumber(cfg[1]), tonumber(cfg[2])
local now = now_ms()
local minid = tostring(math.max(now - tonumber(cfg[3]), 0))

move_due(KEYS[4], KEYS[3], now, minid)
move_due(KEYS[6], KEYS[5], now, nil)

local out = {}
local function deliver(src, stream, entry, fields, count)
  local m = to_map(fields)
  local attempt = (tonumber(m.attempts) or 0) + count
  if attempt > max_deliver then
    -- The last allowed attempt's lease expired: dead-letter instead of delivering again.
    local err = m.error or ('lease expired on attempt ' .. (attempt - 1))
    bury(KEYS[8], minid, m, attempt - 1, 'max_deliver', err, now)
    finish(stream, group, src, entry, KEYS[7])
    return
  end
  redis.call('ZADD', KEYS[7], now + lease, src .. entry)
  out[#out + 1] = {src, entry, count, attempt, now + lease, m.id or '', m.payload or '',
    m.json or '0', m.headers or ''}
end

local expired = redis.call('ZRANGEBYSCORE', KEYS[7], '-inf', now, 'LIMIT', 0, max)
for _, member in ipairs(expired) do
  local src, entry = string.sub(member, 1, 1), string.sub(member, 2)
  local stream = KEYS[3]
  if src == 'r' then
    stream = KEYS[5]
  end
  local claimed = redis.call('XCLAIM', stream, group, consumer, 0, entry)
  local e = claimed[1]
  if e and e[2] then
    local _, count = pending(stream, group, entry)
    deliver(src, stream, entry, e[2], count)
  else
    -- Settled meanwhile, or trimmed by retention (XCLAIM dropped it from the pending list).
    finish(stream, group, src, entry, KEYS[7])
  end
end

local function read_new(src, stream)
  local n = max - #out
  if n <= 0 then
    return
  end
  local r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', n, 'STREAMS', stream, '>')
  if r then
    for _, e in ipairs(r[1][2]) do
      deliver(src, stream, e[1], e[2], 1)
    end
  end
end
read_new('r', KEYS[5])
read_new('l', KEYS[3])

local next_due = -1
for _, z in ipairs({KEYS[4], KEYS[6], KEYS[7]}) do
  local first = redis.call('ZRANGE', z, 0, 0, 'WITHSCORES')
  if first[2] then
    local at = tonumber(first[2])
    if next_due < 0 or at < next_due then
      next_due = at
    end
  end
end

-- Where a blocking XREAD must start so that nothing added after this script is missed.
local last = {}
if #out == 0 then
  for _, s in ipairs({KEYS[3], KEYS[5], KEYS[9]}) do
    local r = redis.call('XREVRANGE', s, '+', '-', 'COUNT', 1)
    last[#last + 1] = r[1] and r[1][1] or '0-0'
  end
end
return {now, next_due, lease, last, out}
