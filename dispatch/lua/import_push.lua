-- import_push(keys=SKU keys, args=[pool_prefix, seq, chunk, digest, code...])
-- Appends one chunk of an import (already deduplicated and encrypted) to batch seq's
-- pool. Chunks are numbered within a batch: a chunk pushed before is not pushed
-- again (a resumed import), and one that differs from what was pushed is refused.
-- returns {"ok", n} | {"again", 0} | {"mismatch"} | {"voided"} | {"unknown_sku"}
local seq, chunk, digest = ARGV[2], ARGV[3], ARGV[4]
if redis.call('EXISTS', KEYS[1]) == 0 then return {'unknown_sku'} end
if redis.call('SISMEMBER', KEYS[6], seq) == 1 then return {'voided'} end
local field = seq .. ':' .. chunk
local earlier = redis.call('HGET', KEYS[5], field)
if earlier then
  if earlier == digest then return {'again', 0} end
  return {'mismatch'}
end
local n = #ARGV - 4
if n > 0 then
  -- straight from ARGV, in slices unpack() can take (its limit is 8000 values)
  for k = 5, #ARGV, 7000 do redis.call('RPUSH', POOL .. seq, unpack(ARGV, k, math.min(k + 6999, #ARGV))) end
  redis.call('HINCRBY', KEYS[2], 'accepted', int(n))
  if redis.call('SISMEMBER', KEYS[9], seq) == 1 then  -- its supplier was blacklisted meanwhile
    redis.call('HINCRBY', KEYS[2], 'parked', int(n))
  else
    redis.call('ZADD', KEYS[3], 'NX', score_of(seq), seq)
    redis.call('HINCRBY', KEYS[2], 'available', int(n))
    check_level()
  end
end
redis.call('HSET', KEYS[5], field, digest)
return {'ok', n}
