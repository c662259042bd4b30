-- commit(keys=account keys, args=[n, n x (order_id, outcome, delivered, codes_blob, bucket)])
-- Finishes the account side of a purchase saga after its codes were taken from the SKU
-- shard. outcome "ok", a reservation: the hold shrinks to delivered * unit_price and
-- the lease starts; a purchase in deliver mode (the saga a cluster runs instead of
-- deliver.lua): delivered * unit_price is charged, the hold released, the order
-- delivered with its codes and told as order.delivered (the call's in one entry).
-- The bucket its codes came from (0: the SKU's own shard) is kept with the order (bk).
-- A sub-distributor's delivered order credits each ancestor its margin (_margins.lua).
-- Any other outcome (out_of_stock, paused, unknown_sku) releases the hold and forgets
-- the order and its ref, so the ref can be used again.
-- Safe to run twice: an order no longer pending is answered as it stands.
-- returns, flat (_events.lua), per order: {"ok", order} | {"failed", outcome} | {"gone"}
local now = now_ms()
local out = {}
local done = {}                      -- id -> packed record, for an order twice in one call
local codes, leases, finished = {}, {}, {}
local delivered = {}                 -- records of the orders delivered now: one event entry
local records = {}                   -- each order's record, read with one HMGET
do
  local ids = {}
  for k = 1, tonumber(ARGV[1]) do ids[k] = ARGV[2 + (k - 1) * 5] end
  if #ids > 0 then records = redis.call('HMGET', KEYS[4], unpack(ids)) end
end
local i = 2
for k = 1, tonumber(ARGV[1]) do
  local id, outcome, n, blob, bucket = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3], ARGV[i + 4]
  i = i + 5
  local raw = done[id] or records[k]
  if not raw or raw == 'gone' then
    out[#out + 1] = {'gone'}
  else
    local o = cmsgpack.unpack(raw)
    if bucket ~= '0' and o.status == 'pending' then o.bk = tonumber(bucket) end
    if o.status ~= 'pending' then
      out[#out + 1] = {'ok', raw}
    elseif outcome ~= 'ok' then
      ledger('release', id, 0, -o.hold)
      spend(limits(), -o.hold, o.created)  -- its spend, counted at begin, given back
      redis.call('HDEL', KEYS[4], id)
      redis.call('HDEL', KEYS[3], o.ref)
      redis.call('ZREM', KEYS[6], id)  -- its index member, if its own; in one with others it stays, skipped
      finished[#finished + 1] = id
      done[id] = 'gone'
      out[#out + 1] = {'failed', outcome}
    elseif o.mode == 'deliver' then
      local cost = n * o.unit_price
      if cost < o.hold then spend(limits(), cost - o.hold, o.created) end
      ledger('purchase', id, -cost, -o.hold)
      if o.mg then pay_margins(chain_of(KEYS[1]), o.mg, n, id, 'margin') end
      o.status, o.hold, o.delivered, o.total = 'delivered', 0, n, cost
      o.updated, o.dat = now, now
      o.v = (o.v or 0) + 1
      save(o)
      done[id] = saved[#saved]
      delivered[#delivered + 1] = done[id]
      codes[#codes + 1] = id
      codes[#codes + 1] = blob
      finished[#finished + 1] = id
      out[#out + 1] = {'ok', done[id]}
    else
      local cost = n * o.unit_price
      if cost < o.hold then
        ledger('release', id, 0, cost - o.hold)
        spend(limits(), cost - o.hold, o.created)
      end
      o.status = 'reserved'
      o.deadline = now + o.ttl * 1000
      o.hold = cost
      leases[#leases + 1] = o.deadline
      leases[#leases + 1] = id
      o.delivered = n
      o.total = cost
      o.updated = now
      save(o)
      done[id] = saved[#saved]
      codes[#codes + 1] = id
      codes[#codes + 1] = blob
      finished[#finished + 1] = id
      out[#out + 1] = {'ok', done[id]}
    end
  end
end
flush_saved()
if #delivered > 0 then emit_records(KEYS[10], 'order.delivered', delivered) end
for s = 1, #codes, 1000 do redis.call('HSET', KEYS[5], unpack(codes, s, math.min(s + 999, #codes))) end
zadd_all(KEYS[7], leases)
for s = 1, #finished, 1000 do redis.call('ZREM', KEYS[8], unpack(finished, s, math.min(s + 999, #finished))) end
settle_money()
flush_payees()
return flat(out)
