-- topup(keys=account keys, args=[reference, amount])
-- Credits the balance once per reference: a repeat with the same amount is answered
-- again, with another amount it is a conflict.
-- returns {"ok"|"again", balance} | {"conflict", earlier_amount} | {"unknown_distributor"}
if redis.call('EXISTS', KEYS[1]) == 0 then return {'unknown_distributor'} end
local ref, amount = ARGV[1], tonumber(ARGV[2])
local earlier = redis.call('HGET', KEYS[9], ref)
if earlier then
  if tonumber(earlier) ~= amount then return {'conflict', tonumber(earlier)} end
  return {'again', redis.call('HGET', KEYS[1], 'balance')}
end
local bal = ledger('topup', ref, amount, 0)
settle_money()
redis.call('HSET', KEYS[9], ref, int(amount))
return {'ok', int(bal)}
