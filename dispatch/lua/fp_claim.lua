-- fp_claim(keys=[bucket prefix], args=[seq, entries])   one {f:XX} shard
-- Claims fingerprints for batch seq.
-- KEYS[1]  d:{f:XX}:   the shard's prefix: bucket YY is the HASH KEYS[1] .. YY, field the
--                      fingerprint's last 14 bytes -> the seq of the batch that owns it
-- entries  runs of: 2 hex digits of the bucket, a count byte n, n 14-byte fields; the
--          fields are distinct. A run of one is an HSETNX; a longer run reads the bucket
--          once (HMGET) and writes the fields no batch has in one HSET.
-- returns  {pos, owner, ...} for each fingerprint not claimed now (pos: 1-based, in
--          entry order; owner: the seq of the batch that has it, this one's when it
--          claimed it before, as a resumed import does, another's for a duplicate).
--          Safe to run twice: the second run answers this seq for what the first claimed.
local seq, entries, prefix = ARGV[1], ARGV[2], KEYS[1]
local call, sub, byte = redis.call, string.sub, string.byte
local out, nout = {}, 0
local fields, new = {}, {}  -- reused by every run: only their first n / nnew slots count
local at, pos = 1, 0
while at <= #entries do
  local key, n = prefix .. sub(entries, at, at + 1), byte(entries, at + 2)
  at = at + 3
  if n == 1 then
    local field = sub(entries, at, at + 13)
    if call('HSETNX', key, field, seq) == 0 then
      out[nout + 1], out[nout + 2] = pos + 1, call('HGET', key, field)
      nout = nout + 2
    end
  else
    local nnew = 0
    for k = 1, n do fields[k] = sub(entries, at + 14 * k - 14, at + 14 * k - 1) end
    local owners = call('HMGET', key, unpack(fields, 1, n))
    for k = 1, n do
      if owners[k] then
        out[nout + 1], out[nout + 2] = pos + k, owners[k]
        nout = nout + 2
      else
        new[nnew + 1], new[nnew + 2] = fields[k], seq
        nnew = nnew + 2
      end
    end
    if nnew > 0 then call('HSET', key, unpack(new, 1, nnew)) end
  end
  pos = pos + n
  at = at + 14 * n
end
return out
