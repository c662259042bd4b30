-- ticket_open(keys=account keys, args=[ticket_id, order_id, index, reason, window_ms])
-- Files an after-sales claim on code `index` (0-based) of a delivered order, within
-- window_ms of its delivery. A code is claimed once: a second claim on it is refused
-- with the ticket that holds it. Safe to run twice (the same ticket id is answered again).
-- returns {"ok", ticket} | {"claimed", ticket_id} | {"not_found"} | {"invalid_state", status}
--   | {"window_closed"} | {"bad_index"}
local id, order, index, reason, window = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local claim = order .. ':' .. index
local holder = redis.call('HGET', KEYS[12], claim)
if holder == id then return {'ok', redis.call('HGET', KEYS[11], id)} end
local raw = redis.call('HGET', KEYS[4], order)
if not raw then return {'not_found'} end
local o = cmsgpack.unpack(raw)
if o.status ~= 'delivered' and o.status ~= 'partially_refunded' then return {'invalid_state', o.status} end
if index < 0 or index >= o.delivered then return {'bad_index'} end
if holder then return {'claimed', holder} end
local now = now_ms()
if now > (o.dat or o.updated) + window then return {'window_closed'} end
local t = {id = id, order = order, index = index, sku = o.sku, reason = reason, status = 'open',
           unit_price = o.unit_price, created = now, updated = now, v = 1}
local packed = cmsgpack.pack(t)
redis.call('HSET', KEYS[11], id, packed)
redis.call('HSET', KEYS[12], claim, id)
emit(KEYS[10], 'ticket.opened', 'ticket:' .. id, 1,
     {ticket_id = id, order_id = order, sku = o.sku, code_index = index, status = 'open'})
return {'ok', packed}
