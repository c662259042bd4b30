-- Shared head of the account scripts (prepended by dispatch/store/scripts.py).
-- KEYS of every account script, in order (dispatch.store.keys.AcctKeys):
--   1 acct  2 ledger  3 refs  4 orders  5 codes  6 index  7 leases  8 pending  9 topups
--   10 events  11 tickets  12 claims
-- Supplier scripts share the money helpers: their KEYS start acct, ledger too.
if moving(KEYS[1]) then return redis.error_reply(MOVING) end

-- Every balance movement is a ledger entry, so that the balance and held amount are
-- always the sums of their ledger columns. An entry is one string,
-- "kind ref balance_delta held_delta ms" joined by \31 (refs are printable); its
-- running figures are those sums, made by its readers, and the last entry of a call
-- carries them to check against (close_entries, _events.lua). The account's fields and
-- the entries are written once per call, by settle_money().
local balance, held, moved_balance, moved_held
local entries, n_entries = {}, 0  -- (a table's length, #t, is a search: lists that grow an item at a time count theirs)
local paid = 0  -- for purchases, net of refunds (count_spend, _limits.lua)

local function money()
  if balance == nil then
    local a = redis.call('HMGET', KEYS[1], 'balance', 'held')
    balance, held = tonumber(a[1]) or 0, tonumber(a[2]) or 0
    moved_balance, moved_held = 0, 0
  end
  return balance, held
end

-- The amounts of a call's entries repeat (one price, one hold), and its time is one:
-- each is formatted once.
local texts = {}
local now_text
local function ledger(kind, ref, balance_delta, held_delta)
  money()
  balance, held = balance + balance_delta, held + held_delta
  moved_balance, moved_held = moved_balance + balance_delta, moved_held + held_delta
  if kind == 'purchase' or kind == 'refund' then paid = paid - balance_delta end
  local b, h = texts[balance_delta], texts[held_delta]
  if not b then b = int(balance_delta); texts[balance_delta] = b end
  if not h then h = int(held_delta); texts[held_delta] = h end
  now_text = now_text or int(now_ms())
  n_entries = n_entries + 1
  entries[n_entries] = kind .. '\31' .. ref .. '\31' .. b .. '\31' .. h .. '\31' .. now_text
  return balance, held
end

-- The account's limits and spend (_limits.lua), read once; GATE: only verified
-- distributors may buy (set by the scripts that open orders).
local account_limits
local GATE = false
local function limits()
  if account_limits == nil then
    account_limits = limits_of(redis.call('HMGET', KEYS[1], unpack(LIMIT_FIELDS)), now_ms())
  end
  return account_limits
end

-- Must end every script that called ledger() or spend().
local function settle_money()
  if paid ~= 0 then count_spend(KEYS[1], limits(), paid) end
  local spent = account_limits and spent_fields(account_limits)
  if spent then redis.call('HSET', KEYS[1], unpack(spent)) end
  if balance == nil then return end
  if moved_balance ~= 0 then redis.call('HINCRBY', KEYS[1], 'balance', int(moved_balance)) end
  if moved_held ~= 0 then redis.call('HINCRBY', KEYS[1], 'held', int(moved_held)) end
  if n_entries > 0 then push('RPUSH', KEYS[2], close_entries(entries, balance, held, now_text)) end
end

-- Order records written by one call go out in one HSET.
local saved, n_saved = {}, 0
local function save(o)
  saved[n_saved + 1], saved[n_saved + 2] = o.id, cmsgpack.pack(o)
  n_saved = n_saved + 2
end

-- A record changed in a few fields is not unpacked and packed again: the fields (msgpack
-- key and value pairs, count of them) are appended to its map, whose readers (msgspec,
-- cmsgpack) keep the last value of a key met twice. Saved as save() does; returns it.
local function save_patched(id, raw, fields, count)
  local b = string.byte(raw, 1)
  local n, body
  if b >= 0x80 and b <= 0x8f then
    n, body = b - 0x80, 2
  elseif b == 0xde then
    n, body = string.byte(raw, 2) * 256 + string.byte(raw, 3), 4
  else
    error({err = 'ERR the record of order ' .. id .. ' is not a msgpack map'})
  end
  n = n + count
  local patched = (n < 16 and string.char(0x80 + n) or string.char(0xde, math.floor(n / 256), n % 256))
                  .. string.sub(raw, body) .. fields
  saved[n_saved + 1], saved[n_saved + 2] = id, patched
  n_saved = n_saved + 2
  return patched
end

local function flush_saved()
  for s = 1, #saved, 1000 do
    redis.call('HSET', KEYS[4], unpack(saved, s, math.min(s + 999, #saved)))
  end
end

-- An order changed: its version grows and its record, packed once, is both what the
-- caller stores and the event's data (never its codes, which live apart); readers show
-- the event's fields of it (dispatch/records.py, decode_event). Returns the record.
local function order_event(o, kind)
  o.v = (o.v or 0) + 1
  local packed = cmsgpack.pack(o)
  emit(KEYS[10], kind, 'order:' .. o.id, o.v, packed)
  return packed
end

local function zadd_all(key, pairs_)
  for s = 1, #pairs_, 1000 do
    redis.call('ZADD', key, unpack(pairs_, s, math.min(s + 999, #pairs_)))
  end
end

-- Orders opened by one call (begin, buy): their records, external_refs and index
-- entries go out once, by flush_opened(). opened[ref] finds a ref used twice in a call.
local opened, opened_refs, opened_ids = {}, {}, {}
local function open_record(id, ref, packed)
  saved[n_saved + 1], saved[n_saved + 2] = id, packed
  n_saved = n_saved + 2
  opened[ref] = packed
  opened_refs[#opened_refs + 1] = ref
  opened_refs[#opened_refs + 1] = id
  opened_ids[#opened_ids + 1] = id
end

local function open_order(o)
  open_record(o.id, o.ref, cmsgpack.pack(o))
end

local function flush_opened()
  flush_saved()
  for s = 1, #opened_refs, 1000 do
    redis.call('HSET', KEYS[3], unpack(opened_refs, s, math.min(s + 999, #opened_refs)))
  end
  if #opened_ids > 0 then zadd_all(KEYS[6], index_entries(opened_ids, 1)) end
end

-- Why an order for (ref, digest, sku) cannot be opened, as its reply; nil if it can.
-- An order made earlier with the same external_ref answers "exists" if it was the
-- same request (digest), else "conflict"; then the distributor's own checks.
local distributor
local earlier_of  -- external_ref -> order id (or false), for every ref of the call (read_refs)
local function read_refs(refs)
  earlier_of = {}
  if #refs == 0 then return end
  local got = redis.call('HMGET', KEYS[3], unpack(refs))
  for x, ref in ipairs(refs) do earlier_of[ref] = got[x] end
end

local function refusal(ref, digest, sku)
  local existing = opened[ref]
  if not existing then
    local earlier
    if earlier_of then earlier = earlier_of[ref] else earlier = redis.call('HGET', KEYS[3], ref) end
    existing = earlier and redis.call('HGET', KEYS[4], earlier)
  end
  if existing then
    local e = cmsgpack.unpack(existing)
    if e.digest == digest then return {'exists', e.id, existing} end
    return {'conflict', e.id}
  end
  if distributor == nil then
    local a = redis.call('HMGET', KEYS[1], 'status', 'allowed', 'credit_limit')
    distributor = {status = a[1], allowed = a[2], credit = tonumber(a[3])}
  end
  if not distributor.status then return {'unknown_distributor'} end
  if distributor.status ~= 'active' then return {'suspended'} end
  if distributor.allowed ~= '*' and not string.find(',' .. distributor.allowed .. ',', ',' .. sku .. ',', 1, true) then
    return {'not_allowed'}
  end
  if GATE and not limits().verified then return {'verification_required'} end
  return nil
end

-- A script that serves several accounts in one call (settle.lua) does each in turn, once
-- the last one's writes are out (settle_money, flush_saved, flush_payees): keys become
-- KEYS, and what was read or gathered of the last one is forgotten.
local function next_account(keys)
  KEYS = keys
  balance, held, moved_balance, moved_held, entries, n_entries, paid, account_limits = nil, nil, nil, nil, {}, 0, 0, nil
  saved, n_saved, opened, opened_refs, opened_ids, distributor, earlier_of = {}, 0, {}, {}, {}, nil, nil
end

-- What the distributor can still spend: balance - held + credit_limit.
local function spendable()
  local bal, hld = money()
  return bal - hld + distributor.credit
end
