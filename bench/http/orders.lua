-- orders.lua: POST /v1/orders, every request with its own external_ref (so none is a replay).
--
--   wrk -t2 -c64 -d10s -s bench/http/orders.lua http://127.0.0.1:8080 -- API_KEY [SKU] [QTY]
--
-- Refs are "wrk-<run>-<thread>-<n>": unique across threads and across runs a second apart.
-- At the end, the answers are counted by status (201 delivered, 409 out of stock, ...).

local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  if not args[1] then
    error("usage: wrk ... -s orders.lua URL -- API_KEY [SKU] [QTY]")
  end
  sku, qty = args[2] or "steam-100", tonumber(args[3] or "1")
  run = string.format("%x", os.time())
  n = 0
  counts = {}
  wrk.method = "POST"
  wrk.path = "/v1/orders"
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "Bearer " .. args[1]
end

function request()
  n = n + 1
  local body = string.format('{"sku":"%s","qty":%d,"external_ref":"wrk-%s-%d-%d"}', sku, qty, run, tid, n)
  return wrk.format(nil, nil, nil, body)
end

function response(status, headers, body)
  counts[status] = (counts[status] or 0) + 1
end

function done(summary, latency, requests)
  local total = {}
  for _, thread in ipairs(threads) do
    for status, c in pairs(thread:get("counts")) do
      total[status] = (total[status] or 0) + c
    end
  end
  io.write("answers by status:")
  for status, c in pairs(total) do
    io.write(string.format("  %d: %d", status, c))
  end
  io.write(string.format("\np50 %.2f ms  p99 %.2f ms\n", latency:percentile(50) / 1000,
                         latency:percentile(99) / 1000))
end
