-- begin(keys=account keys, args=[n, n x (order_id, external_ref, digest, sku, qty,
--                       unit_price, currency, mode, ttl_s, allow_partial)])
-- Opens orders: checks that the distributor may buy the SKU, holds qty * unit_price of
-- its balance (never below -credit_limit) and records the order as pending, keyed by
-- external_ref. Safe to run twice: the second run finds the ref and answers "exists".
-- returns per order: {"ok", id} | {"exists", id, order} | {"conflict", id}
--   | {"unknown_distributor"} | {"suspended"} | {"not_allowed"} | {"insufficient_balance", spendable}
local now = now_ms()
local a = redis.call('HMGET', KEYS[1], 'status', 'allowed', 'credit_limit')
local status, allowed, credit = a[1], a[2], tonumber(a[3])
local out = {}
local opened = {}                    -- ref -> record, for a ref twice in one call
local refs, index, pending = {}, {}, {}
local i = 2
for _ = 1, tonumber(ARGV[1]) do
  local id, ref, digest, sku = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local qty, price = tonumber(ARGV[i + 4]), tonumber(ARGV[i + 5])
  i = i + 10
  local existing = opened[ref]
  if not existing then
    local earlier = redis.call('HGET', KEYS[3], ref)
    existing = earlier and redis.call('HGET', KEYS[4], earlier)
  end
  if existing then
    if cmsgpack.unpack(existing).digest == digest then
      out[#out + 1] = {'exists', cmsgpack.unpack(existing).id, existing}
    else
      out[#out + 1] = {'conflict', cmsgpack.unpack(existing).id}
    end
  elseif not status then
    out[#out + 1] = {'unknown_distributor'}
  elseif status ~= 'active' then
    out[#out + 1] = {'suspended'}
  elseif allowed ~= '*' and not string.find(',' .. allowed .. ',', ',' .. sku .. ',', 1, true) then
    out[#out + 1] = {'not_allowed'}
  else
    local amount = qty * price
    local bal, hld = money()
    local spendable = bal - hld + credit
    if amount > spendable then
      out[#out + 1] = {'insufficient_balance', int(spendable)}
    else
      ledger('hold', id, 0, amount)
      local o = {id = id, ref = ref, digest = digest, sku = sku, qty = qty, unit_price = price,
                 currency = ARGV[i - 4], mode = ARGV[i - 3], ttl = tonumber(ARGV[i - 2]),
                 partial = ARGV[i - 1] == '1', status = 'pending', hold = amount, total = 0,
                 delivered = 0, deadline = 0, created = now, updated = now}
      save(o)
      opened[ref] = saved[#saved]
      refs[#refs + 1] = ref
      refs[#refs + 1] = id
      index[#index + 1] = 0
      index[#index + 1] = id
      pending[#pending + 1] = now
      pending[#pending + 1] = id
      out[#out + 1] = {'ok', id}
    end
  end
end
if #refs > 0 then
  flush_saved()
  for s = 1, #refs, 1000 do redis.call('HSET', KEYS[3], unpack(refs, s, math.min(s + 999, #refs))) end
  zadd_all(KEYS[6], index)
  zadd_all(KEYS[8], pending)
end
settle_money()
return out
