-- begin(keys=account keys, args=[now_unused, n, n x (order_id, external_ref, digest, sku, qty,
--                                  unit_price, currency, mode, ttl_s, allow_partial)])
-- Opens orders: checks that the distributor may buy the SKU, holds qty * unit_price of
-- its balance (never below -credit_limit) and records the order as pending, keyed by
-- external_ref. Safe to run twice: the second run finds the ref and answers "exists".
-- returns per order: {"ok", id} | {"exists", id, order} | {"conflict", id}
--   | {"unknown_distributor"} | {"suspended"} | {"not_allowed"} | {"insufficient_balance", spendable}
local now = now_ms()
local a = redis.call('HMGET', KEYS[1], 'status', 'allowed', 'balance', 'held', 'credit_limit')
local status, allowed = a[1], a[2]
local balance, held, credit = tonumber(a[3]), tonumber(a[4]), tonumber(a[5])
local out = {}
local i = 3
for _ = 1, tonumber(ARGV[2]) do
  local id, ref, digest, sku = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local qty, price = tonumber(ARGV[i + 4]), tonumber(ARGV[i + 5])
  i = i + 10
  local existing = redis.call('HGET', KEYS[3], ref)
  if existing then
    local raw = redis.call('HGET', KEYS[4], existing)
    if cmsgpack.unpack(raw).digest == digest then
      out[#out + 1] = {'exists', existing, raw}
    else
      out[#out + 1] = {'conflict', existing}
    end
  elseif not status then
    out[#out + 1] = {'unknown_distributor'}
  elseif status ~= 'active' then
    out[#out + 1] = {'suspended'}
  elseif allowed ~= '*' and not string.find(',' .. allowed .. ',', ',' .. sku .. ',', 1, true) then
    out[#out + 1] = {'not_allowed'}
  else
    local amount = qty * price
    local spendable = balance - held + credit
    if amount > spendable then
      out[#out + 1] = {'insufficient_balance', spendable}
    else
      balance, held = ledger('hold', id, 0, amount)
      save({id = id, ref = ref, digest = digest, sku = sku, qty = qty, unit_price = price,
            currency = ARGV[i - 4], mode = ARGV[i - 3], ttl = tonumber(ARGV[i - 2]),
            partial = ARGV[i - 1] == '1', status = 'pending', hold = amount, total = 0,
            delivered = 0, deadline = 0, created = now, updated = now})
      redis.call('HSET', KEYS[3], ref, id)
      redis.call('ZADD', KEYS[6], 0, id)
      redis.call('ZADD', KEYS[8], now, id)
      out[#out + 1] = {'ok', id}
    end
  end
end
return out
