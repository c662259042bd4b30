"""Side-by-side figures, in one run on the embedded Redis (appendfsync always):
the engine (coalesced, Cython core) against the straightforward implementation of
the same work (Config(coalesce=False): one script call per order and saga step,
same store, same Lua), and against a stripped floor of the hot-SKU purchase
(bench/ceiling.py's one_call driver: one Lua call per batch doing only the
essential writes, driven by the same callers through dispatch.coalescer), run in
turn with each workload: what the host allowed in the same minutes.

Each row gives the CPU per order (user + system, from /proc, over the measured run
only) of this process (the engine, or the floor's callers) and of the Redis process:
at P us an order, that process does at most 1,000,000 / P orders/s.

    .venv/bin/python bench/compare.py            # full run, a few minutes
    .venv/bin/python bench/compare.py --quick    # smaller, about a minute
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import os
import random
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

import msgspec
import numpy as np
import redis
import redis.asyncio as aredis

import ceiling  # bench/ceiling.py: the floor's script and driver
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


class Row(NamedTuple):
    rate: float      # orders/s
    p50: float       # ms
    p99: float       # ms
    batch: float     # mean items per script call, over every saga step
    py_us: float     # CPU us per order of this process
    redis_us: float  # CPU us per order of the Redis process
    forks: int       # Redis forks (AOF rewrites) during the run


class Meter:
    """Wall time and CPU seconds (user + system) of this process and of Redis from now on,
    and Redis's forks: an AOF rewrite's child is not in Redis's CPU, so a row tells of it."""

    def __init__(self, url: str, redis_pid: int) -> None:
        self.client, self.redis_pid = redis.Redis.from_url(url), redis_pid
        self.forks = self.client.info("stats")["total_forks"]
        self.wall, self.py, self.rc = time.perf_counter(), time.process_time(), ceiling.redis_cpu(redis_pid)

    def row(self, orders: int, lat_ms: np.ndarray, batch: float) -> Row:
        wall, py, rc = time.perf_counter(), time.process_time(), ceiling.redis_cpu(self.redis_pid)
        forks = self.client.info("stats")["total_forks"] - self.forks
        self.client.close()
        return Row(orders / (wall - self.wall), float(np.percentile(lat_ms, 50)), float(np.percentile(lat_ms, 99)),
                   batch, 1e6 * (py - self.py) / orders, 1e6 * (rc - self.rc) / orders, forks)


def rewrite_aof(url: str) -> None:
    """Rewrite Redis's append-only file now and wait for it, so that the seed's writes do
    not set off a rewrite (a fork) during the measured run that follows."""
    r = redis.Redis.from_url(url)

    def wait() -> None:
        while (p := r.info("persistence"))["aof_rewrite_in_progress"] or p["aof_rewrite_scheduled"]:
            time.sleep(0.05)

    wait()  # a rewrite the seed set off itself: BGREWRITEAOF would be refused
    r.bgrewriteaof()
    wait()
    r.close()


def script_calls(engine: Engine) -> tuple[int, int]:
    """(script calls, items in them) so far, over every saga step."""
    stats = engine.coalescer_stats().values()
    return sum(c for c, _ in stats), sum(i for _, i in stats)


async def closed_loop(engine: Engine, orders: int, skus: int, zipf_s: float | None, mode: str,
                      url: str, redis_pid: int) -> Row:
    """*orders* purchases by CALLERS concurrent callers (a reservation and its confirm
    count as one), measured from the first to the last."""
    rng = np.random.default_rng(7)
    picks = rng.choice(skus, size=orders, p=zipf_weights(skus, zipf_s)) if zipf_s else np.zeros(orders, int)
    lat = np.zeros(orders)
    nxt = iter(range(orders))
    run = random.getrandbits(32)
    calls0, items0 = script_calls(engine)

    async def caller(c: int) -> None:
        for i in nxt:
            t = time.perf_counter()
            order = await engine.purchase(f"d{c % DISTS}", f"s{picks[i]}", 1, f"{run}-{i}", mode=mode)
            if mode == "reserve":
                await engine.confirm(f"d{c % DISTS}", order.order_id)
            lat[i] = time.perf_counter() - t

    meter = Meter(url, redis_pid)
    await asyncio.gather(*(caller(c) for c in range(CALLERS)))
    calls, items = script_calls(engine)
    return meter.row(orders, lat * 1000, (items - items0) / max(1, calls - calls0))


