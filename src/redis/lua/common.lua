-- pgtide Redis backend: helpers shared by the scripts (concatenated in front of each one).
--
-- Message fields, in every stream (log, retry, dead) and in packed zset members:
--   id (UUID v7), payload, json ('1'/'0'), headers (JSON object text, absent when empty);
--   retry copies add attempts (deliveries made so far) and error (last nack error);
--   dead letters add attempts, reason, error, dead_at (ms).

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function no_stream()
  return redis.error_reply('PGTIDE_NO_STREAM stream does not exist')
end

local function no_group()
  return redis.error_reply('PGTIDE_NO_GROUP group does not exist')
end

-- A flat field list (f1, v1, f2, v2, ...) as a table.
local function to_map(flat)
  local m = {}
  for i = 1, #flat, 2 do
    m[flat[i]] = flat[i + 1]
  end
  return m
end

-- The message part of an entry, as a flat field list (payload absent if the entry is gone).
local function message_fields(m)
  local f = {'id', m.id, 'json', m.json or '0'}
  if m.payload then
    f[#f + 1] = 'payload'
    f[#f + 1] = m.payload
  end
  if m.headers and m.headers ~= '' then
    f[#f + 1] = 'headers'
    f[#f + 1] = m.headers
  end
  return f
end

-- XADD with optional approximate MINID trimming (retention by time).
local function xadd(key, minid, fields)
  local args = {'XADD', key}
  if minid then
    args[#args + 1] = 'MINID'
    args[#args + 1] = '~'
    args[#args + 1] = minid
  end
  args[#args + 1] = '*'
  for i = 1, #fields do
    args[#args + 1] = fields[i]
  end
  return redis.call(unpack(args))
end

-- Moves due members (packed field lists) of a zset into a stream.
local function move_due(zset, stream, now, minid)
  local due = redis.call('ZRANGEBYSCORE', zset, '-inf', now, 'LIMIT', 0, 1000)
  for _, packed in ipairs(due) do
    xadd(stream, minid, cmsgpack.unpack(packed))
    redis.call('ZREM', zset, packed)
  end
end

-- Owner and delivery count of a pending entry (nil, 0 when not pending).
local function pending(stream, group, id)
  local p = redis.call('XPENDING', stream, group, id, id, 1)
  if p[1] then
    return p[1][2], tonumber(p[1][4])
  end
  return nil, 0
end

-- Appends a dead letter.
local function bury(dead, minid, m, attempts, reason, err, now)
  local f = message_fields(m)
  f[#f + 1] = 'attempts'
  f[#f + 1] = attempts
  f[#f + 1] = 'reason'
  f[#f + 1] = reason
  f[#f + 1] = 'dead_at'
  f[#f + 1] = now
  if err then
    f[#f + 1] = 'error'
    f[#f + 1] = err
  end
  xadd(dead, minid, f)
end

-- Removes a settled entry from its group: ack, drop the lease, and delete retry copies
-- (a retry stream has one group, so an acked copy is garbage).
local function finish(stream, group, src, id, leases)
  redis.call('XACK', stream, group, id)
  if src == 'r' then
    redis.call('XDEL', stream, id)
  end
  redis.call('ZREM', leases, src .. id)
end

local function wake(key)
  redis.call('XADD', key, 'MAXLEN', 1, '*', 'w', 1)
end
