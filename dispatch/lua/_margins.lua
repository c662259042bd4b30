-- Shared head of the scripts that move money along a tree of sub-distributors
-- (prepended by dispatch/store/scripts.py, after _limits.lua).
-- A sub-distributor's id is its parent's id and its own name joined by "~", and its keys
-- carry its root's hash tag: d:{a:ROOT}:~a~b:acct for ROOT~a~b (keys.acct_tag). So from
-- an account's key a script knows its ancestors and names their keys itself, on its own
-- tag: the script that charges a sub credits each ancestor its margin in the same call.
-- An order of a sub keeps its margins (mg: per code, root first) and the root's price
-- (bp): its unit price is bp + the sum of mg. When it is paid each ancestor is credited
-- its margin times the codes paid for ("margin" ledger entries, ref the order id); a
-- refund takes each margin of the refunded code back ("clawback").

-- Accounts other than the script's own that it reads or credits: acct key -> state
-- {balance, held, moved, entries (ne of them), status, allowed, limits}, read once per call and
-- written by flush_payees() (deliver.lua adopts its buyers' own states: own = true).
local PAYEES = {}

-- The acct keys of the ancestors of the account whose acct key is key, root first; nil
-- for an account that is no sub-distributor (one string.find: nothing more to pay).
local function chain_of(key)
  local at = string.find(key, '}:~', 1, true)
  if not at then return nil end
  local head = string.sub(key, 1, at + 1)   -- d:{a:ROOT}:
  local path = string.sub(key, at + 2, -6)  -- ~a~b (the key ends in ":acct")
  local chain = {head .. 'acct'}
  local from = 2
  while true do
    local sep = string.find(path, '~', from, true)
    if not sep then return chain end
    chain[#chain + 1] = head .. string.sub(path, 1, sep - 1) .. ':acct'
    from = sep + 1
  end
end

local function payee(key)
  local p = PAYEES[key]
  if not p then
    local h = redis.call('HMGET', key, 'balance', 'held', 'status', 'allowed', unpack(LIMIT_FIELDS))
    p = {balance = tonumber(h[1]) or 0, held = tonumber(h[2]) or 0, status = h[3], allowed = h[4],
         limits = limits_of({unpack(h, 5, 4 + #LIMIT_FIELDS)}, now_ms()), moved = 0, entries = {}, ne = 0}
    PAYEES[key] = p
  end
  return p
end

-- deliver.lua: a buyer's own state st (with the same fields) serves as its account's
-- payee state, taking over what was credited to it before it was read as a buyer.
local function adopt(key, st)
  local p = PAYEES[key]
  if p then st.balance, st.moved, st.entries, st.ne = p.balance, p.moved, p.entries, p.ne end
  st.own = true
  PAYEES[key] = st
end

-- Why the chain's accounts stop a sub's order for sku, as its reply; nil if none does:
-- a suspended (or missing) ancestor stops its whole subtree, and a sub may buy only what
-- every ancestor may.
local function chain_refusal(chain, sku)
  for x = 1, #chain do
    local p = payee(chain[x])
    if p.status ~= 'active' then return {'suspended'} end
    if p.allowed ~= '*' and not string.find(',' .. (p.allowed or '') .. ',', ',' .. sku .. ',', 1, true) then
      return {'not_allowed'}
    end
  end
  return nil
end

-- A sub's limits L (limits_of) with each ancestor's as a ceiling: per limit, the lowest
-- one set along the chain. Its spend is its own.
local function ceiling(L, chain)
  for x = 1, #chain do
    local up = payee(chain[x]).limits
    for _, f in ipairs({'q', 'a', 'd', 'm'}) do
      if up[f] > 0 and (L[f] == 0 or up[f] < L[f]) then L[f] = up[f] end
    end
  end
  return L
end

-- amount moved on p's balance, as a ledger entry of kind and ref.
local function credit(p, kind, ref, amount)
  p.balance, p.moved = p.balance + amount, p.moved + amount
  p.ne = p.ne + 1
  p.entries[p.ne] = kind .. '\031' .. ref .. '\031' .. int(amount) .. '\0310\031' .. int(now_ms())
end

-- Each ancestor of chain credited units x its margin of mg (per code, root first), as
-- entries of kind for order ref (units < 0: taken back).
local function pay_margins(chain, mg, units, ref, kind)
  for x = 1, #chain do
    local m = mg[x] or 0
    if m ~= 0 and units ~= 0 then credit(payee(chain[x]), kind, ref, units * m) end
  end
end

-- The margins of a call's sub orders, from ARGV[j] on: m, then m x (order's index k,
-- count c, c margins); k -> {margins}.
local function read_margins(j)
  local out = {}
  for _ = 1, tonumber(ARGV[j] or '0') or 0 do
    local k, c = tonumber(ARGV[j + 1]), tonumber(ARGV[j + 2])
    local list = {}
    for x = 1, c do list[x] = tonumber(ARGV[j + 2 + x]) end
    out[k] = list
    j = j + 2 + c
  end
  return out
end

-- Must end every script that credited a payee it does not write itself. What it wrote is
-- forgotten: a payee met again is read again.
local function flush_payees()
  for key, p in pairs(PAYEES) do
    if not p.own and p.ne > 0 then
      if p.moved ~= 0 then redis.call('HINCRBY', key, 'balance', int(p.moved)) end
      push('RPUSH', string.sub(key, 1, -5) .. 'ledger', close_entries(p.entries, p.balance, p.held, int(now_ms())))
    end
  end
  PAYEES = {}
end
