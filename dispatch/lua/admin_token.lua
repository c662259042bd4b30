-- admin_token(keys=[admins, adminkeys], args=["create", name, token_hash, record] | ["revoke", name])
-- KEYS[1]  d:{g}:admins     HASH name -> msgpack record (its token_hash among its fields)
-- KEYS[2]  d:{g}:adminkeys  HASH sha256(token) -> name
-- create: a new named token (a name is never reused while it exists); revoke: both
-- entries go at once, so the token is refused by every process from the next request.
-- returns "ok" | "exists" | "not_found"; safe to run twice (a repeat answers exists / not_found)
if ARGV[1] == 'create' then
  if redis.call('HEXISTS', KEYS[1], ARGV[2]) == 1 then return 'exists' end
  redis.call('HSET', KEYS[1], ARGV[2], ARGV[4])
  redis.call('HSET', KEYS[2], ARGV[3], ARGV[2])
  return 'ok'
end
local rec = redis.call('HGET', KEYS[1], ARGV[2])
if not rec then return 'not_found' end
redis.call('HDEL', KEYS[2], cmsgpack.unpack(rec)[2])
redis.call('HDEL', KEYS[1], ARGV[2])
return 'ok'
