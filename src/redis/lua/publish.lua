-- Publishes messages to a stream, atomically with their dedupe keys.
-- KEYS: 1 meta, 2 log, 3 delayed (zset), 4 wake, 5.. dedupe keys
-- ARGV: six per message: id, payload, json, headers, dedupe key index into KEYS (0: none),
--       due ('' now, '+ms' from now, '=ms' Unix time)
-- Returns per message {id, duplicate (0/1)}; a duplicate returns the original id.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return no_stream()
end
local cfg = redis.call('HMGET', KEYS[1], 'retention_ms', 'dedupe_ms', 'max_payload')
local dedupe_ms, max_payload = tonumber(cfg[2]), tonumber(cfg[3])
for i = 1, #ARGV, 6 do
  local size = string.len(ARGV[i + 1])
  if size > max_payload then
    return redis.error_reply('PGTIDE_TOO_LARGE ' .. size .. ' ' .. max_payload)
  end
end
local now = now_ms()
local minid = tostring(math.max(now - tonumber(cfg[1]), 0))
local out, delayed = {}, false
for i = 1, #ARGV, 6 do
  local id, dk, due = ARGV[i], tonumber(ARGV[i + 4]), ARGV[i + 5]
  local original = nil
  if dk > 0 and dedupe_ms > 0 then
    if not redis.call('SET', KEYS[dk], id, 'NX', 'PX', dedupe_ms) then
      original = redis.call('GET', KEYS[dk])
    end
  end
  if original then
    out[#out + 1] = {original, 1}
  else
    local f = {'id', id, 'payload', ARGV[i + 1], 'json', ARGV[i + 2]}
    if ARGV[i + 3] ~= '' then
      f[#f + 1] = 'headers'
      f[#f + 1] = ARGV[i + 3]
    end
    local at = now
    local kind = string.sub(due, 1, 1)
    if kind == '+' then
      at = now + tonumber(string.sub(due, 2))
    elseif kind == '=' then
      at = tonumber(string.sub(due, 2))
    end
    if at > now then
      redis.call('ZADD', KEYS[3], at, cmsgpack.pack(f))
      delayed = true
    else
      xadd(KEYS[2], minid, f)
    end
    out[#out + 1] = {id, 0}
  end
end
if delayed then
  -- Blocked consumers recompute their next due time.
  wake(KEYS[4])
end
return out
