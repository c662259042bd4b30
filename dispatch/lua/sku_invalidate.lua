-- sku_invalidate(keys=SKU keys, args=[pool_prefix, ticket_id, order_id, index, replace])
-- The SKU side of an approved after-sales ticket: code `index` (0-based) of the order
-- becomes invalidated (sold -1, invalidated +1, counted against its batch). With
-- replace = "1" one code is taken for the buyer instead, if there is stock.
-- Safe to run twice: the outcome is recorded under the ticket id.
-- returns {"refund", seq} | {"replaced", seq, code} | {"not_found"} | {"invalid_state"}
local ticket, order, index, replace = ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5] == '1'
local done = redis.call('HGET', KEYS[4], ticket)
if done then
  local t = cmsgpack.unpack(done)
  if t.st == 'sold' then return {'replaced', t.of, unpack_codes(redis.call('HGET', KEYS[7], ticket))[1]} end
  return {'refund', t.of}
end
local raw = redis.call('HGET', KEYS[4], order)
if not raw then return {'not_found'} end
local r = cmsgpack.unpack(raw)
r.x = r.x or {}
local count = 0
for j = 2, #r.b, 2 do count = count + r.b[j] end
if r.st ~= 'sold' or index >= count then return {'invalid_state'} end
for _, x in ipairs(r.x) do
  if x == index then return {'invalid_state'} end
end
-- the batch the code came from: the runs are {seq, count, ...} in code order
local seq, at = nil, 0
for j = 1, #r.b, 2 do
  at = at + r.b[j + 1]
  if index < at then seq = r.b[j]; break end
end
r.x[#r.x + 1] = index
redis.call('HSET', KEYS[4], order, cmsgpack.pack(r))
redis.call('HINCRBY', KEYS[2], 'sold', '-1')
redis.call('HINCRBY', KEYS[2], 'invalidated', '1')
redis.call('HINCRBY', KEYS[8], seq .. ':i', '1')

if retire_if_due() then check_level() end  -- a replacement is never past its sell-by
local avail = tonumber(redis.call('HGET', KEYS[2], 'available') or '0')
if replace and avail > 0 and redis.call('HGET', KEYS[1], 'status') == 'active' then
  local codes, seqs = take_codes(1)
  redis.call('HSET', KEYS[4], ticket, cmsgpack.pack({st = 'sold', b = {seqs[1], 1}, of = seq}))
  redis.call('HSET', KEYS[7], ticket, pack_codes(codes))
  redis.call('HINCRBY', KEYS[2], 'available', '-1')
  redis.call('HINCRBY', KEYS[2], 'sold', '1')
  redis.call('HINCRBY', KEYS[8], seqs[1] .. ':d', '1')
  check_level()
  return {'replaced', seq, codes[1]}
end
redis.call('HSET', KEYS[4], ticket, cmsgpack.pack({st = 'ticket', of = seq}))
return {'refund', seq}
