-- Shared head of the scripts that open, or give back, a distributor's spending
-- (prepended by dispatch/store/scripts.py): transaction limits and the real-name gate.
-- An account's hash holds its limits (minor units or codes; absent or 0: none):
--   lim_q  codes an order      lim_a  amount an order
--   lim_d  spend a day (UTC)   lim_m  spend a calendar month (UTC)
-- what it has spent (the day's and month's numbers, and the sums):
--   sd, sdv  day (days since 1970-01-01) and its spend
--   sm, smv  month (months since 1970-01) and its spend
-- and verified ("1" once its real name is verified). Spend is what a purchase costs,
-- counted when it is paid or its money held, while a daily or monthly limit is set; a
-- reservation that ends without being paid gives it back to its day and month, if they
-- are still the current ones.
-- Volume tiers read tday, tup, tlo (set by tier_apply.lua; count_spend below).
local LIMIT_FIELDS = {'lim_q', 'lim_a', 'lim_d', 'lim_m', 'sd', 'sdv', 'sm', 'smv', 'verified', 'tday', 'tup', 'tlo'}

-- Months since 1970-01 of a day since 1970-01-01 (the civil calendar, proleptic Gregorian).
local function month_of_day(days)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400 + (m <= 2 and 1 or 0)
  return (y - 1970) * 12 + m - 1
end

-- The limits and spend of an account from the values of its LIMIT_FIELDS (an HMGET),
-- as of now (ms): a spend of another day or month counts as 0.
local function limits_of(v, now)
  local day = math.floor(now / 86400000)
  local month = month_of_day(day)
  return {q = tonumber(v[1]) or 0, a = tonumber(v[2]) or 0, d = tonumber(v[3]) or 0, m = tonumber(v[4]) or 0,
          day = day, month = month,
          spent_d = tonumber(v[5]) == day and tonumber(v[6]) or 0,
          spent_m = tonumber(v[7]) == month and tonumber(v[8]) or 0,
          verified = v[9] == '1', moved = false,
          tday = tonumber(v[10]), tup = tonumber(v[11]) or math.huge, tlo = tonumber(v[12]) or -math.huge}
end

-- Whether the account has any limit at all (the usual account has none: nothing to check).
local function any_limit(L)
  return L.q > 0 or L.a > 0 or L.d > 0 or L.m > 0
end

-- Why an order of qty codes costing cost is refused by its account's limits or gate,
-- as its reply ({'limit_exceeded', limit, left} | {'verification_required'}); nil if
-- it may go on. gate: unverified accounts may not buy.
local function over_limit(L, qty, cost, gate)
  if gate and not L.verified then return {'verification_required'} end
  if L.q > 0 and qty > L.q then return {'limit_exceeded', 'max_order_qty', int(L.q)} end
  if L.a > 0 and cost > L.a then return {'limit_exceeded', 'max_order_amount', int(L.a)} end
  if L.d > 0 and L.spent_d + cost > L.d then
    return {'limit_exceeded', 'daily', int(math.max(0, L.d - L.spent_d))}
  end
  if L.m > 0 and L.spent_m + cost > L.m then
    return {'limit_exceeded', 'monthly', int(math.max(0, L.m - L.spent_m))}
  end
  return nil
end

-- cost spent now (negative: given back by an order made at ms `at`). Spend is counted
-- while the account has a daily or monthly limit (an account without one pays nothing
-- for the counting).
local function spend(L, cost, at)
  if L.d == 0 and L.m == 0 then return end
  if cost < 0 then
    local day = math.floor(at / 86400000)
    if day == L.day then L.spent_d = math.max(0, L.spent_d + cost) end
    if month_of_day(day) == L.month then L.spent_m = math.max(0, L.spent_m + cost) end
  else
    L.spent_d, L.spent_m = L.spent_d + cost, L.spent_m + cost
  end
  L.moved = true
end

-- The account's spend fields to write back (HSET), if anything was spent.
local function spent_fields(L)
  if not L.moved then return nil end
  return {'sd', int(L.day), 'sdv', int(L.spent_d),
          'sm', int(L.month), 'smv', int(L.spent_m)}
end

-- Volume tiers: what an account paid for purchases (net of refunds) by UTC day, in the
-- HASH named from its acct key ("spend": day -> amount), one HINCRBY per script call.
-- When today's count reaches tup or falls below tlo (set by tier_apply.lua for the day
-- it decided, tday) the account is flagged (tdue) for the sweep to decide its tier again.
local function count_spend(acct_key, L, amount)
  local today = redis.call('HINCRBY', string.sub(acct_key, 1, -5) .. 'spend', int(L.day), int(amount))
  if L.tday == L.day and (today >= L.tup or today < L.tlo) then redis.call('HSET', acct_key, 'tdue', '1') end
end
