-- Depth of one group, without scanning the backlog.
-- KEYS: 1 meta, 2 groups, 3 log, 4 delayed, 5 retry, 6 later, 7 leases, 8 dead
-- ARGV: 1 group
-- Returns {ready, delayed, in_flight, dead, message ids of the oldest ready candidates}.
local group = ARGV[1]
if redis.call('EXISTS', KEYS[1]) == 0 then
  return no_stream()
end
if redis.call('HEXISTS', KEYS[2], group) == 0 then
  return no_group()
end
local now = now_ms()

-- Undelivered log entries: the group's lag (exact while nothing is XDELed from the log, which
-- pgtide never does), capped by the log's length (retention may have trimmed unread entries).
local function group_info(stream)
  local groups = redis.call('XINFO', 'GROUPS', stream)
  for _, flat in ipairs(groups) do
    local g = to_map(flat)
    if g.name == group then
      return g
    end
  end
  return nil
end
local log_len = redis.call('XLEN', KEYS[3])
local info = group_info(KEYS[3])
local unread = log_len
local oldest = {}
if info then
  if info.lag then
    unread = math.min(tonumber(info.lag), log_len)
  end
  local first = redis.call('XRANGE', KEYS[3], '(' .. info['last-delivered-id'], '+', 'COUNT', 1)
  if first[1] then
    oldest[#oldest + 1] = to_map(first[1][2]).id
  end
end

-- Retry copies are deleted when settled, so the rest are either pending or ready.
local retry_pending = tonumber(redis.call('XPENDING', KEYS[5], group)[1])
local retry_ready = redis.call('XLEN', KEYS[5]) - retry_pending
local retry_info = group_info(KEYS[5])
if retry_info and retry_ready > 0 then
  local first = redis.call('XRANGE', KEYS[5], '(' .. retry_info['last-delivered-id'], '+', 'COUNT', 1)
  if first[1] then
    oldest[#oldest + 1] = to_map(first[1][2]).id
  end
end

local lapsed = redis.call('ZCOUNT', KEYS[7], '-inf', now)
local in_flight = redis.call('ZCOUNT', KEYS[7], '(' .. now, '+inf')
local due = redis.call('ZCOUNT', KEYS[4], '-inf', now) + redis.call('ZCOUNT', KEYS[6], '-inf', now)
local later = redis.call('ZCOUNT', KEYS[4], '(' .. now, '+inf')
  + redis.call('ZCOUNT', KEYS[6], '(' .. now, '+inf')
local dead = redis.call('XLEN', KEYS[8])
return {unread + retry_ready + lapsed + due, later, in_flight, dead, oldest}
