-- Shared head of the scripts that move codes (prepended by dispatch/store/scripts.py).

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
