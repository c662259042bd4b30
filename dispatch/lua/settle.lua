-- settle(keys=per account its keys (AcctKeys, 12 each),
--        args=[n, sku_keys, nA, nA x its count of orders, n x (order_id, action)])
-- action: confirm | cancel | expire; the orders come account by account, in the order of
-- the keys' blocks.
-- Ends reservations. On a cluster (sku_keys ""), the account side only, of one account;
-- it runs before the SKU side (sku_settle), so the account is the fence: once it says
-- cancelled or expired, no confirm can win; the order is left in `pending` until the SKU
-- side is done (dispatch clears it). Where one node holds every shard, sku_keys is the
-- template of a SKU's keys (SkuKeys of the SKU "\1", space-separated, then its pool
-- prefix) and the SKU side is done here too (settle_codes, _codes.lua), at once: this
-- form of the script names the keys of its orders' SKUs itself, and ends the orders of
-- every account of a round in one call (a call's own cost, its start and its SKU's
-- writes, is shared by all of them). Each account is done in turn, as if alone: its
-- state read, its orders ended, everything of it written (its ancestors' margins too)
-- before the next; the SKUs' side is written once, at the end.
-- A reservation past its deadline expires here, whatever the action asked for, so a
-- lease ends exactly once whether the sweep or a late confirm gets there first.
-- A sub-distributor's confirmed order credits each ancestor its margin (_margins.lua).
-- Each ending is told on the account's event stream: order.delivered, order.cancelled,
-- order.expired (the orders of a call that ended alike, in one entry).
-- returns one flat array, per order: result, 2, order, codes (of a delivered order, else
-- ""), result one of "ok" (done now), "again" (was already so), "expired", "not_due",
-- "invalid_state"; or "not_found", 0
local template = ARGV[2]
local sku_sides = {}  -- sku -> its keys, where this script does the SKU side
local function sku_side(sku)
  local k = sku_sides[sku]
  if not k then
    local list = {}
    for name in string.gmatch(template, '%S+') do
      list[#list + 1] = string.gsub(name, '\1', (string.gsub(sku, '%%', '%%%%')))
    end
    k = sku_keys(list, list[#list])
    k.settled = new_settled()
    sku_sides[sku] = k
  end
  return k
end
local now = now_ms()
local target = {confirm = 'delivered', cancel = 'cancelled', expire = 'expired'}
-- what an ending changes in a record, but its version (save_patched, _account.lua)
local ended_as = {}
do
  local at = cmsgpack.pack(now)
  for _, status in pairs(target) do
    ended_as[status] = cmsgpack.pack('status') .. cmsgpack.pack(status) .. '\164hold\0\167updated' .. at
                       .. (status == 'delivered' and '\163dat' .. at or '')
  end
end
local ALL, out, n_out = KEYS, {}, 0
local done = {}  -- id -> the record saved by this call (an order twice in one call)
local nA = tonumber(ARGV[3])
local i = 4 + nA  -- the first order's id
for a = 1, nA do
  next_account({unpack(ALL, a * 12 - 11, a * 12)})
  local ended, n_ended, pending = {}, 0, {}  -- ids off their lease; (ms, id) pairs left pending
  local news = {}                 -- status -> the records order.<status> tells
  for _ = 1, tonumber(ARGV[3 + a]) do
    local id, action = ARGV[i], ARGV[i + 1]
    i = i + 2
    local raw = done[id] or redis.call('HGET', KEYS[4], id)
    if not raw then
      out[n_out + 1], out[n_out + 2] = 'not_found', 0
      n_out = n_out + 2
    else
      local o = cmsgpack.unpack(raw)
      local result
      if o.status == 'reserved' then
        if now >= o.deadline then
          ledger('expire', id, 0, -o.hold)
          spend(limits(), -o.total, o.created)
          o.status = 'expired'
          result = (action == 'expire') and 'ok' or 'expired'
        elseif action == 'expire' then
          result = 'not_due'
        elseif action == 'confirm' then
          ledger('purchase', id, -o.total, -o.hold)
          if o.mg then pay_margins(chain_of(KEYS[1]), o.mg, o.delivered, id, 'margin') end
          o.status = 'delivered'
          result = 'ok'
        else
          ledger('release', id, 0, -o.hold)
          spend(limits(), -o.total, o.created)
          o.status = 'cancelled'
          result = 'ok'
        end
        -- the codes go back on sale: the account keeps no copy of them
        if o.status ~= 'delivered' then redis.call('HDEL', KEYS[5], id) end
        if result ~= 'not_due' then
          o.hold = 0
          o.updated = now
          if o.status == 'delivered' then o.dat = now end
          o.v = (o.v or 0) + 1
          raw = save_patched(id, raw, ended_as[o.status] .. '\161v' .. cmsgpack.pack(o.v),
                             o.status == 'delivered' and 5 or 4)
          done[id] = raw
          local told = news[o.status]
          if not told then told = {}; news[o.status] = told end
          told[#told + 1] = raw
          n_ended = n_ended + 1
          ended[n_ended] = id
          if template == '' or (o.plan or '') ~= '' then  -- sku_settle follows (a spread SKU: Orders._saga_ends)
            pending[#pending + 1] = now
            pending[#pending + 1] = id
          else
            local sk = sku_side(o.sku)
            settle_codes(sk, id, o.status == 'delivered' and 'sell' or 'return', sk.settled)
          end
        end
      elseif o.mode == 'reserve' and o.status == target[action] then
        result = 'again'
      elseif o.status == 'expired' then
        result = 'expired'
      else
        result = 'invalid_state'
      end
      -- a delivered order's codes, so the caller can show them without reading them back
      out[n_out + 1], out[n_out + 2], out[n_out + 3] = result, 2, raw
      out[n_out + 4] = o.status == 'delivered' and (redis.call('HGET', KEYS[5], id) or '') or ''
      n_out = n_out + 4
    end
  end
  flush_saved()
  push('ZREM', KEYS[7], ended)
  zadd_all(KEYS[8], pending)
  for status, records in pairs(news) do emit_records(KEYS[10], 'order.' .. status, records) end
  settle_money()
  flush_payees()
end
for _, sk in pairs(sku_sides) do
  flush_settled(sk, sk.settled)
  set_level(sk.meta, sk.stats, sk.events, tonumber(redis.call('HGET', sk.stats, 'available') or '0'))
end
return out
