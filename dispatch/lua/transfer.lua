-- transfer(keys=[parent acct, child acct, child transfers], args=[reference, amount, entry_ref])
-- Moves amount of a parent's balance to its sub-distributor's, once per reference: a
-- "transfer" ledger entry on each side (ref entry_ref, "<child id>/<reference>", on both),
-- one tree, so one hash tag (keys.acct_tag). The parent must be active and may move only
-- what it has (balance - held: its credit limit is the platform's, not its subs').
-- Safe to run twice: a repeat with the same amount is answered again, with another
-- amount it is a conflict.
-- returns {"ok"|"again", child balance} | {"conflict", earlier amount} | {"unknown_distributor"}
--   | {"suspended"} | {"insufficient_balance", available}
local ref, amount, entry = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local earlier = redis.call('HGET', KEYS[3], ref)
if earlier then
  if tonumber(earlier) ~= amount then return {'conflict', tonumber(earlier)} end
  return {'again', redis.call('HGET', KEYS[2], 'balance')}
end
local parent, child = payee(KEYS[1]), payee(KEYS[2])
if not parent.status or not child.status then return {'unknown_distributor'} end
if parent.status ~= 'active' then return {'suspended'} end
local available = parent.balance - parent.held
if amount > available then return {'insufficient_balance', int(available)} end
credit(parent, 'transfer', entry, -amount)
credit(child, 'transfer', entry, amount)
flush_payees()
redis.call('HSET', KEYS[3], ref, int(amount))
return {'ok', int(child.balance)}
