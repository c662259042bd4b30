"""Side-by-side figures, in one run on the embedded Redis (appendfsync always):
the engine (coalesced, Cython core) against the straightforward implementation of
the same work (Config(coalesce=False): one script call per order and saga step,
same store, same Lua).

    .venv/bin/python bench/compare.py            # full run, a few minutes
    .venv/bin/python bench/compare.py --quick    # smaller, for a smoke check
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

import msgspec
import numpy as np
import redis

from dispatch import Config, Engine
from dispatch.engine import tune_gc
from dispatch.store.embedded import EmbeddedRedis

CALLERS = 256
DISTS = 8


def codes(prefix: str, n: int) -> bytes:
    """*n* distinct 16-character codes, one per line."""
    width = 16 - len(prefix)
    return b"".join(b"%s%0*d\n" % (prefix.encode(), width, i) for i in range(n))


async def seed(engine: Engine, skus: int, per_sku: int) -> None:
    await engine.create_supplier("sup", "Supplier")
    for s in range(skus):
        await engine.create_sku(f"s{s}", f"SKU {s}", 100, "CNY", 100)
        await engine.import_codes(codes(f"S{s}X", per_sku), sku=f"s{s}", supplier="sup", unit_cost=50)
    for d in range(DISTS):
        await engine.create_distributor(f"d{d}", f"D{d}")
        await engine.topup(f"d{d}", 10**12, "seed")


def zipf_weights(n: int, s: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** s
    return w / w.sum()


async def closed_loop(engine: Engine, orders: int, skus: int, zipf_s: float | None, mode: str) -> tuple[float, np.ndarray]:
    """*orders* purchases by CALLERS concurrent callers; (orders/s, latencies in ms)."""
    rng = np.random.default_rng(7)
    picks = rng.choice(skus, size=orders, p=zipf_weights(skus, zipf_s)) if zipf_s else np.zeros(orders, int)
    lat = np.zeros(orders)
    nxt = iter(range(orders))
    run = random.getrandbits(32)

    async def caller(c: int) -> None:
        for i in nxt:
            t = time.perf_counter()
            order = await engine.purchase(f"d{c % DISTS}", f"s{picks[i]}", 1, f"{run}-{i}", mode=mode)
            if mode == "reserve":
                await engine.confirm(f"d{c % DISTS}", order.order_id)
            lat[i] = time.perf_counter() - t

    t0 = time.perf_counter()
    await asyncio.gather(*(caller(c) for c in range(CALLERS)))
    return orders / (time.perf_counter() - t0), lat * 1000


async def open_loop(engine: Engine, rate: float, seconds: float) -> np.ndarray:
    """Purchases arriving at *rate*/s whether or not earlier ones returned; latencies in ms."""
    n = int(rate * seconds)
    lat = np.zeros(n)
    run = random.getrandbits(32)
    tasks = []

    async def one(i: int, due: float) -> None:
        await engine.purchase(f"d{i % DISTS}", "s0", 1, f"ol{run}-{i}")
        lat[i] = time.perf_counter() - due

    start = time.perf_counter()
    for i in range(n):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, due)))
    await asyncio.gather(*tasks)
    return lat * 1000


def config(url: str, data_dir: str, coalesce: bool) -> Config:
    return Config(redis_url=url, data_dir=data_dir, master_key=base64.b64encode(b"k" * 32).decode(),
                  coalesce=coalesce, catalog_ttl_s=5.0)


async def purchase_figures(url: str, data_dir: str, n_fast: int, n_slow: int) -> dict[str, object]:
    out: dict[str, object] = {}
    r = redis.Redis.from_url(url)
    for label, skus, zipf_s, mode, n_f, n_s in (
        ("purchase, 1 hot SKU", 1, None, "deliver", n_fast, n_slow),
        ("purchase, 100 SKUs Zipf 1.1", 100, 1.1, "deliver", n_fast, n_slow),
        ("reserve + confirm, 1 SKU", 1, None, "reserve", n_fast // 2, n_slow // 2),
    ):
        row = {}
        for coalesce, n in ((True, n_f), (False, n_s)):
            r.flushall()
            async with Engine(config(url, data_dir, coalesce), sweep=False) as engine:
                await seed(engine, skus, (n + skus * 10) // skus + 10 if skus == 1 else int(n * 0.3) + 50)
                gc.collect()
                tune_gc()  # as dispatch serve does once started; both sides alike
                rate, lat = await closed_loop(engine, n, skus, zipf_s, mode)
                problems = await engine.audit() if n <= 50_000 else []
                assert not problems, problems[:5]
                calls, items = engine.coalescer_stats()["take"]
                row[coalesce] = (rate, np.percentile(lat, 50), np.percentile(lat, 99), items / max(1, calls))
        out[label] = row
    # p99 at half the best rate
    r.flushall()
    best = out["purchase, 1 hot SKU"][True][0]  # type: ignore[index]
    async with Engine(config(url, data_dir, True), sweep=False) as engine:
        await seed(engine, 1, int(best * 3) + 1000)
        lat = await open_loop(engine, best / 2, 3.0)
    out["p99 at half max"] = (best / 2, np.percentile(lat, 50), np.percentile(lat, 99))
    return out


IMPORTER = r"""
import asyncio, base64, json, resource, sys, time
from dispatch import Config, Engine
url, data_dir, path, sku = sys.argv[1:5]
async def main():
    cfg = Config(redis_url=url, data_dir=data_dir, master_key=base64.b64encode(b"k" * 32).decode())
    async with Engine(cfg, sweep=False) as e:
        await e.create_sku(sku, sku, 100, "CNY", 100)
        try:
            await e.create_supplier("sup", "S")
        except Exception:
            pass
        t = time.perf_counter()
        rep = await e.import_codes(path, sku=sku, supplier="sup", unit_cost=1)
        dt = time.perf_counter() - t
    print(json.dumps({"accepted": rep.accepted, "seconds": dt,
                      "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
asyncio.run(main())
"""


def import_figures(url: str, data_dir: str, n: int) -> dict[str, float]:
    r = redis.Redis.from_url(url)
    r.flushall()
    path = os.path.join(data_dir, "codes.txt")
    with open(path, "wb") as f:
        f.write(codes("IMP", n))
    before = r.info("memory")["used_memory"]
    res = subprocess.run([sys.executable, "-c", IMPORTER, url, data_dir, path, "imp"],
                         capture_output=True, text=True, check=True)
    fig = msgspec.json.decode(res.stdout.strip().splitlines()[-1])
    assert fig["accepted"] == n, fig
    fig["bytes_per_code"] = (r.info("memory")["used_memory"] - before) / n
    os.unlink(path)
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small counts, for a smoke check")
    ap.add_argument("--orders", type=int, default=200_000, help="orders per run of the engine")
    ap.add_argument("--import-codes", type=int, default=1_000_000)
    ap.add_argument("--only", choices=["import", "purchase"], help="run one half")
    args = ap.parse_args()
    n_fast = 20_000 if args.quick else args.orders
    n_slow = max(2_000, n_fast // 10)
    n_imp = 100_000 if args.quick else args.import_codes
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    with tempfile.TemporaryDirectory(prefix="dispatch-bench-") as d, EmbeddedRedis(os.path.join(d, "r")) as server:
        print(f"redis {server.version} embedded, appendfsync always; {os.cpu_count()} cores; "
              f"{CALLERS} concurrent callers over {DISTS} distributors\n")
        if args.only != "purchase":
            imp = import_figures(server.url, d, n_imp)
            print(f"import {n_imp:,} 16-char codes: {imp['seconds']:.2f} s, {n_imp / imp['seconds']:,.0f} codes/s, "
                  f"importer peak RSS {imp['rss_mb']:.0f} MB, Redis {imp['bytes_per_code']:.0f} bytes/code\n")
        if args.only == "import":
            return
        figs = asyncio.run(purchase_figures(server.url, d, n_fast, n_slow))
    print(f"{'workload':32} {'engine/s':>10} {'p50 ms':>7} {'p99 ms':>7} {'batch':>6} | "
          f"{'straightforward/s':>17} {'p50 ms':>7} {'p99 ms':>7} | {'ratio':>6}")
    for label, row in figs.items():
        if label == "p99 at half max":
            continue
        (a, a50, a99, ab), (b, b50, b99, _) = row[True], row[False]
        print(f"{label:32} {a:10,.0f} {a50:7.2f} {a99:7.2f} {ab:6.1f} | {b:17,.0f} {b50:7.2f} {b99:7.2f} | "
              f"{a / b:5.1f}x")
    rate, p50, p99 = figs["p99 at half max"]
    print(f"\nopen loop at half the best rate ({rate:,.0f} orders/s): p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    print(f"(peak RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)")


if __name__ == "__main__":
    main()
