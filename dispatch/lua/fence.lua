-- fence(keys=account keys, args=[n, order_id...])
-- The sweep's question about a purchase left provisional on its SKU shard: was it
-- bought? If not, it is fenced, so that a late buy can no longer record it and the
-- SKU side may give its codes back.
-- returns per order: "bought" | "fenced"
local out = {}
for k = 2, tonumber(ARGV[1]) + 1 do
  local id = ARGV[k]
  if redis.call('HEXISTS', KEYS[4], id) == 1 then
    out[#out + 1] = 'bought'
  else
    redis.call('SADD', KEYS[13], id)
    out[#out + 1] = 'fenced'
  end
end
return out
