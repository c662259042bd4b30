-- deliver(keys=[SKU keys x nS, account keys x nA],
--         args=[nS, nA, shard ids x nS, distributor ids x nA, n, gate (1: only verified distributors buy), 0,
--               nT, nT x terms (qty, allow_partial, unit_price, deadline),
--               n x (order_id, external_ref, record, where), margins (_margins.lua: m, m x (k, c, c margins))])
-- An order's shard, distributor and terms are numbers from 0 (their places in the
-- header), in one: where = (terms x n + shard) x n + distributor, n the call's orders.
-- The arguments are a tenth of Redis's work per order: so each distinct terms go once
-- a call, and the request's digest is read from its record, only where an external_ref
-- comes again.
-- On a Redis Cluster, whose EVAL refuses declared keys of several slots, the same keys
-- come in the args instead: keys=[the first of them, to route the call], and the 0
-- after gate is their count, followed by them (see "On a Redis Cluster" below).
-- A shard is a SKU, or a bucket of one ("SKU~B", see dispatch/store/keys.py).
-- Every purchase of one round, where one node holds every shard, delivered at once
-- (deadline 0) or reserved until deadline (ms): each order is checked (its
-- external_ref, its distributor, its SKU, its limits, its money) before it takes a code, then its
-- codes are taken and paid for (or its money held and its lease started) and
-- recorded, all in this one script, so a refused order never touches stock and no
-- order is ever half done. A reservation's codes are kept on both sides, as on a
-- cluster (take.lua, commit.lua), and it ends with settle.lua, both sides at once.
-- KEYS come in blocks of 8, the SKUs' then the accounts' (the keys of SkuKeys and
-- AcctKeys this script uses, in the order of DELIVER_SKU_KEYS and DELIVER_ACCT_KEYS,
-- dispatch/store/orders.py), in the order of the header's ids.
-- The record (delivered, version 1; or reserved, version 0) is packed by the engine for
-- qty codes; one that gets fewer (allow_partial) is repacked here.
-- The work is done once per SKU and per account, not per order: the pops, the
-- counters, the ledger entries, the records and the events go out in one command each.
-- A SKU with a batch past its sell-by has it retired before its orders are decided
-- (retire_due, _codes.lua): known from the counters read anyway, so no extra command
-- until one is due.
-- A sub-distributor's order is also refused while an ancestor is suspended or may not buy
-- its SKU, checked against its ancestors' limits as a ceiling, and once delivered credits
-- each ancestor its margin (_margins.lua); a reservation's margins are paid by settle.lua.
-- Safe to run twice: an order found by its external_ref is answered as it stands.
-- returns one flat array, per order: its status, the count of the fields that follow, and
-- those fields (a nested array per order costs Redis a tenth of the order's work):
--   "ok", n, code x n | "exists", 3, id, record, codes | "conflict", 1, id
--   | "unknown_distributor", 0 | "suspended", 0 | "not_allowed", 0 | "unknown_sku", 0
--   | "paused", 0 | "out_of_stock", 0 | "insufficient_balance", 1, spendable
--   | "verification_required", 0 | "limit_exceeded", 2, limit, left  (_limits.lua)
--   | "moved", 0 (see "On a Redis Cluster")
-- and after the orders, if a bucket is down to its threshold: "tell", n, its shard ids.
local nS, nA = tonumber(ARGV[1]), tonumber(ARGV[2])
local n = tonumber(ARGV[3 + nS + nA])
local gate = ARGV[4 + nS + nA] == '1'  -- only verified distributors may buy (_limits.lua)
local nK = tonumber(ARGV[5 + nS + nA])
local nT = tonumber(ARGV[6 + nS + nA + nK])
local FIRST = 7 + nS + nA + nK + nT * 4  -- the first order's first field
local META, STATS, QUEUE, DLV, BSTAT, SALES, SKU_EVENTS, DLV_CODES = 1, 2, 3, 4, 5, 6, 7, 8
local ACCT, LEDGER, REFS, ORDERS, CODES, INDEX, EVENTS, LEASES = 1, 2, 3, 4, 5, 6, 7, 8
-- On a Redis Cluster the shards of a call hash to several slots of one master. Each
-- shard's keys are touched before anything is written: a shard whose slot has moved
-- away, or is being moved (moving, _events.lua), is away, and its orders are answered
-- "moved" untouched, for the engine to send as sagas, which follow redirects.
local K = KEYS
local away = {}  -- block number (SKUs first, then accounts) -> true
if nK > 0 then
  K = {}
  for x = 1, nK do K[x] = ARGV[5 + nS + nA + x] end
  for b = 1, nS + nA do
    if moving(K[b * 8 - 7]) or type(redis.pcall('EXISTS', unpack(K, b * 8 - 7, b * 8))) == 'table' then
      away[b] = true
    end
  end
end
local function sk(s, k) return K[(s - 1) * 8 + k] end
local function ak(a, k) return K[(nS + a - 1) * 8 + k] end
local base, bucket = {}, {}
for s = 1, nS do
  local id = ARGV[2 + s]
  local tilde = string.find(id, '~', 1, true)  -- a bucket: the SKU it is of
  base[s], bucket[s] = tilde and string.sub(id, 1, tilde - 1) or id, tilde ~= nil
end
local now = now_ms()

-- Codes as the account's orders keep them: a msgpack array of bin strings. The SKU's
-- delivery record of a delivered order keeps its batches, not its codes: the account
-- has them (a reservation's codes are kept on both sides, take.lua).
local function bin(c)
  return (#c < 256 and string.char(0xc4, #c) or string.char(0xc5, math.floor(#c / 256), #c % 256)) .. c
end
local function bin_list(codes, from, to)
  local parts = {to - from < 15 and string.char(0x90 + to - from + 1)
                 or string.char(0xdc, math.floor((to - from + 1) / 256), (to - from + 1) % 256)}
  for c = from, to do parts[#parts + 1] = bin(codes[c]) end
  return table.concat(parts)
end

-- State of each SKU and account, read once, changed in memory, written once.
local skus, accts = {}, {}
local function sku(s)
  local st = skus[s]
  if not st then
    local m = redis.call('HMGET', sk(s, META), 'status', 'low_stock_threshold', 'min_shelf_life_s')
    local c = redis.call('HMGET', sk(s, STATS), 'available', 'level', 'sold', 'reserved', 'next_exp', 'others')
    local retired = 0
    if due(c[5], m[3], now) then retired = retire_due(sku_tag(sk(s, META)), now, m[3]) end
    st = {status = m[1], threshold = tonumber(m[2] or '0'), avail = tonumber(c[1] or '0') - retired,
          level = tonumber(c[2] or '0'), sold = tonumber(c[3] or '0'), reserved = tonumber(c[4] or '0'),
          total = 0, orders = {}, no = 0, changed = retired > 0,
          others = tonumber(c[6] or '0')}  -- what its buckets hold, if it is spread (sku_level.lua)
    skus[s] = st
  end
  return st
end
local now_s = int(now)
local function acct(a)
  local st = accts[a]
  if not st then
    local h = redis.call('HMGET', ak(a, ACCT), 'status', 'allowed', 'credit_limit', 'balance', 'held',
                         unpack(LIMIT_FIELDS))
    st = {status = h[1], allowed = h[2], credit = tonumber(h[3]) or 0, balance = tonumber(h[4]) or 0,
          limits = limits_of({unpack(h, 6, 5 + #LIMIT_FIELDS)}, now),
          limited = false, paid = 0,  -- paid: for purchases (count_spend, _limits.lua)
          held = tonumber(h[5]) or 0, moved = 0, moved_held = 0, entries = {}, ne = 0, records = {}, codes = {},
          refs = {}, nr = 0, opened = {}, delivered = {}, nd = 0, leases = {}, nl = 0}  -- n*: their lengths
    adopt(ak(a, ACCT), st)
    st.chain = chain_of(ak(a, ACCT))
    if st.chain then ceiling(st.limits, st.chain) end
    st.limited = any_limit(st.limits)
    accts[a] = st
  end
  return st
end

-- The call's terms, from 1.
local terms = {}
do
  local j = 7 + nS + nA + nK
  for t = 1, nT do
    terms[t] = {qty = tonumber(ARGV[j]), partial = ARGV[j + 1] == '1', price = tonumber(ARGV[j + 2]),
                deadline = ARGV[j + 3] ~= '0' and ARGV[j + 3]}
    j = j + 4
  end
end

-- 0. every external_ref of the call, looked up with one HMGET per account; each order's
-- where, read once (tonumber is strtod: dear), and once per distinct text
local earlier_id = {}
local wheres = sized(n)  -- k -> where
do
  local asked, read = {}, {}
  local j = FIRST
  for k = 1, n do
    local text = ARGV[j + 3]
    local w = read[text]
    if not w then w = tonumber(text); read[text] = w end
    wheres[k] = w
    local a = w % n + 1
    asked[a] = asked[a] or {}
    asked[a][#asked[a] + 1] = ARGV[j + 1]
    j = j + 4
  end
  for a = 1, nA do if away[nS + a] then asked[a] = nil end end
  for a, list in pairs(asked) do
    local found = redis.call('HMGET', ak(a, REFS), unpack(list))
    local mine = {}
    for x = 1, #list do if found[x] then mine[list[x]] = found[x] end end  -- (most are new)
    earlier_id[a] = mine
  end
end

-- 1. decide, in order. out[k]: the reply of an order refused or found; a taken one has none
-- yet, want[k] > 0 codes. An order's fields are read from ARGV where needed (its first at
-- FIRST + 4k - 4), its account and terms from its where: an array per field, grown order
-- by order, was dear.
local out, want, again = {}, sized(n), {}
local NN = n * n
local repacked = {}  -- k -> its record, packed again for fewer codes (allow_partial)
local function record_of(k) return repacked[k] or ARGV[FIRST + 4 * k - 2] end
local amounts = {}  -- amount -> its ledger text
local margins = read_margins(FIRST + n * 4)  -- k -> per code, root first: sub orders only
local function digest_of(record) return cmsgpack.unpack(record).digest end
local i = FIRST
for k = 1, n do
  local id, ref, w = ARGV[i], ARGV[i + 1], wheres[k]
  local a = w % n
  w = (w - a) / n
  local s = w % n
  local T = terms[(w - s) / n + 1]
  s, a = s + 1, a + 1
  local qty, partial, price = T.qty, T.partial, T.price
  want[k] = 0
  i = i + 4
  if away[s] or away[nS + a] then
    out[k] = {'moved'}
  else
    local A, S = accts[a] or acct(a), skus[s] or sku(s)
    local barred = A.chain and chain_refusal(A.chain, base[s])
    local first = A.opened[ref]
    if first then  -- the same external_ref twice in one call: the second is told of the first
      if digest_of(record_of(first)) == digest_of(record_of(k)) then again[k] = first
      else out[k] = {'conflict', ARGV[FIRST + 4 * first - 4]} end
    else
      local earlier = earlier_id[a][ref]
      if earlier then
        local rec = redis.call('HGET', ak(a, ORDERS), earlier)
        if digest_of(rec) == digest_of(record_of(k)) then
          out[k] = {'exists', earlier, rec, redis.call('HGET', ak(a, CODES), earlier) or ''}
        else
          out[k] = {'conflict', earlier}
        end
      elseif not A.status then out[k] = {'unknown_distributor'}
      elseif A.status ~= 'active' then out[k] = {'suspended'}
      elseif A.allowed ~= '*' and not string.find(',' .. A.allowed .. ',', ',' .. base[s] .. ',', 1, true) then
        out[k] = {'not_allowed'}
      elseif barred then out[k] = barred
      elseif gate and not A.limits.verified then out[k] = {'verification_required'}
      elseif not S.status then out[k] = {'unknown_sku'}
      elseif S.status ~= 'active' then out[k] = {'paused'}
      elseif S.avail == 0 or (S.avail < qty and not partial) then out[k] = {'out_of_stock'}
      else
        local take = math.min(qty, S.avail)
        local spendable = A.balance - A.held + A.credit
        local cost = take * price
        local over = A.limited and over_limit(A.limits, take, cost, false)
        if over then
          out[k] = over
        elseif cost > spendable then
          out[k] = {'insufficient_balance', int(spendable)}
        else
          if A.limited then spend(A.limits, cost) end
          want[k] = take
          S.avail, S.total = S.avail - take, S.total + take
          S.no = S.no + 1
          S.orders[S.no] = k
          if T.deadline then  -- a reservation: its money is held
            A.held, A.moved_held = A.held + cost, A.moved_held + cost
            A.ne = A.ne + 1
            A.entries[A.ne] = 'hold\031' .. id .. '\0310\031' .. int(cost) .. '\031' .. now_s
          else
            A.balance, A.moved, A.paid = A.balance - cost, A.moved - cost, A.paid + cost
            local amount = amounts[cost]
            if not amount then amount = int(-cost); amounts[cost] = amount end
            A.ne = A.ne + 1
            A.entries[A.ne] = 'purchase\031' .. id .. '\031' .. amount .. '\0310\031' .. now_s
            if margins[k] then pay_margins(A.chain, margins[k], take, id, 'margin') end
          end
          A.opened[ref] = k
        end
      end
    end
  end
end

-- 2. per SKU: take every code its orders need, oldest batch first, and hand them out
local to_tell = {}  -- the buckets whose stock the engine tells their SKU (sku_level.lua)
local hour = math.floor(now / 3600000)
local hour_s = int(hour)
-- state -> seq -> count -> the delivery record of that many codes of batch seq, packed once
local packed = {sold = {}, reserved = {}}
local got, from = {}, {}  -- a taken order's codes: got[k][from[k]] on, want[k] of them
local heads = {}        -- code length -> the msgpack head of a list of one code that long
for s, S in pairs(skus) do
  if S.total > 0 then
    local meta, stats = sk(s, META), sk(s, STATS)
    local pool = string.sub(meta, 1, -5) .. 'p:'
    local codes, seqs = pop_codes(sk(s, QUEUE), pool, stats, S.total)
    local dlv, dlv_codes, per_batch, nd, ndc = {}, {}, {}, 0, 0
    local held = 0  -- codes reserved
    local at = 1
    for _, k in ipairs(S.orders) do
      local w, j, where = want[k], FIRST + 4 * k - 4, wheres[k]
      local id, T = ARGV[j], terms[(where - where % NN) / NN + 1]
      local last = at + w - 1
      local seq, rec = seqs[at]
      local st = T.deadline and 'reserved' or 'sold'
      if seqs[last] == seq then  -- codes of one batch (pop_codes gives each batch's codes together)
        local of_batch = packed[st][seq]
        if not of_batch then of_batch = {}; packed[st][seq] = of_batch end
        rec = of_batch[w]
        if not rec then
          rec = cmsgpack.pack(st == 'sold' and {st = st, b = {seq, w}, h = hour} or {st = st, b = {seq, w}})
          of_batch[w] = rec
        end
        if st == 'sold' then per_batch[seq] = (per_batch[seq] or 0) + w end
      else
        if st == 'sold' then
          for c = at, last do per_batch[seqs[c]] = (per_batch[seqs[c]] or 0) + 1 end
        end
        rec = cmsgpack.pack(st == 'sold' and {st = st, b = runs_of(seqs, at, last), h = hour}
                            or {st = st, b = runs_of(seqs, at, last)})
      end
      if st == 'reserved' then  -- the SKU keeps the codes too, to put them back on sale
        local c = codes[at]
        local kept_here
        if w == 1 then
          kept_here = string.char(math.floor(#c / 256), #c % 256) .. c
        else
          local mine = {}
          for x = at, last do mine[#mine + 1] = codes[x] end
          kept_here = pack_codes(mine)
        end
        dlv_codes[ndc + 1], dlv_codes[ndc + 2] = id, kept_here
        ndc = ndc + 2
        held = held + w
      end
      dlv[nd + 1], dlv[nd + 2] = id, rec
      nd = nd + 2
      local c, kept = codes[at]
      if w == 1 and #c < 256 then  -- the common case, in one concatenation
        local head = heads[#c]
        if not head then head = '\145\196' .. string.char(#c); heads[#c] = head end
        kept = head .. c
      else
        kept = bin_list(codes, at, last)
      end
      got[k], from[k] = codes, at
      at = last + 1
      local A = accts[where % n + 1]
      local record = ARGV[j + 2]
      if w < T.qty then  -- allow_partial: fewer codes than asked for
        local r = cmsgpack.unpack(record)
        r.delivered, r.total = w, w * T.price
        if T.deadline then r.hold = r.total end
        record = cmsgpack.pack(r)
        repacked[k] = record
      end
      local m = A.nr
      A.records[m + 1], A.records[m + 2] = id, record
      A.codes[m + 1], A.codes[m + 2] = id, kept
      A.refs[m + 1], A.refs[m + 2] = ARGV[j + 1], id
      A.nr = m + 2
      if T.deadline then
        A.leases[A.nl + 1], A.leases[A.nl + 2] = T.deadline, id
        A.nl = A.nl + 2
      else
        A.nd = A.nd + 1
        A.delivered[A.nd] = record
      end
    end
    push('HSET', sk(s, DLV), dlv)
    if held > 0 then push('HSET', sk(s, DLV_CODES), dlv_codes) end
    redis.call('HSET', stats, 'available', int(S.avail), 'sold', int(S.sold + S.total - held),
               'reserved', int(S.reserved + held))
    for seq, c in pairs(per_batch) do redis.call('HINCRBY', sk(s, BSTAT), seq .. ':d', int(c)) end
    if S.total > held then redis.call('HINCRBY', sk(s, SALES), hour_s, int(S.total - held)) end
    S.changed = true
  end
  if not S.changed then  -- (no code left it, none was retired)
  elseif bucket[s] then
    -- A bucket keeps no level: the engine tells the SKU's own shard what it holds
    -- (sku_level.lua), after a purchase only when it is down to the threshold. Above it
    -- the whole SKU is too, and was before (a purchase only takes), so its level stands;
    -- and the SKU can only reach a level once every bucket is down to it, each told.
    if S.avail <= S.threshold then
      redis.call('HINCRBY', sk(s, STATS), 'chg', '1')
      to_tell[#to_tell + 1] = ARGV[2 + s]
    end
  else
    set_level(sk(s, META), sk(s, STATS), sk(s, SKU_EVENTS), S.avail + S.others, S.threshold, S.level)
  end
end

-- 3. per account: the money, the records, the events
for a, A in pairs(accts) do
  if A.ne > 0 then
    if A.moved ~= 0 then redis.call('HINCRBY', ak(a, ACCT), 'balance', int(A.moved)) end
    if A.moved_held ~= 0 then redis.call('HINCRBY', ak(a, ACCT), 'held', int(A.moved_held)) end
    local spent = spent_fields(A.limits)
    if spent then redis.call('HSET', ak(a, ACCT), unpack(spent)) end
    if A.paid > 0 then count_spend(ak(a, ACCT), A.limits, A.paid) end
    push('RPUSH', ak(a, LEDGER), close_entries(A.entries, A.balance, A.held, now_s))
    push('HSET', ak(a, ORDERS), A.records)
    push('HSET', ak(a, CODES), A.codes)
    push('HSET', ak(a, REFS), A.refs)
    push('ZADD', ak(a, INDEX), index_entries(A.records, 2))
    if A.nl > 0 then push('ZADD', ak(a, LEASES), A.leases) end
    if A.nd > 0 then emit_records(ak(a, EVENTS), 'order.delivered', A.delivered) end
  end
end
flush_payees()

-- 4. the reply
local reply, r = {}, 0
for k = 1, n do
  local f = again[k]
  if f and got[f] then
    local codes = bin_list(got[f], from[f], from[f] + want[f] - 1)
    r = tell(reply, {'exists', ARGV[FIRST + 4 * f - 4], record_of(f), codes}, r)
  elseif f then
    r = tell(reply, out[f], r)
  elseif got[k] then
    local codes, w = got[k], want[k]
    reply[r + 1], reply[r + 2] = 'ok', w
    if w == 1 then reply[r + 3] = codes[from[k]]  -- the common case
    else for c = 1, w do reply[r + 2 + c] = codes[from[k] + c - 1] end end
    r = r + 2 + w
  else
    r = tell(reply, out[k], r)
  end
end
if #to_tell > 0 then tell(reply, {'tell', unpack(to_tell)}, r) end
return reply
