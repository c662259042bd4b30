-- Shared head of every script that tells what happened (prepended by dispatch/store/scripts.py).
-- An event is appended to its shard's stream by the script that makes the change, so it
-- is never lost and never told twice. Fields: type, entity ("order:ID"...), v (the
-- entity's version: receivers drop anything older than what they hold), at (ms), data
-- (a msgpack map, or its packed bytes: cmsgpack costs a third of building JSON in Lua,
-- and writes integers as integers). Events never carry a code.
-- A script that tells many orders' news of one kind at once (a round of deliveries)
-- writes them as one entry: type, at, and records (a msgpack array of the orders'
-- records, each with its id and version), read as one event per record
-- (dispatch/records.py, decode_events).

local EVENTS_MAXLEN = '100000'  -- per stream, trimmed approximately

-- Every number a script sends to Redis goes through int(): redis.call would format a
-- Lua number itself, as "-0" for a negative zero (0 negated, which Redis refuses as an
-- integer, failing the script after what it wrote before) and as 1e+15 for a large one.
local function int(x)
  return string.format('%d', x)
end

-- Lua's unpack() is bounded by the C stack: push long lists in slices.
local function push(cmd, key, list)
  for s = 1, #list, 1000 do
    redis.call(cmd, key, unpack(list, s, math.min(s + 999, #list)))
  end
end

-- Ledger entries (_account.lua) carry no running figures, but for the last of an
-- account's entries in a call: it also carries the balance and held amount after it,
-- "kind ref balance_delta held_delta balance held ms", which its readers check their
-- sums against (dispatch/records.py, running). A call's entries list (each ending in
-- ms, the call's time as text), closed so.
local function close_entries(entries, balance, held, ms)
  local e = entries[#entries]
  entries[#entries] = string.sub(e, 1, -#ms - 1) .. int(balance) .. '\31' .. int(held) .. '\31' .. ms
  return entries
end

-- On a Redis Cluster a slot changes masters key by key. A script also touches keys it
-- does not declare (a batch's pool, the day's spend...), which in a slot half moved may
-- already, or still, be on the other master, where Redis fails the script, and a
-- failed script keeps what it wrote before. So a script refuses, before it writes
-- anything, while this master is moving or taking the slot of its shard: moving(key)
-- (CLUSTER NODES read once a call; off a cluster it fails, and nothing moves). The
-- engine sends a call refused with TRYAGAIN again a moment later, as Redis's own.
local MOVING = 'TRYAGAIN this master is moving the slot of these keys to another, or taking it'
local moving_slots  -- slot -> true
local function moving(key)
  if moving_slots == nil then
    moving_slots = {}
    local nodes = redis.pcall('CLUSTER', 'NODES')
    if type(nodes) == 'string' and (string.find(nodes, '->-', 1, true) or string.find(nodes, '-<-', 1, true)) then
      for line in string.gmatch(nodes, '[^\n]+') do
        if string.find(line, 'myself', 1, true) then
          for slot in string.gmatch(line, '%[(%d+)%-[<>]%-') do moving_slots[tonumber(slot)] = true end
        end
      end
    end
  end
  return next(moving_slots) ~= nil and moving_slots[redis.call('CLUSTER', 'KEYSLOT', key)] == true
end

-- A table with room for n array slots, for a script to set each (to anything but nil)
-- before reading it: an array grown a slot at a time is rehashed at every doubling, dear
-- for the arrays a script fills per item. (Any n values would do: ARGV's.)
local function sized(n)
  if n > 1000 or n > #ARGV then return {} end
  return {unpack(ARGV, 1, n)}
end

-- An account's order index (AcctKeys.index, dispatch/store/keys.py) keeps one member
-- per call and 32-millisecond window of the ids it opened (ULIDs sharing their first 9
-- characters): those ids concatenated, the least first, so that members sort by it.
-- One member a call rather than one an order: a sorted set's insert was the dearest
-- write of an order. An id not of 26 characters is a member of its own.
-- returns ZADD's arguments for ids[1], ids[1 + step]...
local function index_entries(ids, step)
  local out, todo = {}, ids
  while todo do  -- the first id's window, then the rest's (a call across a window's end: rare)
    local lo = string.sub(todo[1], 1, 9)
    local hi = lo .. '~'  -- above every id of the window ('~' is above base 32)
    local here, least, rest = {}, nil, nil
    for x = 1, #todo, step do
      local id = todo[x]
      if #id == 26 and id > lo and id < hi then
        here[#here + 1] = id
        if not least or id < here[least] then least = #here end
      elseif x == 1 then
        out[#out + 1], out[#out + 2] = '0', id
      else
        rest = rest or {}
        rest[#rest + 1] = id
      end
    end
    if least then
      here[1], here[least] = here[least], here[1]
      out[#out + 1], out[#out + 2] = '0', table.concat(here)
    end
    todo, step = rest, 1
  end
  return out
end

local NOW
local function now_ms()
  if NOW == nil then
    local t = redis.call('TIME')
    NOW = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return NOW
end

local function emit(stream, kind, entity, version, data)
  redis.call('XADD', stream, 'MAXLEN', '~', EVENTS_MAXLEN, '*', 'type', kind, 'entity', entity,
             'v', int(version), 'at', int(now_ms()),
             'data', type(data) == 'string' and data or cmsgpack.pack(data))
end

local function emit_records(stream, kind, records)
  local n = #records
  local head = n < 16 and string.char(0x90 + n)
               or string.char(0xdd, math.floor(n / 16777216) % 256, math.floor(n / 65536) % 256,
                              math.floor(n / 256) % 256, n % 256)
  redis.call('XADD', stream, 'MAXLEN', '~', EVENTS_MAXLEN, '*', 'type', kind,
             'at', int(now_ms()), 'records', head .. table.concat(records))
end

-- A script's replies, one table per item, as one flat array (per item: its status, the
-- count of the fields that follow, and those fields): a nested array per item costs
-- Redis more to send than the item's own writes (dispatch/store/orders.py, _per_item).
-- tell appends item o to a reply of n values; returns the reply's new length.
local function tell(reply, o, n)
  reply[n + 1], reply[n + 2] = o[1], #o - 1
  n = n + 2
  for x = 2, #o do reply[n + x - 1] = o[x] end
  return n + #o - 1
end

local function flat(out)
  local reply, n = {}, 0
  for _, o in ipairs(out) do n = tell(reply, o, n) end
  return reply
end