async def floor(url: str, redis_pid: int, orders: int) -> Row:
    """The stripped floor of *orders* deliver purchases on one SKU (bench/ceiling.py one_call)."""
    r = aredis.Redis.from_url(url)
    try:
        shas = await ceiling.load_scripts(r)
        await ceiling.seed(r, orders)
        rewrite_aof(url)
        gc.collect()
        lat: list[float] = []
        meter = Meter(url, redis_pid)
        delivers = await ceiling.one_call(r, shas, orders, True, lat)
        row = meter.row(orders, np.array(lat) * 1000, delivers.items / max(1, delivers.batches))
        await ceiling.check(r, orders)
        return row
    finally:
        await r.aclose()


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


HOT = "purchase, 1 hot SKU"
WORKLOADS = (  # label, SKUs, Zipf exponent, mode, share of the orders (a reservation and its confirm: one)
    (HOT, 1, None, "deliver", 1.0),
    ("purchase, 100 SKUs Zipf 1.1", 100, 1.1, "deliver", 1.0),
    ("reserve + confirm, 1 SKU", 1, None, "reserve", 0.5),
)


async def engine_row(url: str, data_dir: str, redis_pid: int, coalesce: bool, n: int, skus: int,
                     zipf_s: float | None, mode: str) -> Row:
    """One side of a workload, after a FLUSHALL and a fresh seed; audited when small enough."""
    redis.Redis.from_url(url).flushall()
    async with Engine(config(url, data_dir, coalesce), sweep=False) as engine:
        await seed(engine, skus, (n + skus * 10) // skus + 10 if skus == 1 else int(n * 0.3) + 50)
        rewrite_aof(url)
        gc.collect()
        tune_gc()  # as dispatch serve does once started; both sides alike
        row = await closed_loop(engine, n, skus, zipf_s, mode, url, redis_pid)
        problems = await engine.audit() if n <= 50_000 else []
        assert not problems, problems[:5]
    return row


def median(rows: list[Row]) -> Row:
    """Each column's median (forks: the most)."""
    cols = list(zip(*rows))
    return Row(*[float(np.median(c)) for c in cols[:-1]], max(cols[-1]))


async def purchase_figures(url: str, data_dir: str, redis_pid: int, n_fast: int, n_slow: int,
                           rounds: int) -> tuple[dict[str, dict[str, Row]], tuple[float, float, float]]:
    """{workload: {"engine" | "floor" | "straightforward": Row}} and the open loop's (rate, p50, p99).
    For each workload the engine and the floor (which strips the hot SKU's purchase) alternate
    *rounds* times: the medians. Beside the other workloads the floor is the host's yardstick
    of the same minutes, not their stripped form."""
    out: dict[str, dict[str, Row]] = {}
    for label, skus, zipf_s, mode, share in WORKLOADS:
        row = out[label] = {}
        runs = [(await engine_row(url, data_dir, redis_pid, True, int(n_fast * share), skus, zipf_s, mode),
                 await floor(url, redis_pid, n_fast)) for _ in range(rounds)]
        row["engine"], row["floor"] = median([e for e, _ in runs]), median([f for _, f in runs])
        row["straightforward"] = await engine_row(url, data_dir, redis_pid, False, int(n_slow * share), skus,
                                                  zipf_s, mode)
    # latency at half the engine's best rate, open loop
    redis.Redis.from_url(url).flushall()
    best = out[HOT]["engine"].rate
    async with Engine(config(url, data_dir, True), sweep=False) as engine:
        await seed(engine, 1, int(best * 3) + 1000)
        lat = await open_loop(engine, best / 2, 3.0)
    return out, (best / 2, float(np.percentile(lat, 50)), float(np.percentile(lat, 99)))


IMPORTER = r"""
import asyncio, base64, json, sys, time
url, data_dir, path, sku, redis_pid, bench_dir = sys.argv[1:7]
sys.path.insert(0, bench_dir)
from ceiling import redis_cpu
from dispatch import Config, Engine
async def main():
    cfg = Config(redis_url=url, data_dir=data_dir, master_key=base64.b64encode(b"k" * 32).decode())
    async with Engine(cfg, sweep=False) as e:
        await e.create_sku(sku, sku, 100, "CNY", 100)
        try:
            await e.create_supplier("sup", "S")
        except Exception:
            pass
        t, c, r = time.perf_counter(), time.process_time(), redis_cpu(int(redis_pid))
        rep = await e.import_codes(path, sku=sku, supplier="sup", unit_cost=1)
        t, c, r = time.perf_counter() - t, time.process_time() - c, redis_cpu(int(redis_pid)) - r
    print(json.dumps({"accepted": rep.accepted, "seconds": t, "cpu_s": c, "redis_cpu_s": r,
                      # VmHWM, not ru_maxrss: a child's ru_maxrss starts from its parent's peak
                      "rss_mb": next(int(line.split()[1]) for line in open("/proc/self/status")
                                     if line.startswith("VmHWM:")) / 1024}))
asyncio.run(main())
"""


def import_figures(url: str, data_dir: str, redis_pid: int, n: int) -> dict[str, float]:
    """Engine.import_codes of *n* codes from a file, in a child process (its peak RSS is the import's)."""
    r = redis.Redis.from_url(url)
    r.flushall()
    path = os.path.join(data_dir, "codes.txt")
    with open(path, "wb") as f:
        f.write(codes("IMP", n))
    before, forks = r.info("memory")["used_memory"], r.info("stats")["total_forks"]
    res = subprocess.run([sys.executable, "-c", IMPORTER, url, data_dir, path, "imp", str(redis_pid),
                          os.path.dirname(os.path.abspath(__file__))],
                         capture_output=True, text=True, check=True)
    fig = msgspec.json.decode(res.stdout.strip().splitlines()[-1])
    assert fig["accepted"] == n, fig
    fig["bytes_per_code"] = (r.info("memory")["used_memory"] - before) / n
    fig["forks"] = r.info("stats")["total_forks"] - forks
    os.unlink(path)
    return fig


def report(figs: dict[str, dict[str, Row]], open_loop_figs: tuple[float, float, float]) -> None:
    print(f"{'workload':28} {'side':15} {'orders/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'batch':>6} "
          f"{'python us':>10} {'redis us':>9}")
    for label, sides in figs.items():
        for k, (side, f) in enumerate(sides.items()):
            print(f"{label if k == 0 else '':28} {side:15} {f.rate:8,.0f} {f.p50:7.2f} {f.p99:7.2f} {f.batch:6.1f} "
                  f"{f.py_us:10.1f} {f.redis_us:9.1f}{' *' if f.forks else ''}")
    for other in ("straightforward", "floor"):
        print(f"\n{'engine / ' + other:28} {'orders/s':>8} {'python us':>10} {'redis us':>9}")
        for label, sides in figs.items():
            if other in sides:
                a, b = sides["engine"], sides[other]
                print(f"{label:28} {a.rate / b.rate:7.2f}x {a.py_us / b.py_us:9.2f}x {a.redis_us / b.redis_us:8.2f}x")
    if any(f.forks for sides in figs.values() for f in sides.values()):
        print("\n* Redis forked (an AOF rewrite) during this run: the fork is in its CPU, the rewrite is not")
    rate, p50, p99 = open_loop_figs
    print(f"\nopen loop, 1 hot SKU, at half the engine's rate ({rate:,.0f} orders/s): p50 {p50:.2f} ms, "
          f"p99 {p99:.2f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="20,000 orders, 100,000 codes")
    ap.add_argument("--orders", type=int, default=200_000, help="orders per run of the engine")
    ap.add_argument("--import-codes", type=int, default=1_000_000)
    ap.add_argument("--only", choices=["import", "purchase"], help="run one half")
    ap.add_argument("--rounds", type=int, default=3, help="alternating runs of the engine and the floor for "
                    "each workload (their medians are printed)")
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
        assert server.pid is not None
        print(f"redis {server.version} embedded, malloc {server.allocator}, appendfsync always; {os.cpu_count()} cores; "
              f"{CALLERS} concurrent callers over {DISTS} distributors")
        print("python us, redis us: CPU (user + system) per order of this process and of Redis")
        if args.only != "import":
            print(f"each workload: the engine and the floor (the hot SKU's, stripped) alternate, medians of "
                  f"{args.rounds} runs")
        print()
        if args.only != "purchase":
            imp = import_figures(server.url, d, server.pid, n_imp)
            print(f"import {n_imp:,} 16-char codes: {imp['seconds']:.2f} s, {n_imp / imp['seconds']:,.0f} codes/s, "
                  f"peak RSS {imp['rss_mb']:.0f} MB, {imp['bytes_per_code']:.0f} bytes/code in Redis; "
                  f"CPU per code: importer {1e6 * imp['cpu_s'] / n_imp:.1f} us, "
                  f"Redis {1e6 * imp['redis_cpu_s'] / n_imp:.1f} us")
            if imp["forks"]:
                print(f"(Redis forked {imp['forks']} time(s) for AOF rewrites during the import: the forks are in "
                      "its CPU, the rewrites are not)")
            print()
        if args.only == "import":
            return
        report(*asyncio.run(purchase_figures(server.url, d, server.pid, n_fast, n_slow, args.rounds)))


if __name__ == "__main__":
    main()
