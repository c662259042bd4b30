-- ticket_decide(keys=account keys, args=[ticket_id, decision, replace, note])
-- decision: reject | approve. A reject is final at once. An approve opens the
-- approval saga: the ticket is "approving" (and pending, so the sweep finishes it)
-- until ticket_finish; the first decision wins, a repeat of it is answered "again".
-- returns {"ok"|"again"|"conflict", ticket} | {"not_found"}
local id, decision, replace, note = ARGV[1], ARGV[2], ARGV[3] == '1', ARGV[4]
local raw = redis.call('HGET', KEYS[11], id)
if not raw then return {'not_found'} end
local t = cmsgpack.unpack(raw)
if t.status ~= 'open' then
  local same = (decision == 'reject') == (t.status == 'rejected')
  return {same and 'again' or 'conflict', raw}
end
local now = now_ms()
t.updated, t.v, t.note = now, t.v + 1, note
if decision == 'reject' then
  t.status = 'rejected'
  emit(KEYS[10], 'ticket.rejected', 'ticket:' .. id, t.v,
       {ticket_id = id, order_id = t.order, sku = t.sku, code_index = t.index, status = 'rejected'})
else
  t.status, t.replace = 'approving', replace
  redis.call('ZADD', KEYS[8], int(now), id)
end
raw = cmsgpack.pack(t)
redis.call('HSET', KEYS[11], id, raw)
return {'ok', raw}
