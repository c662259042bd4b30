-- batch_park(keys=SKU keys, args=[pool_prefix, seq, action])   action: park | unpark
-- Takes a batch off sale and keeps its codes (park: its supplier is blacklisted), or
-- puts it back on sale (unpark: the supplier is reinstated). Parked codes are counted
-- `parked`; codes reserved now join the parked pool when their reservation ends. An
-- empty or sold-out batch is parked all the same (0 codes), so codes coming back to it
-- are parked. Everything is read before the first write.
-- returns {"ok", codes moved} | {"again", 0} | {"voided", 0}
local seq, park = ARGV[2], ARGV[3] == 'park'
if not park and ARGV[3] ~= 'unpark' then return redis.error_reply('ERR batch_park: action must be park or unpark') end
if redis.call('SISMEMBER', KEYS[6], seq) == 1 then return {'voided', 0} end
if (redis.call('SISMEMBER', KEYS[9], seq) == 1) == park then return {'again', 0} end
local n = redis.call('LLEN', POOL .. seq)
local score = score_of(seq)
if park then
  redis.call('SADD', KEYS[9], seq)
  redis.call('ZREM', KEYS[3], seq)
else
  redis.call('SREM', KEYS[9], seq)
  if n > 0 then redis.call('ZADD', KEYS[3], score, seq) end
end
if n > 0 then
  local moved = park and n or -n
  redis.call('HINCRBY', KEYS[2], 'available', int(-moved))
  redis.call('HINCRBY', KEYS[2], 'parked', int(moved))
end
check_level()
return {'ok', n}
