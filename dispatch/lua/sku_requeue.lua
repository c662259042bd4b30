-- sku_requeue(keys=SKU keys, args=[pool_prefix, n, n x (seq, score)])
-- Sets the sale priority of batches (lowest sold first): used when the SKU's sale
-- order is "best_rated" and a supplier's rating changes.
-- returns "ok"
local i = 3
for _ = 1, tonumber(ARGV[2]) do
  local seq, score = ARGV[i], ARGV[i + 1]
  i = i + 2
  redis.call('HSET', KEYS[11], seq, score)
  redis.call('ZADD', KEYS[3], 'XX', score, seq)
end
return 'ok'
