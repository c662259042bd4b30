-- keep(keys=SKU keys, args=[pool_prefix, n, order_id...])
-- A purchase in deliver mode that its account has bought is no longer provisional:
-- its codes stay sold and the sweep leaves it alone. Sent after the buyer has its
-- answer (coalesced, not waited for); one that is lost is kept by the sweep.
-- Safe to run twice.
-- returns per order: "kept"
local ids, out = {}, {}
for k = 1, tonumber(ARGV[2]) do
  ids[k] = ARGV[2 + k]
  out[k] = 'kept'
end
if #ids > 0 then push('ZREM', KEYS[13], ids) end
return out
