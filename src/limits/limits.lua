-- xgate: one limit decision, atomically (see src/limits/shared.rs).
--
-- KEYS[1..n]   GCRA buckets: each holds its theoretical arrival time (TAT), in µs
-- KEYS[n+1]    the grant's calls counter for today (when ARGV asks for a quota)
-- KEYS[n+2]    the grant's rows counter for today
-- ARGV[1]      n
-- ARGV[2+3(i-1)..]  per bucket: emission interval µs, burst tolerance µs, longest wait µs
-- ARGV[2+3n..] calls limit (-1: none), rows limit (-1: none), counter TTL in seconds
--
-- Time is the Redis server's, so replicas with skewed clocks still share one schedule.
-- Nothing is written unless every bucket and the quota admit the call.
--
-- Returns {0, 0, wait_us}       admitted (wait_us > 0 only for a bucket with a longest wait)
--         {1, i, retry_after_us} bucket i is over its rate
--         {2, 1|2, 0}            the calls (1) or rows (2) quota is used up
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = tonumber(ARGV[1])
local new = {}
local wait = 0
for i = 1, n do
  local base = 2 + (i - 1) * 3
  local interval = tonumber(ARGV[base])
  local tolerance = tonumber(ARGV[base + 1])
  local longest = tonumber(ARGV[base + 2])
  local tat = tonumber(redis.call('GET', KEYS[i]) or now) or now
  if tat < now then
    tat = now
  end
  local w = tat - tolerance - now
  if w > longest then
    return {1, i, w}
  end
  if w > wait then
    wait = w
  end
  new[i] = tat + interval
end
local q = 2 + n * 3
local calls_limit = tonumber(ARGV[q])
local rows_limit = tonumber(ARGV[q + 1])
local ttl = tonumber(ARGV[q + 2])
if calls_limit >= 0 or rows_limit >= 0 then
  if calls_limit >= 0 and (tonumber(redis.call('GET', KEYS[n + 1]) or 0) or 0) >= calls_limit then
    return {2, 1, 0}
  end
  if rows_limit >= 0 and (tonumber(redis.call('GET', KEYS[n + 2]) or 0) or 0) >= rows_limit then
    return {2, 2, 0}
  end
  redis.call('INCR', KEYS[n + 1])
  redis.call('EXPIRE', KEYS[n + 1], ttl)
end
for i = 1, n do
  -- %.0f: a Lua number would otherwise be written in %.14g and lose microseconds.
  local ms = math.ceil((new[i] - now) / 1000) + 1000
  redis.call('SET', KEYS[i], string.format('%.0f', new[i]), 'PX', string.format('%.0f', ms))
end
return {0, 0, wait}
