-- Shared head of every script that tells what happened (prepended by dispatch/store/scripts.py).
-- An event is appended to its shard's stream by the script that makes the change, so it
-- is never lost and never told twice. Fields: type, entity ("order:ID"...), v (the
-- entity's version: receivers drop anything older than what they hold), at (ms), data
-- (a JSON object). Events never carry a code.

local EVENTS_MAXLEN = '100000'  -- per stream, trimmed approximately

local NOW
local function now_ms()
  if NOW == nil then
    local t = redis.call('TIME')
    NOW = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return NOW
end

-- A flat JSON object from {key, value, key, value...}: numbers are written as integers
-- (cjson would print a large amount as 1e+15), strings and booleans by cjson.
local function json(fields)
  local parts = {}
  for k = 1, #fields, 2 do
    local v = fields[k + 1]
    parts[#parts + 1] = cjson.encode(fields[k]) .. ':' ..
      (type(v) == 'number' and string.format('%d', v) or cjson.encode(v))
  end
  return '{' .. table.concat(parts, ',') .. '}'
end

local function emit(stream, kind, entity, version, fields)
  redis.call('XADD', stream, 'MAXLEN', '~', EVENTS_MAXLEN, '*', 'type', kind, 'entity', entity,
             'v', string.format('%d', version), 'at', string.format('%d', now_ms()), 'data', json(fields))
end
