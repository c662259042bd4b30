-- Shared head of the SKU scripts (prepended by dispatch/store/scripts.py).
-- KEYS of every SKU script, in order (dispatch.store.keys.SkuKeys):
--   1 meta  2 stats  3 queue (active batches)  4 dlv (delivery records)  5 chunks  6 void
--   7 dlv_codes (the codes of each delivery record)  8 batch_stats  9 parked  10 sales
--   11 scores (sale priority per batch)  12 events
-- ARGV[1] is always the pool prefix: a batch's pool is the LIST pool_prefix .. seq.

local POOL = ARGV[1]

-- A batch's place in the sale order: lowest first; oldest first unless scored.
local function score_of(seq)
  return redis.call('HGET', KEYS[11], seq) or seq
end

-- Pops total codes from the batches on sale, best placed first.
-- returns the codes and, for each, its batch seq
local function take_codes(total)
  local codes, seqs = {}, {}
  while #codes < total do
    local head = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
    if not head then
      error({err = 'ERR stats.available of ' .. KEYS[2] .. ' exceeds the pools'})
    end
    local need = total - #codes
    local got = redis.call('LPOP', POOL .. head, need)
    if got then
      local seq = tonumber(head)
      for _, c in ipairs(got) do
        codes[#codes + 1] = c
        seqs[#seqs + 1] = seq
      end
    end
    if not got or #got < need then redis.call('ZREM', KEYS[3], head) end
  end
  return codes, seqs
end

-- Codes sold, per batch ({seq, count, seq, count...}) and per hour (restock forecasts).
local function count_sold(runs)
  local n, per = 0, {}
  for j = 1, #runs, 2 do
    per[runs[j]] = (per[runs[j]] or 0) + runs[j + 1]
    n = n + runs[j + 1]
  end
  for seq, c in pairs(per) do redis.call('HINCRBY', KEYS[8], seq .. ':d', c) end
  if n > 0 then redis.call('HINCRBY', KEYS[10], math.floor(now_ms() / 3600000), n) end
end

-- The stock level (in, low, out) with hysteresis: once low, a SKU is back "in" only
-- above threshold + 10% (at least 1), so stock wobbling around the threshold raises
-- one alert per crossing, not one per order. Each change is an event.
-- Kept in stats as a number (the counters there are all integers): 0 out, 1 low, 2 in.
local LEVELS = {[0] = 'out', [1] = 'low', [2] = 'in'}
local LEVEL_EVENT = {[0] = 'stock.out', [1] = 'stock.low', [2] = 'stock.restored'}
local function check_level()
  local sku = string.match(KEYS[1], '{s:(.*)}')
  local avail = tonumber(redis.call('HGET', KEYS[2], 'available') or '0')
  local threshold = tonumber(redis.call('HGET', KEYS[1], 'low_stock_threshold') or '0')
  local was = tonumber(redis.call('HGET', KEYS[2], 'level') or '0')
  local now
  if avail <= 0 then now = 0
  elseif avail <= threshold then now = 1
  elseif was == 2 or avail > threshold + math.max(1, math.floor(threshold / 10)) then now = 2
  else now = 1  -- in the band above the threshold: not yet re-armed
  end
  if now ~= was then
    redis.call('HSET', KEYS[2], 'level', now)
    local v = redis.call('HINCRBY', KEYS[2], 'ver', 1)
    emit(KEYS[12], LEVEL_EVENT[now], 'stock:' .. sku, v,
         {sku = sku, level = LEVELS[now], was = LEVELS[was], available = avail, threshold = threshold})
  end
end
