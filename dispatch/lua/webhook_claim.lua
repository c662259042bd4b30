-- webhook_claim(keys=[due, jobs], args=[now_ms, lease_until_ms, n])
-- KEYS[1]  d:{w}:due   ZSET job id -> ms of its next attempt
-- KEYS[2]  d:{w}:jobs  HASH job id -> msgpack job
-- Claims up to n due jobs by moving their score to lease_until: no other worker takes
-- them before the lease ends, and the score is the claim's token (see webhook_settle).
-- A due id without a job (deleted meanwhile) is dropped. Running twice only claims more.
-- returns {job id, job, ...}
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', '0', ARGV[3])
local out = {}
for _, id in ipairs(ids) do
  local job = redis.call('HGET', KEYS[2], id)
  if job then
    redis.call('ZADD', KEYS[1], ARGV[2], id)
    out[#out + 1] = id
    out[#out + 1] = job
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return out
