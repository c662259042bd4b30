-- Shared head of the SKU scripts (prepended by dispatch/store/scripts.py).
-- KEYS of every SKU script, in order (dispatch.store.keys.SkuKeys):
--   1 meta  2 stats  3 queue (active batches)  4 dlv (delivery records)  5 chunks  6 void
--   7 dlv_codes (the codes of each delivery record)  8 batch_stats  9 parked  10 sales
--   11 scores (sale priority per batch)  12 events  13 expq (expiring batches)  14 expired (retired batches)
-- ARGV[1] is always the pool prefix: a batch's pool is the LIST pool_prefix .. seq.

local POOL = ARGV[1]
if moving(KEYS[1]) then return redis.error_reply(MOVING) end

-- A batch's place in the sale order: lowest first; oldest first unless scored.
local function score_of(seq)
  return redis.call('HGET', KEYS[11], seq) or seq
end

-- Pops total codes from the batches on sale, best placed first (see pop_codes).
local function take_codes(total)
  return pop_codes(KEYS[3], POOL, KEYS[2], total)
end

local SKU = sku_keys(KEYS, POOL)

local function count_sold(runs)
  count_sold_in(SKU, runs)
end

-- Retires the SKU's batches past their sell-by if one is due (see retire_due); true if it did.
local function retire_if_due()
  local next_exp = redis.call('HGET', KEYS[2], 'next_exp')
  if not next_exp then return false end
  local shelf = redis.call('HGET', KEYS[1], 'min_shelf_life_s')
  if not due(next_exp, shelf, now_ms()) then return false end
  retire_due(sku_tag(KEYS[1]), now_ms(), shelf)
  return true
end

-- The SKU's stock level after a change (see set_level). A bucket of a SKU spread over
-- several (shard "SKU~B") keeps no level: it counts its changes (chg) and the engine
-- tells the SKU's own shard what the bucket holds (sku_level.lua), whose level is then
-- set from its own codes on sale and what the buckets told it last (others).
local function check_level()
  if string.find(KEYS[1], '~%d+}') then
    redis.call('HINCRBY', KEYS[2], 'chg', '1')
    return
  end
  local c = redis.call('HMGET', KEYS[2], 'available', 'others')
  set_level(KEYS[1], KEYS[2], KEYS[12], tonumber(c[1] or '0') + tonumber(c[2] or '0'))
end

