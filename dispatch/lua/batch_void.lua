-- batch_void(keys=SKU keys, args=[pool_prefix, seq])
-- Withdraws a batch's unsold codes: its pool is dropped and counted as voided; codes
-- of the batch that are reserved now are voided when their reservation ends. An empty
-- or sold-out batch is voided all the same (0 codes). Everything is read before the
-- first write.
-- returns {"ok", codes voided} | {"again", 0}
local seq = ARGV[2]
if redis.call('SISMEMBER', KEYS[6], seq) == 1 then return {'again', 0} end
local n = redis.call('LLEN', POOL .. seq)
-- a parked batch's codes were counted parked, not available
local from = (redis.call('SISMEMBER', KEYS[9], seq) == 1) and 'parked' or 'available'
redis.call('SADD', KEYS[6], seq)
redis.call('SREM', KEYS[9], seq)
redis.call('ZREM', KEYS[3], seq)
if n > 0 then
  redis.call('DEL', POOL .. seq)
  redis.call('HINCRBY', KEYS[2], from, int(-n))
  redis.call('HINCRBY', KEYS[2], 'voided', int(n))
end
check_level()
return {'ok', n}
