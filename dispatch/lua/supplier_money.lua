-- supplier_money(keys=supplier keys, args=[kind, reference, amount])
-- kind: deposit (credits the deposit) | charge (an approved ticket: the unit cost is
-- taken from the deposit, which may go negative: the supplier then owes it).
-- Once per (kind, reference): a repeat with the same amount is answered "again",
-- with another amount it is a conflict.
-- returns {"ok"|"again", deposit} | {"conflict", earlier_amount} | {"unknown_supplier"}
if redis.call('EXISTS', KEYS[1]) == 0 then return {'unknown_supplier'} end
local kind, ref, amount = ARGV[1], ARGV[2], tonumber(ARGV[3])
local field = kind .. ':' .. ref
local earlier = redis.call('HGET', KEYS[3], field)
if earlier then
  if tonumber(earlier) ~= amount then return {'conflict', tonumber(earlier)} end
  return {'again', redis.call('HGET', KEYS[1], 'balance')}
end
local bal = ledger(kind, ref, kind == 'deposit' and amount or -amount, 0)
settle_money()
if kind == 'charge' then redis.call('HINCRBY', KEYS[1], 'invalidated', '1') end
redis.call('HSET', KEYS[3], field, int(amount))
return {'ok', int(bal)}
