-- Shared head of the scripts that move codes and stock (prepended by dispatch/store/scripts.py).

-- Codes of a delivery record: binary strings, each behind a 2-byte big-endian length
-- (not cmsgpack, whose str type Python would have to read as UTF-8).
local function pack_codes(codes)
  local parts = {}
  for k, c in ipairs(codes) do parts[k] = string.char(math.floor(#c / 256), #c % 256) .. c end
  return table.concat(parts)
end

local function unpack_codes(s)
  local out, pos = {}, 1
  while pos < #s do
    local hi, lo = string.byte(s, pos, pos + 1)
    local n = hi * 256 + lo
    out[#out + 1] = string.sub(s, pos + 2, pos + 1 + n)
    pos = pos + 2 + n
  end
  return out
end

-- The batches a run of codes came from, as {seq, count, seq, count...} in code order.
local function runs_of(seqs, from, to)
  local runs = {}
  for c = from, to do
    if runs[#runs - 1] == seqs[c] then
      runs[#runs] = runs[#runs] + 1
    else
      runs[#runs + 1] = seqs[c]
      runs[#runs + 1] = 1
    end
  end
  return runs
end

-- Pops total codes from a SKU's batches on sale, best placed first: queue is its
-- ZSET of batch seqs by sale priority, pool the prefix of its batch LISTs.
-- returns the codes and, for each, its batch seq
local function pop_codes(queue, pool, stats, total)
  local codes, seqs, n = {}, {}, 0
  while n < total do
    local head = redis.call('ZRANGE', queue, 0, 0)[1]
    if not head then
      error({err = 'ERR stats.available of ' .. stats .. ' exceeds the pools'})
    end
    local need = total - n
    local got = redis.call('LPOP', pool .. head, int(need))
    if got then
      local seq = tonumber(head)
      for x, c in ipairs(got) do
        codes[n + x], seqs[n + x] = c, seq
      end
      n = n + #got
    end
    if not got or #got < need then redis.call('ZREM', queue, head) end
  end
  return codes, seqs
end

-- A SKU's stock level (in, low, out) with hysteresis: once low, it is back "in" only
-- above threshold + 10% (at least 1), so stock wobbling around the threshold raises
-- one alert per crossing, not one per order. Each change is an event on its stream.
-- Kept in stats as a number (the counters there are all integers): 0 out, 1 low, 2 in.
local LEVELS = {[0] = 'out', [1] = 'low', [2] = 'in'}
local LEVEL_EVENT = {[0] = 'stock.out', [1] = 'stock.low', [2] = 'stock.restored'}
-- threshold and was (the level before) are read here unless the caller has them.
local function set_level(meta, stats, events, avail, threshold, was)
  local sku = string.match(meta, '{s:(.*)}')
  threshold = threshold or tonumber(redis.call('HGET', meta, 'low_stock_threshold') or '0')
  was = was or tonumber(redis.call('HGET', stats, 'level') or '0')
  local now
  if avail <= 0 then now = 0
  elseif avail <= threshold then now = 1
  elseif was == 2 or avail > threshold + math.max(1, math.floor(threshold / 10)) then now = 2
  else now = 1  -- in the band above the threshold: not yet re-armed
  end
  if now ~= was then
    redis.call('HSET', stats, 'level', int(now))
    local v = redis.call('HINCRBY', stats, 'ver', '1')
    emit(events, LEVEL_EVENT[now], 'stock:' .. sku, v,
         {sku = sku, level = LEVELS[now], was = LEVELS[was], available = avail, threshold = threshold})
  end
end

-- Expiry. A batch's codes share one expiry (an import is split into sub-batches by
-- expiry); a code is sold only before its sell-by, expiry - the SKU's min_shelf_life_s.
-- Batches past it are retired: their pools dropped and counted expired, so no code is
-- ever sold after it. stats.next_exp (the earliest expiry still in expq) is read with
-- the counters a script reads anyway, so retiring costs nothing until one is due.
-- The SKU's tag prefix t names the keys (as dispatch/store/keys.py does).
local function sku_tag(meta)
  return string.sub(meta, 1, -5)  -- 'd:{s:ID}:' from 'd:{s:ID}:meta'
end

local function due(next_exp, shelf_s, now)
  return next_exp ~= nil and next_exp ~= false and tonumber(next_exp) - tonumber(shelf_s or '0') * 1000 <= now
end

-- Retires every batch of the SKU (tag t) past its sell-by. returns the codes that left available
local function retire_due(t, now, shelf_s)
  local stats, expq = t .. 'stats', t .. 'expq'
  local seqs = redis.call('ZRANGEBYSCORE', expq, '-inf', int(now + tonumber(shelf_s or '0') * 1000))
  local avail, parked, all = 0, 0, 0
  for _, seq in ipairs(seqs) do
    if redis.call('SISMEMBER', t .. 'void', seq) == 0 then
      local pool = t .. 'p:' .. seq
      local n = redis.call('LLEN', pool)
      if n > 0 then
        redis.call('DEL', pool)
        if redis.call('SISMEMBER', t .. 'parked', seq) == 1 then parked = parked + n else avail = avail + n end
        redis.call('HINCRBY', t .. 'bstat', seq .. ':e', int(n))
        all = all + n
      end
      redis.call('SADD', t .. 'expired', seq)
    end
    redis.call('ZREM', t .. 'bq', seq)
  end
  if #seqs > 0 then push('ZREM', expq, seqs) end
  if avail > 0 then redis.call('HINCRBY', stats, 'available', int(-avail)) end
  if parked > 0 then redis.call('HINCRBY', stats, 'parked', int(-parked)) end
  if all > 0 then redis.call('HINCRBY', stats, 'expired', int(all)) end
  local head = redis.call('ZRANGE', expq, 0, 0, 'WITHSCORES')
  if head[2] then redis.call('HSET', stats, 'next_exp', head[2]) else redis.call('HDEL', stats, 'next_exp') end
  return avail
end

-- A SKU's keys by name, for code shared by the SKU scripts (KEYS) and the scripts of
-- the node that holds every shard (which name a SKU's keys from its id).
local SKU_KEY_NAMES = {'meta', 'stats', 'queue', 'dlv', 'chunks', 'void', 'dlv_codes', 'batch_stats', 'parked',
                       'sales', 'scores', 'events', 'expq', 'expired'}
local function sku_keys(list, pool)
  local k = {pool = pool}
  for j, name in ipairs(SKU_KEY_NAMES) do k[name] = list[j] end
  return k
end

-- Codes sold, per batch ({seq, count, seq, count...}) and per hour (restock forecasts).
local function count_sold_in(k, runs)
  local n, per = 0, {}
  for j = 1, #runs, 2 do
    per[runs[j]] = (per[runs[j]] or 0) + runs[j + 1]
    n = n + runs[j + 1]
  end
  for seq, c in pairs(per) do redis.call('HINCRBY', k.batch_stats, seq .. ':d', int(c)) end
  if n > 0 then redis.call('HINCRBY', k.sales, int(math.floor(now_ms() / 3600000)), int(n)) end
end

-- The SKU side of ending reservations, after their accounts decided: sell (reserved
-- codes become sold) or return (back to the head of their batch's pool, or counted
-- voided if the batch was voided meanwhile, parked if it was parked). The delivery
-- record's state says what was done, so it is safe to run twice. The counters and the
-- records of a call's orders are written once, by flush_settled(k, acc); acc is
-- new_settled() of that SKU.
-- returns "ok" | "again" | "not_found" | "invalid_state"
local SETTLED = {sell = 'sold', ['return'] = 'returned'}
local function new_settled()
  return {sold = 0, reserved = 0, per = {}, records = {}, n = 0, done = {}, memo = {}}  -- n: of records
end

local function settle_codes(k, id, action, acc)
  local raw = acc.done[id] or redis.call('HGET', k.dlv, id)
  if not raw then return 'not_found' end
  local m = acc.memo[raw]  -- the same record (same batch and count) is read once a call
  if not m then
    m = cmsgpack.unpack(raw)
    m.n = 0
    for j = 2, #(m.b or {}), 2 do m.n = m.n + m.b[j] end
    acc.memo[raw] = m
  end
  if m.st == SETTLED[action] then return 'again' end
  if m.st ~= 'reserved' then return 'invalid_state' end
  local b = m.b
  if action == 'sell' then
    acc.sold = acc.sold + m.n
    for j = 1, #b, 2 do acc.per[b[j]] = (acc.per[b[j]] or 0) + b[j + 1] end
  else
    local codes = unpack_codes(redis.call('HGET', k.dlv_codes, id))
    local at = 1
    for j = 1, #b, 2 do
      local seq, count = b[j], b[j + 1]
      if redis.call('SISMEMBER', k.void, seq) == 1 then
        redis.call('HINCRBY', k.stats, 'voided', int(count))
      elseif redis.call('SISMEMBER', k.expired, seq) == 1 then  -- retired meanwhile: past its sell-by
        redis.call('HINCRBY', k.stats, 'expired', int(count))
        redis.call('HINCRBY', k.batch_stats, seq .. ':e', int(count))
      else
        local back = {}
        for c = at + count - 1, at, -1 do back[#back + 1] = codes[c] end
        push('LPUSH', k.pool .. seq, back)
        if redis.call('SISMEMBER', k.parked, seq) == 1 then
          redis.call('HINCRBY', k.stats, 'parked', int(count))
        else
          redis.call('ZADD', k.queue, 'NX', redis.call('HGET', k.scores, seq) or seq, seq)
          redis.call('HINCRBY', k.stats, 'available', int(count))
        end
      end
      at = at + count
    end
  end
  acc.reserved = acc.reserved + m.n
  local key = SETTLED[action] .. raw
  local packed = acc.memo[key]
  if not packed then
    local r = {}
    for f, v in pairs(m) do if f ~= 'n' then r[f] = v end end
    r.st = SETTLED[action]
    packed = cmsgpack.pack(r)
    acc.memo[key] = packed
  end
  acc.done[id] = packed
  acc.records[acc.n + 1], acc.records[acc.n + 2] = id, packed
  acc.n = acc.n + 2
  return 'ok'
end

local function flush_settled(k, acc)
  if acc.n == 0 then return end
  push('HSET', k.dlv, acc.records)
  redis.call('HINCRBY', k.stats, 'reserved', int(-acc.reserved))
  if acc.sold > 0 then
    redis.call('HINCRBY', k.stats, 'sold', int(acc.sold))
    for seq, c in pairs(acc.per) do redis.call('HINCRBY', k.batch_stats, seq .. ':d', int(c)) end
    redis.call('HINCRBY', k.sales, int(math.floor(now_ms() / 3600000)), int(acc.sold))
  end
end
