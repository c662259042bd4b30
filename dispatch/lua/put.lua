-- put(keys=[hash], args=[mode, field, value, ...])   mode: create | update
-- Writes fields of a record HASH: create only if it does not exist, update only if it does.
-- returns "ok" | "exists" | "not_found"
local exists = redis.call('EXISTS', KEYS[1]) == 1
if ARGV[1] == 'create' and exists then return 'exists' end
if ARGV[1] == 'update' and not exists then return 'not_found' end
if #ARGV > 1 then redis.call('HSET', KEYS[1], unpack(ARGV, 2)) end
return 'ok'
