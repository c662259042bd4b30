-- Shared head of the SKU scripts (prepended by dispatch/store/scripts.py).
-- KEYS of every SKU script, in order (dispatch.store.keys.SkuKeys):
--   1 meta  2 stats  3 queue (active batches)  4 dlv (delivery records)  5 chunks  6 void
--   7 dlv_codes (the codes of each delivery record)
-- ARGV[1] is always the pool prefix: a batch's pool is the LIST pool_prefix .. seq.

local POOL = ARGV[1]

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
