-- rate_limit(keys=[bucket], args=[rate, burst])
-- KEYS[1]  d:{a:DIST}:rl   HASH tokens (in thousandths of a request), ts (ms of the last refill)
-- A token bucket: it refills `rate` requests a second up to `burst`, and each call takes
-- one request from it. An idle bucket expires once it would be full anyway.
-- Running twice takes two requests: harmless, a limit errs on the side of the store.
-- returns {1, 0} allowed | {0, ms until one request is there}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local cap = burst * 1000
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens, ts = tonumber(b[1]) or cap, tonumber(b[2]) or now
if now > ts then
  tokens = math.min(cap, tokens + (now - ts) * rate)  -- rate/s = rate thousandths per ms
  ts = now
end
local ok, wait = 0, 0
if tokens >= 1000 then
  tokens = tokens - 1000
  ok = 1
else
  wait = math.ceil((1000 - tokens) / rate)
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'ts', string.format('%d', ts))
redis.call('PEXPIRE', KEYS[1], string.format('%d', math.ceil(cap / rate) + 1000))
return {ok, wait}
