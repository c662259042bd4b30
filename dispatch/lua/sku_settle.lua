-- sku_settle(keys=SKU keys, args=[pool_prefix, n, n x (order_id, action)])   action: sell | return
-- The SKU side of ending a reservation, after the account side decided (settle.lua):
-- sell: reserved codes become sold. return: they go back to the head of their batch's
-- pool (or count as voided if the batch was voided meanwhile, parked if it was parked).
-- Safe to run twice: the delivery record's state says what was done.
-- returns per order: "ok" | "again" | "not_found" | "invalid_state"
local DONE = {sell = 'sold', ['return'] = 'returned'}
local out = {}
local i = 3
for _ = 1, tonumber(ARGV[2]) do
  local id, action = ARGV[i], ARGV[i + 1]
  i = i + 2
  local raw = redis.call('HGET', KEYS[4], id)
  local result
  if not raw then
    result = 'not_found'
  else
    local r = cmsgpack.unpack(raw)
    local was = 'reserved'
    if r.st == DONE[action] then
      result = 'again'
    elseif r.st ~= was then
      result = 'invalid_state'
    else
      local codes = unpack_codes(redis.call('HGET', KEYS[7], id))
      local n = #codes
      if action == 'sell' then
        redis.call('HINCRBY', KEYS[2], 'sold', n)
        count_sold(r.b)
      else
        local k = 1
        for j = 1, #r.b, 2 do
          local seq, count = r.b[j], r.b[j + 1]
          if redis.call('SISMEMBER', KEYS[6], seq) == 1 then
            redis.call('HINCRBY', KEYS[2], 'voided', count)
          else
            local back = {}
            for c = k + count - 1, k, -1 do back[#back + 1] = codes[c] end
            push('LPUSH', POOL .. seq, back)
            if redis.call('SISMEMBER', KEYS[9], seq) == 1 then
              redis.call('HINCRBY', KEYS[2], 'parked', count)
            else
              redis.call('ZADD', KEYS[3], 'NX', score_of(seq), seq)
              redis.call('HINCRBY', KEYS[2], 'available', count)
            end
          end
          k = k + count
        end
      end
      redis.call('HINCRBY', KEYS[2], was, -n)
      r.st = DONE[action]
      redis.call('HSET', KEYS[4], id, cmsgpack.pack(r))
      result = 'ok'
    end
  end
  out[#out + 1] = result
end
check_level()
return out
