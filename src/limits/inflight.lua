-- xgate: take a place with a provider shared by every replica (see src/limits/shared.rs).
--
-- KEYS[1]  the provider's sorted set of leases (member: the call, score: its expiry, ms)
-- ARGV[1]  max in flight, ARGV[2] lease length in ms, ARGV[3] the call's member
--
-- Leases of calls whose replica died expire by themselves. Returns 1 (place taken) or 0 (full).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) + 1000)
  return 1
end
return 0
