-- fpkey_swap(keys=[fpkey], args=[expected, replacement])
-- KEYS[1]  d:{g}:fpkey   the fingerprint key, wrapped under the master key
-- Re-wraps it after a master key rotation: a compare-and-set, so two rotations at
-- once cannot leave a key wrapped under a master key nobody kept.
-- returns 1 replaced | 0 it was not `expected` any more
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1
