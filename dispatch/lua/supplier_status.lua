-- supplier_status(keys=supplier keys, args=[status, reason, invalid_rate_bps])
-- status: blacklisted | active. Each change is told once (supplier.blacklisted,
-- supplier.reinstated) with the supplier's new version.
-- returns {"ok"|"again", version} | {"unknown_supplier"}
if redis.call('EXISTS', KEYS[1]) == 0 then return {'unknown_supplier'} end
local status, reason, rate = ARGV[1], ARGV[2], tonumber(ARGV[3])
if redis.call('HGET', KEYS[1], 'status') == status then
  return {'again', tonumber(redis.call('HGET', KEYS[1], 'ver') or '0')}
end
local supplier = string.match(KEYS[1], '{p:(.*)}')
local v = redis.call('HINCRBY', KEYS[1], 'ver', '1')
redis.call('HSET', KEYS[1], 'status', status, 'reason', reason)
emit(KEYS[4], status == 'blacklisted' and 'supplier.blacklisted' or 'supplier.reinstated', 'supplier:' .. supplier, v,
     {supplier = supplier, status = status, reason = reason, invalid_rate_bps = rate})
return {'ok', v}
