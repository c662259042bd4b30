-- unpend(keys=account keys, args=[n, order_id...])
-- Orders (or tickets) whose saga is done leave the account's pending set, so the
-- sweep no longer looks at them. Safe to run twice.
-- returns per order: "ok"
local out = {}
local ids = {}
for k = 1, tonumber(ARGV[1]) do
  ids[k] = ARGV[k + 1]
  out[k] = 'ok'
end
for s = 1, #ids, 1000 do redis.call('ZREM', KEYS[8], unpack(ids, s, math.min(s + 999, #ids))) end
return out
