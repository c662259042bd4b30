-- take(keys=SKU keys, args=[pool_prefix, n, n x (order_id, qty, allow_partial, sell)])
-- The SKU step of a purchase saga, after its account's begin: pops its codes, best
-- placed batch first (lowest score in the queue), and counts them reserved (a
-- reservation) or, with sell = 1 (a purchase in deliver mode on a cluster), sold at
-- once, as deliver.lua does.
-- The decision is recorded per order in the delivery records, so the step is safe
-- to run twice (and a recovery sweep racing the original request gets the same
-- answer): a second run returns the same codes, or the same refusal.
-- An order takes exactly qty codes or none; with allow_partial, 1..qty.
-- The work is done once per call, not per order: one pass decides, one run of
-- LPOPs takes every code the call needs, one HSET records every decision.
-- Stock crossing its low or out level is told on the SKU's event stream.
-- Batches past their sell-by are retired first (retire_if_due), so none of their codes is taken.
-- returns, flat (_events.lua), per order: {"ok", code...} | {"out_of_stock"} | {"paused"} | {"unknown_sku"}
local retired = retire_if_due()
local status = redis.call('HGET', KEYS[1], 'status')
local avail = tonumber(redis.call('HGET', KEYS[2], 'available') or '0')
local n = tonumber(ARGV[2])

-- 1. decide, in order
local ids, want, out = {}, {}, {}
local first, again = {}, {}  -- an order twice in one call (a sweep racing its request)
local sells = {}
local total = 0
local records = {}   -- HSET dlv field value ...
local earlier = {}   -- each order's delivery record from an earlier run, read with one HMGET
do
  local asked = {}
  for k = 1, n do asked[k] = ARGV[3 + (k - 1) * 4] end
  if n > 0 then earlier = redis.call('HMGET', KEYS[4], unpack(asked)) end
end
local i = 3
for k = 1, n do
  local id, qty, partial = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2] == '1'
  sells[k] = ARGV[i + 3] == '1'
  i = i + 4
  ids[k], want[k] = id, 0
  local raw = earlier[k]
  if first[id] then
    again[k] = first[id]
  elseif raw then
    local r = cmsgpack.unpack(raw)
    if r.st == 'failed' then
      out[k] = {r.why}
    else
      out[k] = unpack_codes(redis.call('HGET', KEYS[7], id))
      table.insert(out[k], 1, 'ok')
    end
  else
    local why
    if not status then why = 'unknown_sku'
    elseif status ~= 'active' then why = 'paused'
    elseif avail == 0 or (avail < qty and not partial) then why = 'out_of_stock'
    end
    if why then
      records[#records + 1] = id
      records[#records + 1] = cmsgpack.pack({st = 'failed', why = why})
      out[k] = {why}
    else
      want[k] = math.min(qty, avail)
      avail = avail - want[k]
      total = total + want[k]
    end
  end
  first[id] = first[id] or k
end

-- 2. take every code the call needs, batch by batch
local codes, seqs = take_codes(total)

-- 3. hand them out, in order
local packed = {}    -- HSET dlv_codes field value ...
local sold, sold_runs = 0, {}
local sold_records = {}  -- "seq:count" -> its delivery record
local hour = math.floor(now_ms() / 3600000)
local at = 1
for k = 1, n do
  if want[k] > 0 then
    local mine, runs = {}, runs_of(seqs, at, at + want[k] - 1)
    for c = at, at + want[k] - 1 do mine[#mine + 1] = codes[c] end
    at = at + want[k]
    records[#records + 1] = ids[k]
    if sells[k] then
      local one = #runs == 2 and runs[1] .. ':' .. runs[2]  -- codes of one batch: packed once a call
      local rec = one and sold_records[one]
      if not rec then
        rec = cmsgpack.pack({st = 'sold', b = runs, h = hour})
        if one then sold_records[one] = rec end
      end
      records[#records + 1] = rec
      sold = sold + want[k]
      for r = 1, #runs do sold_runs[#sold_runs + 1] = runs[r] end
    else
      records[#records + 1] = cmsgpack.pack({st = 'reserved', b = runs})
    end
    packed[#packed + 1] = ids[k]
    packed[#packed + 1] = pack_codes(mine)
    table.insert(mine, 1, 'ok')
    out[k] = mine
  end
end
for k, f in pairs(again) do out[k] = out[f] end
if #records > 0 then push('HSET', KEYS[4], records) end
if #packed > 0 then push('HSET', KEYS[7], packed) end
if total > 0 then
  redis.call('HINCRBY', KEYS[2], 'available', int(-total))
  if total > sold then redis.call('HINCRBY', KEYS[2], 'reserved', int(total - sold)) end
  if sold > 0 then
    redis.call('HINCRBY', KEYS[2], 'sold', int(sold))
    count_sold(sold_runs)
  end
  check_level()
elseif retired then
  check_level()
end
return flat(out)
