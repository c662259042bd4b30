-- import_push(keys=SKU keys, args=[pool_prefix, seq, chunk, digest, expires, code...])
-- Appends one chunk of an import (already deduplicated and encrypted) to batch seq's
-- pool. Chunks are numbered within a batch: a chunk pushed before is not pushed
-- again (a resumed import), and one that differs from what was pushed is refused.
-- expires: the expiry (unix ms) every code of batch seq shares, "0" for none; the batch
-- joins expq, and is retired at once if it is past its sell-by already.
-- returns {"ok", n} | {"again", 0} | {"mismatch"} | {"voided"} | {"unknown_sku"}
local seq, chunk, digest, expires = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
if redis.call('EXISTS', KEYS[1]) == 0 then return {'unknown_sku'} end
if redis.call('SISMEMBER', KEYS[6], seq) == 1 then return {'voided'} end
local field = seq .. ':' .. chunk
local earlier = redis.call('HGET', KEYS[5], field)
if earlier then
  if earlier == digest then return {'again', 0} end
  return {'mismatch'}
end
local n = #ARGV - 5
if n > 0 and redis.call('SISMEMBER', KEYS[14], seq) == 1 then  -- retired: past its sell-by already
  redis.call('HINCRBY', KEYS[2], 'accepted', int(n))
  redis.call('HINCRBY', KEYS[2], 'expired', int(n))
  redis.call('HINCRBY', KEYS[8], seq .. ':e', int(n))
  redis.call('HSET', KEYS[5], field, digest)
  return {'ok', n}
end
if n > 0 then
  -- straight from ARGV, in slices unpack() can take (its limit is 8000 values)
  for k = 6, #ARGV, 7000 do redis.call('RPUSH', POOL .. seq, unpack(ARGV, k, math.min(k + 6999, #ARGV))) end
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
if n > 0 and expires ~= '0' then
  redis.call('ZADD', KEYS[13], expires, seq)
  local next_exp = redis.call('HGET', KEYS[2], 'next_exp')
  if not next_exp or tonumber(expires) < tonumber(next_exp) then redis.call('HSET', KEYS[2], 'next_exp', expires) end
  if retire_if_due() then check_level() end
end
return {'ok', n}
