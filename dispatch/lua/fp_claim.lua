-- fp_claim(keys=[bucket prefix], args=[seq, entries])   one {f:XX} shard
-- Claims fingerprints for batch seq.
-- KEYS[1]  d:{f:XX}:   the shard's prefix: bucket YY is the HASH KEYS[1] .. YY, field the
--                      fingerprint's last 14 bytes -> the seq of the batch that owns it
-- entries  runs of: 2 hex digits of the bucket, a count byte n, n 14-byte fields; the
--          fields are distinct. A run of one is an HSETNX; a longer run reads the bucket
--          once (HMGET) and writes the fields no batch has in one HSET.
-- returns  {pos, status, ...} for each fingerprint not claimed now (pos: 1-based, in
--          entry order): 1 claimed earlier by this batch (a resumed import), 2 owned by
--          another batch (a duplicate). Safe to run twice: the second run answers 1 for
--          what the first claimed.
local seq, entries, prefix = ARGV[1], ARGV[2], KEYS[1]
local out = {}
local at, pos = 1, 0
while at <= #entries do
  local key, n = prefix .. string.sub(entries, at, at + 1), string.byte(entries, at + 2)
  at = at + 3
  if n == 1 then
    local field = string.sub(entries, at, at + 13)
    if redis.call('HSETNX', key, field, seq) == 0 then
      out[#out + 1] = pos + 1
      out[#out + 1] = redis.call('HGET', key, field) == seq and 1 or 2
    end
  else
    local fields, new = {}, {}
    for k = 1, n do fields[k] = string.sub(entries, at + 14 * (k - 1), at + 14 * k - 1) end
    local owners = redis.call('HMGET', key, unpack(fields))
    for k = 1, n do
      if owners[k] then
        out[#out + 1] = pos + k
        out[#out + 1] = owners[k] == seq and 1 or 2
      else
        new[#new + 1] = fields[k]
        new[#new + 1] = seq
      end
    end
    if #new > 0 then redis.call('HSET', key, unpack(new)) end
  end
  pos = pos + n
  at = at + 14 * n
end
return out
