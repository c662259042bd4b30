-- buy(keys=account keys, args=[n, n x (order_id, external_ref, digest, sku, unit_price, outcome,
--                     delivered, codes_blob, record)])
-- The account step of a purchase in deliver mode, after its codes were taken from the
-- SKU shard (take, outcome "ok" with `delivered` codes, or the refusal it answered):
-- claims the external_ref, checks the distributor, debits delivered * unit_price (never
-- below -credit_limit) and records the order as delivered with its codes, in one step.
-- The record (status delivered, version 1) is packed by the engine (engine.buy_item):
-- stored as it is, and the data of its order.delivered event.
-- A refusal writes nothing; the engine then gives the codes back (sku_settle undo).
-- Safe to run twice: an order bought already is answered as it stands; one the sweep
-- fenced (gave up on) can no longer be bought.
-- returns per order: {"ok"} | {"ok", order} (a re-sent call) | {"exists", id, order} | {"conflict", id} | {"failed", outcome}
--   | {"gone"} | {"unknown_distributor"} | {"suspended"} | {"not_allowed"} | {"insufficient_balance", spendable}
local out = {}
local codes = {}
local fenced = redis.call('EXISTS', KEYS[13]) == 1
local i = 2
for _ = 1, tonumber(ARGV[1]) do
  local id, ref, digest, sku = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local price, outcome, n, blob, record = tonumber(ARGV[i + 4]), ARGV[i + 5], tonumber(ARGV[i + 6]), ARGV[i + 7],
                                          ARGV[i + 8]
  i = i + 9
  local refused = refusal(ref, digest, sku)
  local cost = n * price
  if refused and refused[1] == 'exists' and refused[2] == id then  -- this very order, bought by a re-sent call
    out[#out + 1] = {'ok', refused[3]}
  elseif fenced and redis.call('SISMEMBER', KEYS[13], id) == 1 then
    out[#out + 1] = {'gone'}
  elseif refused then
    out[#out + 1] = refused
  elseif outcome ~= 'ok' then
    out[#out + 1] = {'failed', outcome}
  elseif cost > spendable() then
    out[#out + 1] = {'insufficient_balance', int(spendable())}
  else
    ledger('purchase', id, -cost, 0)
    emit(KEYS[10], 'order.delivered', 'order:' .. id, 1, record)
    open_record(id, ref, record)
    codes[#codes + 1] = id
    codes[#codes + 1] = blob
    out[#out + 1] = {'ok'}
  end
end
if #codes > 0 then
  flush_opened()
  for s = 1, #codes, 1000 do redis.call('HSET', KEYS[5], unpack(codes, s, math.min(s + 999, #codes))) end
end
settle_money()
return out
