-- Settles deliveries of group ARGV[2], each fenced: the pending entry must still be owned by the
-- consumer it was delivered to, with the delivery count it was delivered with.
-- KEYS: 1 meta, 2 log, 3 retry (group stream), 4 later (group zset), 5 leases, 6 dead, 7 wake
-- ARGV: 1 op (ack, nack, term, release, in_progress), 2 group,
--       3 text ('' none, else '=' .. error for nack or reason for term), 4 lease ms for in_progress
--       ('' for the stream's lease), then six per delivery: src ('l' log, 'r' retry), entry id,
--       delivery count, message id, consumer, nack delay ms.
-- Returns per delivery 0 (lease lost), 1 (settled) or 2 (dead-lettered); for in_progress, the new
-- lease expiry (ms) or 0.
local op, group = ARGV[1], ARGV[2]
if redis.call('EXISTS', KEYS[1]) == 0 then
  return no_stream()
end
local cfg = redis.call('HMGET', KEYS[1], 'lease_ms', 'max_deliver', 'retention_ms')
local max_deliver = tonumber(cfg[2])
local now = now_ms()
local minid = tostring(math.max(now - tonumber(cfg[3]), 0))
local text = nil
if ARGV[3] ~= '' then
  text = string.sub(ARGV[3], 2)
end
local lease = tonumber(cfg[1])
if ARGV[4] ~= '' then
  lease = tonumber(ARGV[4])
end

local function copy(m, attempts, err)
  local f = message_fields(m)
  f[#f + 1] = 'attempts'
  f[#f + 1] = attempts
  if err then
    f[#f + 1] = 'error'
    f[#f + 1] = err
  end
  return f
end

local out = {}
for i = 5, #ARGV, 6 do
  local src, entry, count, id = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3]
  local consumer, delay = ARGV[i + 4], tonumber(ARGV[i + 5])
  local stream = KEYS[2]
  if src == 'r' then
    stream = KEYS[3]
  end
  local owner, delivered = pending(stream, group, entry)
  if owner ~= consumer or delivered ~= count then
    out[#out + 1] = 0
  elseif op == 'in_progress' then
    redis.call('ZADD', KEYS[5], now + lease, src .. entry)
    -- Resets the pending entry's idle time (for XPENDING readers) without counting a delivery.
    redis.call('XCLAIM', stream, group, consumer, 0, entry, 'JUSTID')
    out[#out + 1] = now + lease
  else
    local m = {id = id}
    if op ~= 'ack' then
      local e = redis.call('XRANGE', stream, entry, entry)
      if e[1] then
        m = to_map(e[1][2])
      end
    end
    local attempt = (tonumber(m.attempts) or 0) + count
    local status = 1
    if op == 'term' then
      bury(KEYS[6], minid, m, attempt, text or '', m.error, now)
      status = 2
    elseif op == 'nack' and attempt >= max_deliver then
      bury(KEYS[6], minid, m, attempt, 'max_deliver', text, now)
      status = 2
    elseif op == 'nack' and m.payload then
      -- Retry for this group only: a copy in the group's retry stream, now or when due.
      local f = copy(m, attempt, text)
      if delay > 0 then
        redis.call('ZADD', KEYS[4], now + delay, cmsgpack.pack(f))
        wake(KEYS[7])
      else
        xadd(KEYS[3], nil, f)
      end
    elseif op == 'release' and m.payload then
      xadd(KEYS[3], nil, copy(m, attempt - 1, m.error))
    end
    finish(stream, group, src, entry, KEYS[5])
    out[#out + 1] = status
  end
end
return out
