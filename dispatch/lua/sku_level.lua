-- sku_level(keys=SKU keys, args=[pool_prefix, n, n x (bucket, available, chg)])
-- On the own shard of a SKU spread over buckets: what bucket B holds on sale now, as
-- the engine read it with the bucket's count of changes (chg) after a script changed
-- it. A report older than the one kept for that bucket is ignored, so reports may
-- arrive in any order and twice. The SKU's stock level (its events) then follows from
-- its own codes on sale and the buckets' (see check_level).
-- returns "ok"
local others = tonumber(redis.call('HGET', KEYS[2], 'others') or '0')
local i = 3
for _ = 1, tonumber(ARGV[2]) do
  local b, avail, chg = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  i = i + 3
  local seen = redis.call('HMGET', KEYS[2], 'bav:' .. b, 'bchg:' .. b)
  if chg > tonumber(seen[2] or '-1') then
    others = others + avail - tonumber(seen[1] or '0')
    redis.call('HSET', KEYS[2], 'bav:' .. b, int(avail), 'bchg:' .. b, int(chg), 'others', int(others))
  end
end
check_level()
return 'ok'
