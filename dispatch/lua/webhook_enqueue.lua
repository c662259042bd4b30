-- webhook_enqueue(keys=[cursor, jobs, due], args=[stream, last_id, now_ms, (entry_id, job_id, job)...])
-- KEYS[1]  d:{w}:cursor  HASH stream key -> id of the last entry consumed
-- KEYS[2]  d:{w}:jobs    HASH job id -> msgpack job
-- KEYS[3]  d:{w}:due     ZSET job id -> ms of its next attempt
-- Turns the entries read from one stream into jobs and moves the stream's cursor to
-- last_id. Entries at or before the cursor were consumed already and jobs are created
-- only if absent, so a re-run, or two workers reading the same entries, adds nothing
-- twice; the cursor never moves back.
-- returns the number of jobs created
local function after(a, b)  -- stream id a > stream id b
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, bm = tonumber(am), tonumber(bm)
  if am ~= bm then return am > bm end
  return tonumber(as) > tonumber(bs)
end
local stream, last, now = ARGV[1], ARGV[2], ARGV[3]
local cursor = redis.call('HGET', KEYS[1], stream) or '0-0'
local created = 0
for i = 4, #ARGV, 3 do
  if after(ARGV[i], cursor) and redis.call('HSETNX', KEYS[2], ARGV[i + 1], ARGV[i + 2]) == 1 then
    redis.call('ZADD', KEYS[3], now, ARGV[i + 1])
    created = created + 1
  end
end
if after(last, cursor) then redis.call('HSET', KEYS[1], stream, last) end
return created
