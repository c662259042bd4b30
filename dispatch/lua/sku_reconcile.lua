-- sku_reconcile(keys=SKU keys, args=[pool_prefix, n, seq, code, order, ...])   n triples
-- Takes out of batch pool `seq` a code that an order holds: one its account holds for
-- a paid order (order ""; a paid order's codes never go back on sale), or one its SKU's
-- delivery record `order` holds reserved or sold (checked here, so a reservation
-- returned meanwhile keeps its codes on sale). Such a code is in a pool only after a
-- lost write: a replica promoted without the script that popped it. Each code taken
-- out lowers its batch's counter (available, or parked for a parked batch).
-- Safe to run twice: a code no longer in its pool is not counted again.
-- returns the number of codes taken out
local removed = 0
for j = 3, 2 + 3 * tonumber(ARGV[2]), 3 do
  local seq, code, id = ARGV[j], ARGV[j + 1], ARGV[j + 2]
  local held = id == ''
  if not held then
    local raw = redis.call('HGET', KEYS[4], id)
    local st = raw and cmsgpack.unpack(raw).st
    if st == 'reserved' or st == 'sold' then
      for _, c in ipairs(unpack_codes(redis.call('HGET', KEYS[7], id) or '')) do
        if c == code then held = true break end
      end
    end
  end
  if held then
    local n = redis.call('LREM', POOL .. seq, 0, code)
    if n > 0 then
      removed = removed + n
      local counter = redis.call('SISMEMBER', KEYS[9], seq) == 1 and 'parked' or 'available'
      redis.call('HINCRBY', KEYS[2], counter, int(-n))
    end
  end
end
if removed > 0 then check_level() end
return removed
