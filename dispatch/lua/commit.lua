-- commit(keys=account keys, args=[n, n x (order_id, outcome, delivered, codes_blob)])
-- Finishes the account side of an order after its codes were taken from the SKU shard.
-- outcome "ok": deliver mode captures delivered * unit_price and releases the rest of
-- the hold; reserve mode shrinks the hold to that cost and starts the lease.
-- Any other outcome (out_of_stock, paused, unknown_sku) releases the hold and forgets
-- the order and its ref, so the ref can be used again.
-- Safe to run twice: an order no longer pending is answered as it stands.
-- returns per order: {"ok", order} | {"failed", outcome} | {"gone"}
local now = now_ms()
local out = {}
local i = 2
for _ = 1, tonumber(ARGV[1]) do
  local id, outcome, n, blob = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3]
  i = i + 4
  local raw = redis.call('HGET', KEYS[4], id)
  if not raw then
    out[#out + 1] = {'gone'}
  else
    local o = cmsgpack.unpack(raw)
    if o.status ~= 'pending' then
      out[#out + 1] = {'ok', raw}
    elseif outcome ~= 'ok' then
      ledger('release', id, 0, -o.hold)
      redis.call('HDEL', KEYS[4], id)
      redis.call('HDEL', KEYS[3], o.ref)
      redis.call('ZREM', KEYS[6], id)
      redis.call('ZREM', KEYS[8], id)
      out[#out + 1] = {'failed', outcome}
    else
      local cost = n * o.unit_price
      if o.mode == 'reserve' then
        if cost < o.hold then ledger('release', id, 0, cost - o.hold) end
        o.status = 'reserved'
        o.deadline = now + o.ttl * 1000
        o.hold = cost
        redis.call('ZADD', KEYS[7], o.deadline, id)
      else
        ledger('purchase', id, -cost, -o.hold)
        o.status = 'delivered'
        o.hold = 0
      end
      o.delivered = n
      o.total = cost
      o.updated = now
      save(o)
      redis.call('HSET', KEYS[5], id, blob)
      redis.call('ZREM', KEYS[8], id)
      out[#out + 1] = {'ok', cmsgpack.pack(o)}
    end
  end
end
return out
