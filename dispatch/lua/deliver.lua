-- deliver(keys=[SKU keys x nS, account keys x nA],
--         args=[nS, nA, SKU ids x nS, distributor ids x nA, n,
--               n x (order_id, external_ref, digest, sku, distributor, qty, allow_partial, unit_price, record)])
-- Every purchase in deliver mode of one round, where one node holds every shard: each
-- order is checked (its external_ref, its distributor, its SKU, its money) before it
-- takes a code, then its codes are taken, paid for and recorded, all in this one
-- script, so a refused order never touches stock and no order is ever half done.
-- KEYS come in blocks of 12, the SKUs' (dispatch.store.keys.SkuKeys) then the accounts'
-- (AcctKeys); an order names its SKU and distributor, found in the header's ids.
-- The record (status delivered, version 1) is packed by the engine for qty codes;
-- one that gets fewer (allow_partial) is repacked here.
-- The work is done once per SKU and per account, not per order: the pops, the
-- counters, the ledger entries and the records go out in one command each.
-- Safe to run twice: an order found by its external_ref is answered as it stands.
-- returns per order: {"ok", code...} | {"exists", id, record, codes} | {"conflict", id}
--   | {"unknown_distributor"} | {"suspended"} | {"not_allowed"}
--   | {"unknown_sku"} | {"paused"} | {"out_of_stock"} | {"insufficient_balance", spendable}
local nS, nA = tonumber(ARGV[1]), tonumber(ARGV[2])
local n = tonumber(ARGV[3 + nS + nA])
local function sk(s, k) return KEYS[(s - 1) * 12 + k] end
local function ak(a, k) return KEYS[(nS + a - 1) * 12 + k] end
local sku_at, acct_at = {}, {}
for s = 1, nS do sku_at[ARGV[2 + s]] = s end
for a = 1, nA do acct_at[ARGV[2 + nS + a]] = a end
local now = now_ms()

local function int(x) return string.format('%d', x) end

