-- batch_park(keys=SKU keys, args=[pool_prefix, seq, action])   action: park | unpark
-- Takes a batch off sale and keeps its codes (park: its supplier is blacklisted), or
-- puts it back on sale (unpark: the supplier is reinstated). Parked codes are counted
-- `parked`; codes reserved now join the parked pool when their reservation ends.
-- returns {"ok", codes moved} | {"again", 0} | {"voided", 0}
local seq, action = ARGV[2], ARGV[3]
if redis.call('SISMEMBER', KEYS[6], seq) == 1 then return {'voided', 0} end
local n = redis.call('LLEN', POOL .. seq)
if action == 'park' then
  if redis.call('SADD', KEYS[9], seq) == 0 then return {'again', 0} end
  redis.call('ZREM', KEYS[3], seq)
  redis.call('HINCRBY', KEYS[2], 'available', -n)
  redis.call('HINCRBY', KEYS[2], 'parked', n)
else
  if redis.call('SREM', KEYS[9], seq) == 0 then return {'again', 0} end
  if n > 0 then redis.call('ZADD', KEYS[3], score_of(seq), seq) end
  redis.call('HINCRBY', KEYS[2], 'available', n)
  redis.call('HINCRBY', KEYS[2], 'parked', -n)
end
check_level()
return {'ok', n}
