-- Shared head of the account scripts (prepended by dispatch/store/scripts.py).
-- KEYS of every account script, in order (dispatch.store.keys.AcctKeys):
--   1 acct  2 ledger  3 refs  4 orders  5 codes  6 index  7 leases  8 pending  9 topups

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Every balance movement: apply it to the account and append it to the ledger,
-- so that balance and held are always the sums of their ledger columns.
local function ledger(kind, ref, balance_delta, held_delta)
  local bal = redis.call('HINCRBY', KEYS[1], 'balance', balance_delta)
  local held = redis.call('HINCRBY', KEYS[1], 'held', held_delta)
  redis.call('XADD', KEYS[2], '*', 'k', kind, 'r', ref, 'b', balance_delta, 'h', held_delta,
             'bal', bal, 'held', held)
  return bal, held
end

local function save(o)
  redis.call('HSET', KEYS[4], o.id, cmsgpack.pack(o))
end
