-- batch_void(keys=SKU keys, args=[pool_prefix, seq])
-- Withdraws a batch's unsold codes: its pool is dropped and counted as voided; codes
-- of the batch that are reserved now are voided when their reservation ends.
-- returns {"ok", codes voided} | {"again", 0}
local seq = ARGV[2]
if redis.call('SADD', KEYS[6], seq) == 0 then return {'again', 0} end
local n = redis.call('LLEN', POOL .. seq)
redis.call('DEL', POOL .. seq)
redis.call('ZREM', KEYS[3], seq)
-- a parked batch's codes were counted parked, not available
local from = (redis.call('SREM', KEYS[9], seq) == 1) and 'parked' or 'available'
redis.call('HINCRBY', KEYS[2], from, -n)
redis.call('HINCRBY', KEYS[2], 'voided', n)
check_level()
return {'ok', n}
