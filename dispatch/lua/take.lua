-- take(keys=SKU keys, args=[pool_prefix, n, n x (order_id, qty, allow_partial, mode)])
-- Pops codes for orders, oldest active batch first (lowest score in the queue).
-- The decision is recorded per order in the delivery records, so the step is safe
-- to run twice (and a recovery sweep racing the original request gets the same
-- answer): a second run returns the same codes, or the same refusal.
-- An order takes exactly qty codes or none; with allow_partial, 1..qty.
-- Deliver mode counts the codes sold at once; reserve mode counts them reserved.
-- returns per order: {"ok", code...} | {"out_of_stock"} | {"paused"} | {"unknown_sku"}
local status = redis.call('HGET', KEYS[1], 'status')
local avail = tonumber(redis.call('HGET', KEYS[2], 'available') or '0')
local out = {}
local i = 3
for _ = 1, tonumber(ARGV[2]) do
  local id, qty, partial, mode = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2] == '1', ARGV[i + 3]
  i = i + 4
  local raw = redis.call('HGET', KEYS[4], id)
  local reply
  if raw then
    local r = cmsgpack.unpack(raw)
    if r.st == 'failed' then
      reply = {r.why}
    else
      reply = unpack_codes(redis.call('HGET', KEYS[7], id))
      table.insert(reply, 1, 'ok')
    end
  else
    local why
    if not status then why = 'unknown_sku'
    elseif status ~= 'active' then why = 'paused'
    elseif avail == 0 or (avail < qty and not partial) then why = 'out_of_stock'
    end
    if why then
      redis.call('HSET', KEYS[4], id, cmsgpack.pack({st = 'failed', why = why}))
      reply = {why}
    else
      local want = math.min(qty, avail)
      local codes, runs = {}, {}
      while #codes < want do
        local head = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
        if not head then
          return redis.error_reply('ERR stats.available of ' .. KEYS[2] .. ' exceeds the pools')
        end
        local need = want - #codes
        local got = redis.call('LPOP', POOL .. head, need)
        if got then
          for _, c in ipairs(got) do codes[#codes + 1] = c end
          runs[#runs + 1] = tonumber(head)
          runs[#runs + 1] = #got
        end
        if not got or #got < need then redis.call('ZREM', KEYS[3], head) end
      end
      local st = (mode == 'reserve') and 'reserved' or 'sold'
      avail = avail - want
      redis.call('HINCRBY', KEYS[2], 'available', -want)
      redis.call('HINCRBY', KEYS[2], st, want)
      redis.call('HSET', KEYS[4], id, cmsgpack.pack({st = st, b = runs}))
      redis.call('HSET', KEYS[7], id, pack_codes(codes))
      reply = {'ok'}
      for k = 1, #codes do reply[k + 1] = codes[k] end
    end
  end
  out[#out + 1] = reply
end
return out
