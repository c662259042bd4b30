-- webhook_replay(keys=[jobs, due, failed], args=[job_id, job, now_ms])
-- KEYS[1]  d:{w}:jobs    HASH job id -> msgpack job
-- KEYS[2]  d:{w}:due     ZSET job id -> ms of its next attempt
-- KEYS[3]  d:{w}:failed  ZSET job id -> ms it failed for good
-- Puts a job (its attempts reset in `job`) back to due now. Safe to run twice.
-- returns 1 | 0 (no such job: it was delivered meanwhile)
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return 1
