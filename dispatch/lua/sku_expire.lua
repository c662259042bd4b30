-- sku_expire(keys=SKU keys, args=[pool_prefix])
-- Retires the SKU's batches past their sell-by (retire_due, _codes.lua), for the sweep:
-- the scripts that take codes retire them too before they decide, so this only keeps
-- stock figures current for a SKU that is not selling. Safe to run twice.
-- returns 1 if it retired any, else 0
if retire_if_due() then
  check_level()
  return 1
end
return 0
