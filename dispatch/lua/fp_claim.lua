-- fp_claim(keys=[bucket...], args=[seq, field...])   all buckets of one {f:XX} shard
-- Claims fingerprints for batch seq; KEYS[i] holds field ARGV[i + 1].
-- returns per fingerprint: 0 claimed now, 1 claimed earlier by this batch (a resumed
-- import), 2 owned by another batch (a duplicate)
local seq = ARGV[1]
local out = {}
for k = 1, #KEYS do
  if redis.call('HSETNX', KEYS[k], ARGV[k + 1], seq) == 1 then
    out[k] = 0
  elseif redis.call('HGET', KEYS[k], ARGV[k + 1]) == seq then
    out[k] = 1
  else
    out[k] = 2
  end
end
return out
