-- settle(keys=account keys, args=[n, n x (order_id, action)])   action: confirm | cancel | expire
-- The account side of ending a reservation; runs before the SKU side (sku_settle), so
-- the account is the fence: once it says cancelled or expired, no confirm can win.
-- A reservation past its deadline expires here, whatever the action asked for, so a
-- lease ends exactly once whether the sweep or a late confirm gets there first.
-- The order is left in `pending` until the SKU side is done (dispatch clears it).
-- Each ending is told on the account's event stream: order.delivered, order.cancelled,
-- order.expired.
-- returns per order: {result, order, codes (of a delivered order, else "")}, result one of
--   "ok" (done now), "again" (was already so), "expired", "not_due", "invalid_state", "not_found"
local now = now_ms()
local target = {confirm = 'delivered', cancel = 'cancelled', expire = 'expired'}
local out = {}
local i = 2
for _ = 1, tonumber(ARGV[1]) do
  local id, action = ARGV[i], ARGV[i + 1]
  i = i + 2
  local raw = redis.call('HGET', KEYS[4], id)
  if not raw then
    out[#out + 1] = {'not_found'}
  else
    local o = cmsgpack.unpack(raw)
    local result
    if o.status == 'reserved' then
      if now >= o.deadline then
        ledger('expire', id, 0, -o.hold)
        o.status = 'expired'
        result = (action == 'expire') and 'ok' or 'expired'
      elseif action == 'expire' then
        result = 'not_due'
      elseif action == 'confirm' then
        ledger('purchase', id, -o.total, -o.hold)
        o.status = 'delivered'
        result = 'ok'
      else
        ledger('release', id, 0, -o.hold)
        o.status = 'cancelled'
        result = 'ok'
      end
      -- the codes go back on sale: the account keeps no copy of them
      if o.status ~= 'delivered' then redis.call('HDEL', KEYS[5], id) end
      if result ~= 'not_due' then
        o.hold = 0
        o.updated = now
        if o.status == 'delivered' then o.dat = now end
        raw = order_event(o, 'order.' .. o.status)
        redis.call('HSET', KEYS[4], id, raw)
        redis.call('ZREM', KEYS[7], id)
        redis.call('ZADD', KEYS[8], now, id)
      end
    elseif o.mode == 'reserve' and o.status == target[action] then
      result = 'again'
    elseif o.status == 'expired' then
      result = 'expired'
    else
      result = 'invalid_state'
    end
    -- a delivered order's codes, so the caller can show them without reading them back
    out[#out + 1] = {result, raw, o.status == 'delivered' and (redis.call('HGET', KEYS[5], id) or '') or ''}
  end
end
settle_money()
return out
