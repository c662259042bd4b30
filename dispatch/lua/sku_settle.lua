-- sku_settle(keys=SKU keys, args=[pool_prefix, n, n x (order_id, action)])   action: sell | return
-- The SKU side of ending a reservation, after the account side decided (settle.lua):
-- see settle_codes (_codes.lua). Safe to run twice.
-- returns per order: "ok" | "again" | "not_found" | "invalid_state"
local out = {}
local acc = new_settled()
local i = 3
for _ = 1, tonumber(ARGV[2]) do
  out[#out + 1] = settle_codes(SKU, ARGV[i], ARGV[i + 1], acc)
  i = i + 2
end
flush_settled(SKU, acc)
check_level()
return out
