"""What this host allows at best: the purchase path stripped to the writes the
invariants need, measured the way bench/compare.py measures the engine.

A purchase here is two Lua calls (the shape of a two-shard saga), with nothing but:
  take  (SKU shard)     LPOP the codes of every order of the call; one HSET marks them
                        provisional (order -> account); one HINCRBY counts them sold.
  buy   (account shard) per order: HGET of its external_ref (idempotency) and, with
                        events, one XADD; per call: HSET refs, HSET order records
                        (strings made by the client), HSET codes, RPUSH ledger entries,
                        HINCRBY balance.
  keep  (SKU shard)     one HDEL of the provisional marks, riding with the next take.
Or one Lua call per batch, as the engine's deliver mode is (account shard, the SKU's
keys passed along: fine on one node, not on a cluster):
  deliver               per order: HGET of its external_ref; per call: LPOP of the codes,
                        HSET refs, order records and codes, RPUSH ledger entries,
                        HINCRBY balance and sold count, with events one XADD.
No checks, no stock levels, no encryption, no order objects: a floor, not an engine.

And an import stripped the same way: chunks of 10,000 ready-made 46-byte values (the
size of an encrypted 16-character code) RPUSHed, with one global-dedupe claim per code
(HSETNX of a 16-byte fingerprint, in a Lua loop as the engine's fp_claim does), two
chunks in flight. The values and fingerprints are made before the clock starts.

Three drivers, on one embedded Redis flushed before each row (appendfsync always, unix socket):
  redis-only  one client pipelines take/buy/keep calls of 256 orders, 4 in flight: the
              Redis process alone is the limit.
  callers     256 asyncio callers (uvloop) each awaiting take then buy for one order at
              a time, through dispatch.coalescer (group commit per shard, as the engine
              does): the Python process is in the loop, doing almost nothing per order.
  one_call    the same callers awaiting one deliver call per order, coalesced per
              account: the floor bench/compare.py prints beside the engine.

    .venv/bin/python bench/ceiling.py    # 1,000,000 codes, then 100,000 orders a row: ~1 minute
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Callable

import redis.asyncio as aredis

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from dispatch.coalescer import Coalescer  # noqa: E402
from dispatch.store.embedded import EmbeddedRedis  # noqa: E402

DISTS = 8
CALLERS = 256

TAKE = """
local n = tonumber(ARGV[1])
local out, marks, kept = {}, {}, {}
local want = 0
for k = 1, n do
  local id, acct = ARGV[2 * k], ARGV[2 * k + 1]
  if acct == 'keep' then
    for kid in string.gmatch(id, '[^,]+') do kept[#kept + 1] = kid end
  else
    want = want + 1
    marks[#marks + 1] = id
    marks[#marks + 1] = acct
  end
end
local codes = want > 0 and redis.call('LPOP', KEYS[1], want) or {}
local c = 1
for k = 1, n do
  if ARGV[2 * k + 1] == 'keep' then out[k] = 'kept' else out[k] = codes[c]; c = c + 1 end
end
if want > 0 then
  redis.call('HSET', KEYS[2], unpack(marks))
  redis.call('HINCRBY', KEYS[3], 'sold', want)
end
if #kept > 0 then redis.call('HDEL', KEYS[2], unpack(kept)) end
return out
"""

BUY = """
local n, events = tonumber(ARGV[1]), ARGV[2] == '1'
local refs, recs, codes, ledger, out = {}, {}, {}, {}, {}
local t = redis.call('TIME')
local now = t[1] .. string.format('%03d', math.floor(t[2] / 1000))
local spent = 0
for k = 1, n do
  local j = 4 * k - 1
  local id, ref, rec, code = ARGV[j], ARGV[j + 1], ARGV[j + 2], ARGV[j + 3]
  local earlier = redis.call('HGET', KEYS[2], ref)
  if earlier then
    out[k] = earlier
  else
    refs[#refs + 1] = ref; refs[#refs + 1] = id
    recs[#recs + 1] = id; recs[#recs + 1] = rec
    codes[#codes + 1] = id; codes[#codes + 1] = code
    ledger[#ledger + 1] = 'purchase\\31' .. id .. '\\31-100\\31' .. now
    spent = spent + 100
    if events then
      redis.call('XADD', KEYS[6], 'MAXLEN', '~', '100000', '*', 'type', 'order.delivered', 'data', rec)
    end
    out[k] = id
  end
end
if #refs > 0 then
  redis.call('HSET', KEYS[2], unpack(refs))
  redis.call('HSET', KEYS[3], unpack(recs))
  redis.call('HSET', KEYS[4], unpack(codes))
  redis.call('RPUSH', KEYS[5], unpack(ledger))
  redis.call('HINCRBY', KEYS[1], 'balance', -spent)
end
return out
"""

DELIVER = """
-- KEYS: acct_keys(account), pool, stats; ARGV: n, events, n x (order id, external_ref, record)
local n, events = tonumber(ARGV[1]), ARGV[2] == '1'
local fresh, refs, recs, codes, ledger, out = {}, {}, {}, {}, {}, {}
for k = 1, n do
  local earlier = redis.call('HGET', KEYS[2], ARGV[3 * k + 1])
  if earlier then out[k] = earlier else fresh[#fresh + 1] = k end
end
local popped = #fresh > 0 and redis.call('LPOP', KEYS[7], #fresh) or false
if not popped then popped = {} end
for c = #popped + 1, #fresh do out[fresh[c]] = 'out_of_stock' end
if #popped == 0 then return out end
local t = redis.call('TIME')
local now = t[1] .. string.format('%03d', math.floor(t[2] / 1000))
for c = 1, #popped do
  local k = fresh[c]
  local id, ref, rec = ARGV[3 * k], ARGV[3 * k + 1], ARGV[3 * k + 2]
  refs[#refs + 1] = ref; refs[#refs + 1] = id
  recs[#recs + 1] = id; recs[#recs + 1] = rec
  codes[#codes + 1] = id; codes[#codes + 1] = popped[c]
  ledger[#ledger + 1] = 'purchase\\31' .. id .. '\\31-100\\31' .. now
  out[k] = popped[c]
end
redis.call('HSET', KEYS[2], unpack(refs))
redis.call('HSET', KEYS[3], unpack(recs))
redis.call('HSET', KEYS[4], unpack(codes))
redis.call('RPUSH', KEYS[5], unpack(ledger))
redis.call('HINCRBY', KEYS[1], 'balance', -100 * #popped)
redis.call('HINCRBY', KEYS[8], 'sold', #popped)
if events then
  redis.call('XADD', KEYS[6], 'MAXLEN', '~', '100000', '*', 'type', 'orders.delivered', 'data', table.concat(recs, '|'))
end
return out
"""


def sku_keys(s: str) -> list[str]:
    return [f"c:{{{s}}}:pool", f"c:{{{s}}}:prov", f"c:{{{s}}}:stats"]


def acct_keys(d: str) -> list[str]:
    return [f"c:{{{d}}}:{k}" for k in ("acct", "refs", "orders", "codes", "ledger", "events")]


def redis_cpu(pid: int) -> float:
    """CPU seconds (user + system, every thread) of process *pid* so far."""
    with open(f"/proc/{pid}/stat") as f:
        v = f.read().rsplit(")", 1)[1].split()
    return (int(v[11]) + int(v[12])) / os.sysconf("SC_CLK_TCK")


async def seed(r: aredis.Redis, n: int) -> None:
    await r.flushall()
    for k in range(0, n, 20_000):
        await r.rpush(sku_keys("s0")[0], *[b"%046d" % i for i in range(k, min(n, k + 20_000))])


def record(oid: str, ref: str) -> bytes:
    # About the size of the engine's msgpack order record.
    return f"{oid}|{ref}|0123456789abcdef0123456789abcdef|s0|1|100|CNY|deliver|delivered|100".encode()


async def redis_only(r: aredis.Redis, shas: dict[str, str], n: int, events: bool, batch: int = 256) -> None:
    """take, buy, keep for *batch* orders at a time, 4 such chains in flight."""
    take, buy = shas["take"], shas["buy"]
    async def chain(w: int) -> None:
        for k in range(w * batch, n, 4 * batch):
            ids = [f"{k + j:026d}" for j in range(min(batch, n - k))]
            d = f"d{(k // batch) % DISTS}"
            codes = await r.evalsha(take, 3, *sku_keys("s0"), len(ids), *[x for i in ids for x in (i, d)])
            args = [x for i, c in zip(ids, codes) for x in (i, "r" + i, record(i, "r" + i), c)]
            await r.evalsha(buy, 6, *acct_keys(d), len(ids), int(events), *args)
            await r.evalsha(take, 3, *sku_keys("s0"), 1, ",".join(ids), "keep")
    await asyncio.gather(*(chain(w) for w in range(4)))


def coalesced(r: aredis.Redis, sha: str, keys_of: Callable[[str], list[str]], extra: list[int]) -> Coalescer:
    """A Coalescer sending each round as one pipeline of one script call per shard."""
    async def round_(batches: dict[str, list]) -> dict[str, list]:
        async with r.pipeline(transaction=False) as p:
            for shard, items in batches.items():
                keys = keys_of(shard)
                p.evalsha(sha, len(keys), *keys, len(items), *extra, *[x for it in items for x in it])
            replies = await p.execute()
        return dict(zip(batches, replies))
    return Coalescer(round_)


async def callers(r: aredis.Redis, shas: dict[str, str], n: int, events: bool) -> None:
    """CALLERS tasks, each awaiting take then buy per order, coalesced per shard."""
    takes = coalesced(r, shas["take"], sku_keys, [])
    buys = coalesced(r, shas["buy"], acct_keys, [int(events)])
    keeps: list[str] = []
    nxt = iter(range(n))

    async def caller(c: int) -> None:
        d = f"d{c % DISTS}"
        for i in nxt:
            oid = f"{i:026d}"
            code = await takes.submit("s0", (oid, d))
            await buys.submit(d, (oid, "r" + oid, record(oid, "r" + oid), code))
            keeps.append(oid)
            if len(keeps) >= 256:
                takes.submit("s0", (",".join(keeps), "keep"))
                keeps.clear()

    await asyncio.gather(*(caller(c) for c in range(CALLERS)))
    await takes.submit("s0", (",".join(keeps), "keep"))
    await takes.drain()


async def one_call(r: aredis.Redis, shas: dict[str, str], n: int, events: bool,
                   latencies: list[float] | None = None) -> Coalescer:
    """CALLERS tasks, each awaiting one deliver call per order, coalesced per account
    (with *events*, one XADD per call). Each order's seconds go to *latencies* if given;
    returns the coalescer, whose items / batches is the mean batch."""
    pool, _, stats = sku_keys("s0")
    delivers = coalesced(r, shas["deliver"], lambda d: [*acct_keys(d), pool, stats], [int(events)])
    nxt = iter(range(n))
    clock = time.perf_counter

    async def caller(c: int) -> None:
        d = f"d{c % DISTS}"
        for i in nxt:
            oid = f"{i:026d}"
            t = clock()
            await delivers.submit(d, (oid, "r" + oid, record(oid, "r" + oid)))
            if latencies is not None:
                latencies.append(clock() - t)

    await asyncio.gather(*(caller(c) for c in range(CALLERS)))
    return delivers


CLAIM = """
local fresh = 0
for k = 1, #ARGV do fresh = fresh + redis.call('HSETNX', KEYS[1], ARGV[k], '1') end
return fresh
"""


async def import_floor(r: aredis.Redis, pid: int, n: int, chunk: int = 10_000) -> None:
    await r.flushall()
    claim = await r.script_load(CLAIM)

    blob = os.urandom(16 * n)  # made before the clock starts: the client does nothing per code
    fps = [blob[16 * k:16 * k + 16] for k in range(n)]
    values = [b"%046d" % k for k in range(n)]

    async def lane(w: int) -> None:
        for k in range(w * chunk, n, 2 * chunk):
            fresh = await r.evalsha(claim, 1, f"c:fp:{{{k // chunk % 64}}}", *fps[k:k + chunk])
            assert fresh == len(fps[k:k + chunk])
            await r.rpush("c:{s0}:pool", *values[k:k + chunk])

    mem0 = (await r.info("memory"))["used_memory"]
    c0, r0, t0 = time.process_time(), redis_cpu(pid), time.perf_counter()
    await asyncio.gather(lane(0), lane(1))
    t, c, rc = time.perf_counter() - t0, time.process_time() - c0, redis_cpu(pid) - r0
    per_code = ((await r.info("memory"))["used_memory"] - mem0) / n
    print(f"import floor: {n:,} codes in {t:.2f} s, {n / t:,.0f} codes/s; python {1e6 * c / n:.1f} us/code, "
          f"redis {1e6 * rc / n:.1f} us/code, {per_code:.0f} bytes/code")


async def load_scripts(r: aredis.Redis) -> dict[str, str]:
    return {name: await r.script_load(src) for name, src in (("take", TAKE), ("buy", BUY), ("deliver", DELIVER))}


async def check(r: aredis.Redis, n: int) -> None:
    """Every one of *n* orders took a code, was kept and left one external_ref."""
    _, prov, stats = sku_keys("s0")
    sold, left = int(await r.hget(stats, "sold")), await r.hlen(prov)
    refs = sum([await r.hlen(acct_keys(f"d{d}")[1]) for d in range(DISTS)])
    assert sold == n and left == 0 and refs == n, (sold, left, refs)


async def main(url: str, pid: int, n: int, n_import: int) -> None:
    r = aredis.Redis.from_url(url)
    await import_floor(r, pid, n_import)
    shas = await load_scripts(r)
    print(f"{'driver':12} {'events':6} {'orders/s':>9} {'python us/order':>16} {'redis us/order':>15}")
    for driver, events, per in ((redis_only, False, "no"), (redis_only, True, "order"), (callers, False, "no"),
                                (callers, True, "order"), (one_call, False, "no"), (one_call, True, "call")):
        await seed(r, n)
        c0, r0, t0 = time.process_time(), redis_cpu(pid), time.perf_counter()
        await driver(r, shas, n, events)
        t, c, rc = time.perf_counter() - t0, time.process_time() - c0, redis_cpu(pid) - r0
        await check(r, n)
        print(f"{driver.__name__:12} {per:6} {n / t:9,.0f} {1e6 * c / n:16.1f} {1e6 * rc / n:15.1f}")
    await r.aclose()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--orders", type=int, default=100_000)
    ap.add_argument("--import-codes", type=int, default=1_000_000)
    args = ap.parse_args()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    with tempfile.TemporaryDirectory() as d, EmbeddedRedis(os.path.join(d, "r")) as server:
        assert server.pid is not None
        asyncio.run(main(server.url, server.pid, args.orders, args.import_codes))
