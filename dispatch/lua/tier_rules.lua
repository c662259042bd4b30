-- tier_rules(keys=[tierrules], args=[rules])
-- Stores the volume tier rules (msgpack TierRules) under the next version: rules set
-- at once get versions in the order they are stored, so the last stored has the
-- highest (tier_apply.lua ignores rules older than an account was decided by).
-- returns the version
local version = redis.call('HINCRBY', KEYS[1], 'v', 1)
redis.call('HSET', KEYS[1], 'rules', ARGV[1])
return version
