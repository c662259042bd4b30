-- rotate_key(keys=[apikeys, keyof], args=[distributor, key_hash])
-- Makes key_hash the distributor's only API key: the previous one stops working at once.
-- returns "ok"
local old = redis.call('HGET', KEYS[2], ARGV[1])
if old then redis.call('HDEL', KEYS[1], old) end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 'ok'
