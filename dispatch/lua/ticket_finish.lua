-- ticket_finish(keys=account keys, args=[ticket_id, outcome, replacement, unit_cost])
-- Ends an approval after the SKU side (sku_invalidate) is done. outcome "refund":
-- the unit price goes back to the balance (a ledger entry) and the order becomes
-- partially_refunded or refunded; never more than was paid; an order of a sub-distributor
-- takes each ancestor's margin on the code back (_margins.lua). outcome "replaced": the
-- replacement code (ciphertext) is kept on the ticket. Safe to run twice.
-- returns {"ok"|"again", ticket} | {"not_found"}
local id, outcome, replacement, cost = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local raw = redis.call('HGET', KEYS[11], id)
if not raw then return {'not_found'} end
local t = cmsgpack.unpack(raw)
if t.status ~= 'approving' then return {'again', raw} end
local now = now_ms()
local o = cmsgpack.unpack(redis.call('HGET', KEYS[4], t.order))
t.refund = 0
if outcome == 'refund' then
  local refund = math.min(t.unit_price, o.total - (o.refunded or 0))
  if refund > 0 then
    ledger('refund', id, refund, 0)
    if o.mg then pay_margins(chain_of(KEYS[1]), o.mg, -1, t.order, 'clawback') end
  end
  o.refunded = (o.refunded or 0) + refund
  o.status = (o.refunded >= o.total) and 'refunded' or 'partially_refunded'
  o.updated = now
  redis.call('HSET', KEYS[4], t.order, order_event(o, 'order.refunded'))
  t.refund = refund
else
  t.replacement = replacement
end
t.status, t.outcome, t.cost, t.updated, t.v = 'approved', outcome, cost, now, t.v + 1
emit(KEYS[10], 'ticket.approved', 'ticket:' .. id, t.v,
     {ticket_id = id, order_id = t.order, sku = t.sku, code_index = t.index, status = 'approved',
      outcome = outcome, refund = t.refund})
raw = cmsgpack.pack(t)
redis.call('HSET', KEYS[11], id, raw)
redis.call('ZREM', KEYS[8], id)
settle_money()
flush_payees()
return {'ok', raw}
