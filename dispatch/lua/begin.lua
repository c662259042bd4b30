-- begin(keys=account keys, args=[n, gate, n x (order_id, external_ref, digest, sku, qty,
--                       unit_price, currency, mode, ttl_s, allow_partial, plan),
--                       margins (_margins.lua: m, m x (k, c, c margins))])
-- Opens reservations: checks that the distributor may buy the SKU, holds qty * unit_price of
-- its balance (never below -credit_limit, nor past its limits: _limits.lua; with gate
-- "1", only if it is verified) and records the order as pending, keyed by
-- external_ref. plan (the buckets of a SKU spread over several its take looks in, in
-- order; "" for one) is kept with the order, so every retry looks where the first did.
-- A sub-distributor's order is refused while an ancestor is suspended or may not buy the
-- SKU, checked against its ancestors' limits as a ceiling, and keeps its margins (mg, bp:
-- _margins.lua) for commit.lua and settle.lua to pay.
-- Safe to run twice: the second run finds the ref and answers "exists".
-- returns, flat (_events.lua), per order: {"ok", id} | {"exists", id, order} | {"conflict", id}
--   | {"unknown_distributor"} | {"suspended"} | {"not_allowed"} | {"insufficient_balance", spendable}
--   | {"verification_required"} | {"limit_exceeded", limit, left}
local now = now_ms()
local out = {}
local pending = {}
GATE = ARGV[2] == '1'
local chain = chain_of(KEYS[1])
if chain then ceiling(limits(), chain) end
local margins = read_margins(3 + tonumber(ARGV[1]) * 11)
do  -- every external_ref of the call, looked up with one HMGET
  local refs = {}
  for k = 1, tonumber(ARGV[1]) do refs[k] = ARGV[3 + (k - 1) * 11 + 1] end
  read_refs(refs)
end
local i = 3
for k = 1, tonumber(ARGV[1]) do
  local id, ref, digest, sku = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local qty, price = tonumber(ARGV[i + 4]), tonumber(ARGV[i + 5])
  i = i + 11
  local refused = refusal(ref, digest, sku)
  if not refused and chain then refused = chain_refusal(chain, sku) end
  local amount = qty * price
  refused = refused or over_limit(limits(), qty, amount, false)
  if refused then
    out[#out + 1] = refused
  elseif amount > spendable() then
    out[#out + 1] = {'insufficient_balance', int(spendable())}
  else
    spend(limits(), amount)
    ledger('hold', id, 0, amount)
    local o = {id = id, ref = ref, digest = digest, sku = sku, qty = qty, unit_price = price,
               currency = ARGV[i - 5], mode = ARGV[i - 4], ttl = tonumber(ARGV[i - 3]),
               partial = ARGV[i - 2] == '1', status = 'pending', hold = amount, total = 0,
               delivered = 0, deadline = 0, created = now, updated = now}
    if ARGV[i - 1] ~= '' then o.plan = ARGV[i - 1] end
    if margins[k] then
      o.mg, o.bp = margins[k], price
      for x = 1, #o.mg do o.bp = o.bp - o.mg[x] end
    end
    open_order(o)
    pending[#pending + 1] = now
    pending[#pending + 1] = id
    out[#out + 1] = {'ok', id}
  end
end
if #pending > 0 then
  flush_opened()
  zadd_all(KEYS[8], pending)
end
settle_money()
return flat(out)
