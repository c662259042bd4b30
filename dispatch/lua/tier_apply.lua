-- tier_apply(keys=[acct, spend, events],
--            args=[distributor, action, pin_tier, version, window, n, n x (min_spend, tier)])
-- A distributor's volume tier, from its spend by day (KEYS[2], written by count_spend,
-- _limits.lua) and the tier rules (version, window "rolling_30d" | "calendar_month",
-- n rules ascending by min_spend; n = 0: no rules). action:
--   read   what the account holds and has spent; writes nothing
--   apply  the tier of the highest rule its spend reaches (none: no tier), unless pinned
--   pin    pinned to pin_tier ("": no tier): the rules leave it alone
--   unpin  the rules decide again, at once
-- The spend: rolling_30d, today and the 29 days before; calendar_month, the last whole
-- month (this month's spend sets next month's tier). A change of tier is written, and
-- told (distributor.tier_changed: distributor, from, to, spend, window, pinned; the
-- account's tver as version), by this script only, which compares the tier it finds
-- with the one it decides: evaluators racing each other tell a change once.
-- Rules older than those the account was last decided by (trv) decide nothing
-- ("stale"). Every write also drops day counts no window needs (before day - 61),
-- clears tdue, and sets when the purchase scripts flag the account again: tday (today),
-- tup and tlo, today's count at which the 30-day spend reaches the next rule or falls
-- below its own (unset: never).
-- Safe to run twice.
-- returns {status, tier before, tier after, spend, this month's spend, today (days since 1970-01-01),
--          pinned ("1" | "0", after the action)}
--   status "changed" | "same" | "stale";  or {"unknown_distributor"}
local ACCT, SPEND, EVENTS = KEYS[1], KEYS[2], KEYS[3]
local dist, action, pin_tier = ARGV[1], ARGV[2], ARGV[3]
local version, window, n = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
local KEEP_DAYS = 61  -- the first day of last month is at most 61 days ago

local a = redis.call('HMGET', ACCT, 'status', 'tier', 'tpin', 'trv', 'tver')
if not a[1] then return {'unknown_distributor'} end
local before, pinned, stale = a[2] or '', a[3] == '1', (tonumber(a[4]) or 0) > version
local day = math.floor(now_ms() / 86400000)
local month = month_of_day(day)

local rolling, today, last, this, old = 0, 0, 0, 0, {}
local counts = redis.call('HGETALL', SPEND)
for x = 1, #counts, 2 do
  local d, v = tonumber(counts[x]), tonumber(counts[x + 1])
  if d < day - KEEP_DAYS then
    old[#old + 1] = counts[x]
  else
    if d > day - 30 and d <= day then rolling = rolling + v end
    if d == day then today = v end
    local m = month_of_day(d)
    if m == month then this = this + v elseif m == month - 1 then last = last + v end
  end
end
local spend = window == 'calendar_month' and last or rolling

local reached = 0  -- the highest rule the spend reaches
for i = 1, n do
  if spend >= tonumber(ARGV[5 + 2 * i]) then reached = i end
end
if action == 'pin' then pinned = true elseif action == 'unpin' then pinned = false end
local after = before
if action == 'pin' then
  after = pin_tier
elseif not pinned and not stale and n > 0 then
  after = reached > 0 and ARGV[6 + 2 * reached] or ''
end
local status = (stale and action ~= 'pin') and 'stale' or (after ~= before and 'changed' or 'same')
local reply = {status, before, after, int(spend), int(this), int(day), pinned and '1' or '0'}
if action == 'read' then return reply end

if #old > 0 then redis.call('HDEL', SPEND, unpack(old)) end
local set, drop = {'tday', int(day), 'tpin', pinned and '1' or '0'}, {'tdue'}
if not stale then
  set[#set + 1], set[#set + 2] = 'trv', int(version)
end
-- when a purchase should have the account decided again (the 30-day spend only moves with them)
local up, low
if not pinned and not stale and n > 0 and window == 'rolling_30d' then
  local before_today = rolling - today
  if reached < n then up = tonumber(ARGV[5 + 2 * (reached + 1)]) - before_today end
  if reached > 0 then low = tonumber(ARGV[5 + 2 * reached]) - before_today end
end
if up then set[#set + 1], set[#set + 2] = 'tup', int(up) else drop[#drop + 1] = 'tup' end
if low then set[#set + 1], set[#set + 2] = 'tlo', int(low) else drop[#drop + 1] = 'tlo' end

if after ~= before then
  local v = (tonumber(a[5]) or 0) + 1
  set[#set + 1], set[#set + 2], set[#set + 3], set[#set + 4] = 'tier', after, 'tver', int(v)
  -- packed by hand so that "no tier" and "no rules" are nil, not ""
  local function field(k, x)
    return cmsgpack.pack(k) .. ((x == '' or x == nil) and '\192' or cmsgpack.pack(x))
  end
  emit(EVENTS, 'distributor.tier_changed', 'distributor:' .. dist, v,
       '\134' .. field('distributor', dist) .. field('from', before) .. field('to', after)
       .. field('spend', spend) .. field('window', n > 0 and window or '')
       .. cmsgpack.pack('pinned') .. cmsgpack.pack(pinned))
end
redis.call('HSET', ACCT, unpack(set))
redis.call('HDEL', ACCT, unpack(drop))
return reply
