-- Shared head of the scripts that move codes and stock (prepended by dispatch/store/scripts.py).

-- Lua's unpack() is bounded by the C stack: push long lists in slices.
local function push(cmd, key, list)
  for s = 1, #list, 1000 do
    redis.call(cmd, key, unpack(list, s, math.min(s + 999, #list)))
  end
end

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
  local codes, seqs = {}, {}
  while #codes < total do
    local head = redis.call('ZRANGE', queue, 0, 0)[1]
    if not head then
      error({err = 'ERR stats.available of ' .. stats .. ' exceeds the pools'})
    end
    local need = total - #codes
    local got = redis.call('LPOP', pool .. head, need)
    if got then
      local seq = tonumber(head)
      for _, c in ipairs(got) do
        codes[#codes + 1] = c
        seqs[#seqs + 1] = seq
      end
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
    redis.call('HSET', stats, 'level', now)
    local v = redis.call('HINCRBY', stats, 'ver', 1)
    emit(events, LEVEL_EVENT[now], 'stock:' .. sku, v,
         {sku = sku, level = LEVELS[now], was = LEVELS[was], available = avail, threshold = threshold})
  end
end
