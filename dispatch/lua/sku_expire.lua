-- sku_expire(keys=SKU keys, args=[pool_prefix, window_ms, alert_codes, others])
-- For the sweep: retires the SKU's batches past their sell-by (retire_due, _codes.lua;
-- the scripts that take codes retire them too before they decide, so this keeps the
-- figures of a SKU that does not sell current), then counts the codes on sale that
-- reach their sell-by within window_ms (stats.expiring). When that count, plus others
-- (what the SKU's other buckets counted just before), reaches alert_codes (0: never) a
-- stock.expiring event is told, once until it falls below. A bucket of a SKU spread over
-- several is run with alert_codes 0: the SKU's own shard tells the event.
-- Safe to run twice.
-- returns {retired (1 or 0), codes expiring within the window}
local window_ms, alert_codes, others = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local retired = retire_if_due()
local shelf = tonumber(redis.call('HGET', KEYS[1], 'min_shelf_life_s') or '0')
local soon = redis.call('ZRANGEBYSCORE', KEYS[13], '-inf', int(now_ms() + shelf * 1000 + window_ms))
local n = 0
for _, seq in ipairs(soon) do
  if redis.call('SISMEMBER', KEYS[9], seq) == 0 then n = n + redis.call('LLEN', POOL .. seq) end
end
-- written only when it changed: the sweep runs this for every SKU every sweep_interval_s
local before = redis.call('HMGET', KEYS[2], 'expiring', 'expiring_alert')
local was = before[2] == '1'
local alert = alert_codes > 0 and n + others >= alert_codes
if tonumber(before[1] or '0') ~= n or was ~= alert then
  redis.call('HSET', KEYS[2], 'expiring', int(n), 'expiring_alert', alert and '1' or '0')
end
if alert and not was then
  local sku = string.match(KEYS[1], '{s:(.*)}')
  emit(KEYS[12], 'stock.expiring', 'stock:' .. sku, redis.call('HINCRBY', KEYS[2], 'ver', '1'),
       {sku = sku, expiring = n + others, within_s = math.floor(window_ms / 1000), threshold = alert_codes})
end
if retired then check_level() end
return {retired and 1 or 0, n}
