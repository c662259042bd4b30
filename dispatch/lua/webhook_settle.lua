-- webhook_settle(keys=[jobs, due, failed], args=[job_id, lease_until_ms, outcome, job, score_ms])
-- KEYS[1]  d:{w}:jobs    HASH job id -> msgpack job
-- KEYS[2]  d:{w}:due     ZSET job id -> ms of its next attempt
-- KEYS[3]  d:{w}:failed  ZSET job id -> ms it failed for good
-- Records the outcome of one attempt: done (the job is deleted), retry (saved, due at
-- score) or failed (saved, moved to failed at score). Only while the claim holds: a job
-- replayed or claimed again after the lease ran out is left to its new owner.
-- returns 1 | 0 (the claim was lost; nothing changed)
local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not score or tonumber(score) ~= tonumber(ARGV[2]) then return 0 end
local id, outcome = ARGV[1], ARGV[3]
if outcome == 'done' then
  redis.call('HDEL', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
elseif outcome == 'retry' then
  redis.call('HSET', KEYS[1], id, ARGV[4])
  redis.call('ZADD', KEYS[2], ARGV[5], id)
else
  redis.call('HSET', KEYS[1], id, ARGV[4])
  redis.call('ZREM', KEYS[2], id)
  redis.call('ZADD', KEYS[3], ARGV[5], id)
end
return 1