-- Codes as the account's orders keep them: a msgpack array of bin strings (the SKU's
-- delivery records keep them as pack_codes does, _codes.lua).
local function bin_list(codes)
  local parts = {#codes < 16 and string.char(0x90 + #codes)
                 or string.char(0xdc, math.floor(#codes / 256), #codes % 256)}
  for k, c in ipairs(codes) do
    parts[k + 1] = (#c < 256 and string.char(0xc4, #c) or string.char(0xc5, math.floor(#c / 256), #c % 256)) .. c
  end
  return table.concat(parts)
end

-- State of each SKU and account, read once, changed in memory, written once.
local skus, accts = {}, {}
local function sku(s)
  local st = skus[s]
  if not st then
    st = {status = redis.call('HGET', sk(s, 1), 'status'),
          avail = tonumber(redis.call('HGET', sk(s, 2), 'available') or '0'), total = 0, orders = {}}
    skus[s] = st
  end
  return st
end
local function acct(a)
  local st = accts[a]
  if not st then
    local h = redis.call('HMGET', ak(a, 1), 'status', 'allowed', 'credit_limit', 'balance', 'held')
    st = {status = h[1], allowed = h[2], credit = tonumber(h[3]) or 0, balance = tonumber(h[4]) or 0,
          held = tonumber(h[5]) or 0, moved = 0, entries = {}, records = {}, codes = {}, refs = {}, index = {},
          opened = {}}
    accts[a] = st
  end
  return st
end

-- 0. every external_ref of the call, looked up with one HMGET per account
local earlier_id = {}
do
  local asked = {}
  local j = 4 + nS + nA
  for _ = 1, n do
    local a = acct_at[ARGV[j + 4]]
    asked[a] = asked[a] or {}
    asked[a][#asked[a] + 1] = ARGV[j + 1]
    j = j + 9
  end
  for a, list in pairs(asked) do
    local found = redis.call('HMGET', ak(a, 3), unpack(list))
    local mine = {}
    for x = 1, #list do mine[list[x]] = found[x] end
    earlier_id[a] = mine
  end
end

-- 1. decide, in order
local out, want, again = {}, {}, {}
local ids, refs, records, prices, owners, partials, qtys = {}, {}, {}, {}, {}, {}, {}
local i = 4 + nS + nA
for k = 1, n do
  local id, ref, digest, sku_id = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local s, a = sku_at[sku_id], acct_at[ARGV[i + 4]]
  local qty, partial, price, record = tonumber(ARGV[i + 5]), ARGV[i + 6] == '1', tonumber(ARGV[i + 7]), ARGV[i + 8]
  i = i + 9
  ids[k], refs[k], records[k], prices[k], owners[k], partials[k], qtys[k] = id, ref, record, price, a, partial, qty
  want[k] = 0
  local A, S = acct(a), sku(s)
  local first = A.opened[ref]
  if first then  -- the same external_ref twice in one call: the second is told of the first
    if first.digest == digest then again[k] = first.k else out[k] = {'conflict', ids[first.k]} end
  else
    local earlier = earlier_id[a][ref]
    if earlier then
      local rec = redis.call('HGET', ak(a, 4), earlier)
      if cmsgpack.unpack(rec).digest == digest then
        out[k] = {'exists', earlier, rec, redis.call('HGET', ak(a, 5), earlier) or ''}
      else
        out[k] = {'conflict', earlier}
      end
    elseif not A.status then out[k] = {'unknown_distributor'}
    elseif A.status ~= 'active' then out[k] = {'suspended'}
    elseif A.allowed ~= '*' and not string.find(',' .. A.allowed .. ',', ',' .. sku_id .. ',', 1, true) then
      out[k] = {'not_allowed'}
    elseif not S.status then out[k] = {'unknown_sku'}
    elseif S.status ~= 'active' then out[k] = {'paused'}
    elseif S.avail == 0 or (S.avail < qty and not partial) then out[k] = {'out_of_stock'}
    else
      local take = math.min(qty, S.avail)
      local spendable = A.balance - A.held + A.credit
      if take * price > spendable then
        out[k] = {'insufficient_balance', int(spendable)}
      else
        want[k] = take
        S.avail, S.total = S.avail - take, S.total + take
        S.orders[#S.orders + 1] = k
        A.balance, A.moved = A.balance - take * price, A.moved - take * price
        A.entries[#A.entries + 1] = string.format('purchase\31%s\31%d\31%d\31%d\31%d\31%d', id, -take * price, 0,
                                                  A.balance, A.held, now)
        A.opened[ref] = {k = k, digest = digest}
      end
    end
  end
end

-- 2. per SKU: take every code its orders need, oldest batch first, and hand them out
local hour = math.floor(now / 3600000)
for s, S in pairs(skus) do
  if S.total > 0 then
    local meta, stats = sk(s, 1), sk(s, 2)
    local pool = string.sub(meta, 1, -5) .. 'p:'
    local codes, seqs = pop_codes(sk(s, 3), pool, stats, S.total)
    local dlv, dlv_codes, per_batch = {}, {}, {}
    local at = 1
    for _, k in ipairs(S.orders) do
      local mine, runs = {}, runs_of(seqs, at, at + want[k] - 1)
      for c = at, at + want[k] - 1 do
        mine[#mine + 1] = codes[c]
        per_batch[seqs[c]] = (per_batch[seqs[c]] or 0) + 1
      end
      at = at + want[k]
      dlv[#dlv + 1] = ids[k]
      dlv[#dlv + 1] = cmsgpack.pack({st = 'sold', b = runs, h = hour})
      dlv_codes[#dlv_codes + 1] = ids[k]
      dlv_codes[#dlv_codes + 1] = pack_codes(mine)
      local A = accts[owners[k]]
      if want[k] < qtys[k] then  -- allow_partial: fewer codes than asked for
        local r = cmsgpack.unpack(records[k])
        r.delivered, r.total = want[k], want[k] * prices[k]
        records[k] = cmsgpack.pack(r)
      end
      A.records[#A.records + 1] = ids[k]
      A.records[#A.records + 1] = records[k]
      A.codes[#A.codes + 1] = ids[k]
      A.codes[#A.codes + 1] = bin_list(mine)
      A.refs[#A.refs + 1] = refs[k]
      A.refs[#A.refs + 1] = ids[k]
      A.index[#A.index + 1] = 0
      A.index[#A.index + 1] = ids[k]
      table.insert(mine, 1, 'ok')
      out[k] = mine
    end
    push('HSET', sk(s, 4), dlv)
    push('HSET', sk(s, 7), dlv_codes)
    redis.call('HINCRBY', stats, 'available', -S.total)
    redis.call('HINCRBY', stats, 'sold', S.total)
    for seq, c in pairs(per_batch) do redis.call('HINCRBY', sk(s, 8), seq .. ':d', c) end
    redis.call('HINCRBY', sk(s, 10), hour, S.total)
    set_level(meta, stats, sk(s, 12), S.avail)
  end
end

-- 3. per account: the money, the records, the events
for a, A in pairs(accts) do
  if #A.entries > 0 then
    redis.call('HINCRBY', ak(a, 1), 'balance', int(A.moved))
    push('RPUSH', ak(a, 2), A.entries)
    push('HSET', ak(a, 4), A.records)
    push('HSET', ak(a, 5), A.codes)
    push('HSET', ak(a, 3), A.refs)
    push('ZADD', ak(a, 6), A.index)
    for j = 1, #A.records, 2 do
      emit(ak(a, 10), 'order.delivered', 'order:' .. A.records[j], 1, A.records[j + 1])
    end
  end
end

for k, first in pairs(again) do
  local o = out[first]
  if o[1] == 'ok' then
    local codes = {}
    for c = 2, #o do codes[#codes + 1] = o[c] end
    out[k] = {'exists', ids[first], records[first], bin_list(codes)}
  else
    out[k] = o
  end
end
return out
