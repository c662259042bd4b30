"""The deliver purchase on a Redis Cluster of three masters against one Redis, in one run.

Four redis-server processes from the same binary, each on TCP with ``appendfsync
always``: one alone, three formed into a cluster (CLUSTER ADDSLOTS, MEET). The same
closed loop (single-code deliver orders by 256 callers over 9 distributors, or
--distributors) runs on each, for three catalogues: 100 SKUs picked by Zipf 1.1; the
same SKUs each spread over the fewest buckets that put one on every master (on one
Redis: 1, the same catalogue); one hot SKU (on the cluster in 3 buckets on the 3
masters). On the cluster it runs a second time with 3 x the callers, meant to give
each master calls as big as one Redis's (a call's fixed costs, the script's start and
the fsync, are shared by the orders it carries).

The catalogue is a shop's in steady selling, the same on both sides:
- each SKU holds twice the orders the run makes of it (--stock), so the measured run
  is selling, not selling out. --stock 1 shows a sell-out: once a spread SKU's
  buckets on a master are dry, that master's buyers go on as sagas, which look in
  every bucket (the one-step column).
- the distributors' ids are picked so their accounts fall on the masters in turn, as
  a shop's many accounts do by their hash (with a few ids picked blindly, one master
  can hold half of them and so take half the orders).

Each row gives orders/s, the CPU per order (user + system, from /proc, over the
measured run only) of the engine's process and of each Redis process with the
Redis sum, each master's share of the Redis CPU, the share of orders that went in
one step (not as a saga) and the mean count of orders a one-step call (batch).

On one Redis a deliver purchase is one script per round. On a cluster it is that
script, per master, for the orders whose account lives on the master of the SKU's
shard (or of a bucket of it), and the saga begin -> take -> commit otherwise, each
step one script per shard (docs/design.md): so the hot SKU and the spread SKUs, which
have a bucket on every master, sell in one step, and each unspread Zipf SKU to the
third of the accounts that share its master.

    .venv/bin/python bench/cluster.py             # 20,000 orders a row, about two minutes
    .venv/bin/python bench/cluster.py --orders 5000 --distributors 48 --stock 1
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import socket
import tempfile
import time

import numpy as np
import redis

from ceiling import redis_cpu
from compare import CALLERS, codes, config, zipf_weights
from dispatch import Engine
from dispatch.engine import tune_gc
from dispatch.store import keys
from dispatch.store.embedded import EmbeddedRedis

SLOTS = 16384


def free_cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    while True:
        port = random.randrange(20000, 30000)
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue


def start(data_dir: str, cluster: bool) -> EmbeddedRedis:
    extra = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"] if cluster else []
    server = EmbeddedRedis(data_dir, appendfsync="always", port=free_cluster_port(), extra_args=extra)
    server.start()
    return server


def form(masters: list[EmbeddedRedis]) -> None:
    """An equal range of slots to each master, introduced to each other; waits until ok."""
    clients = [redis.Redis(port=m.port) for m in masters]
    for k, c in enumerate(clients):
        c.execute_command("CLUSTER ADDSLOTS", *range(k * SLOTS // len(masters), (k + 1) * SLOTS // len(masters)))
    for m in masters[1:]:
        clients[0].execute_command("CLUSTER MEET", "127.0.0.1", m.port)
    deadline = time.monotonic() + 30
    for c in clients:
        while c.execute_command("CLUSTER INFO")["cluster_state"] != "ok" or len(c.execute_command("CLUSTER SLOTS")) < 3:
            assert time.monotonic() < deadline, "the cluster did not form"
            time.sleep(0.05)
        c.close()


def masters_of(engine: Engine, sku: str, buckets: int) -> int:
    """How many masters the first *buckets* buckets of *sku* live on."""
    return len({engine.store.node_of(keys.sku_tag(keys.bucket_shard(sku, b))) for b in range(buckets)})


def dist_names(engine: Engine, n: int) -> list[str]:
    """*n* distributor ids whose accounts fall on the masters in turn (one Redis: d0..)."""
    names = [f"d{i}" for i in range(10 * n + 100)]
    if not engine.store.cluster:
        return names[:n]
    on: dict[str, list[str]] = {}
    for d in names:
        on.setdefault(engine.store.node_of(keys.acct_tag(d)), []).append(d)
    turn = [d for group in zip(*on.values()) for d in group]
    return turn[:n]


def hot_sku(engine: Engine) -> str:
    """A SKU id whose 3 buckets live on 3 different masters (one Redis: any)."""
    if not engine.store.cluster:
        return "hot0"
    return next(f"hot{i}" for i in range(1000) if masters_of(engine, f"hot{i}", 3) == 3)


async def row(url: str, pids: list[int], data_dir: str, orders: int, workload: str,
              dists: int, callers: int, stock: int) -> tuple[float, float, list[float], float, float]:
    """orders/s, CPU us per order of the engine's process and of each Redis process,
    the share of orders that went in one step and the mean count of orders in a
    one-step call, for one catalogue."""
    async with Engine(config(url, data_dir, True), sweep=False) as engine:
        await engine.create_supplier("sup", "Supplier")
        if workload == "hot":
            skus = [hot_sku(engine)]
            picks = np.zeros(orders, int)
            await engine.create_sku(skus[0], "Hot", 100, "CNY", 100, buckets=3 if engine.store.cluster else 1)
            await engine.import_codes(codes("HOTX", stock * orders + 100), sku=skus[0], supplier="sup", unit_cost=50)
        else:
            skus = [f"s{s}" for s in range(100)]
            weights = zipf_weights(100, 1.1)
            picks = np.random.default_rng(7).choice(100, size=orders, p=weights)
            for s, sku in enumerate(skus):
                spread = engine.buckets_on_every_master(sku) if workload == "zipf-spread" else 1
                await engine.create_sku(sku, sku, 100, "CNY", 100, buckets=spread)
                await engine.import_codes(codes(f"S{s}X", stock * int((picks == s).sum()) + 10), sku=sku,
                                          supplier="sup", unit_cost=50)
        buyers = dist_names(engine, dists)
        for d in buyers:
            await engine.create_distributor(d, d)
            await engine.topup(d, 10**12, "seed")
        gc.collect()
        tune_gc()
        nxt = iter(range(orders))

        async def caller(c: int) -> None:
            for i in nxt:
                await engine.purchase(buyers[c % dists], skus[picks[i]], 1, f"o{i}")

        cpu0, own0, wall0 = [redis_cpu(p) for p in pids], time.process_time(), time.perf_counter()
        await asyncio.gather(*(caller(c) for c in range(callers)))
        wall, own, cpu = time.perf_counter() - wall0, time.process_time() - own0, [redis_cpu(p) for p in pids]
        assert await engine.audit() == []
        stats = engine.coalescer_stats()
    calls, items = stats["deliver"]  # one-step calls and their orders, a dry bucket's tries among them
    return (orders / wall, 1e6 * own / orders, [1e6 * (b - a) / orders for a, b in zip(cpu0, cpu)],
            1 - stats["begin"][1] / orders, items / calls)


def flush(servers: list[EmbeddedRedis]) -> None:
    for s in servers:
        with redis.Redis(port=s.port) as c:
            c.flushall()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--orders", type=int, default=20_000, help="orders a row")
    ap.add_argument("--distributors", type=int, default=9,
                    help="buyers' accounts (their shards in turn on the masters)")
    ap.add_argument("--stock", type=int, default=2, help="codes a SKU holds per order the run makes of it")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        one = start(os.path.join(d, "one"), cluster=False)
        masters = [start(os.path.join(d, f"m{k}"), cluster=True) for k in range(3)]
        try:
            form(masters)
            cluster_url = "redis+cluster://" + ",".join(f"127.0.0.1:{m.port}" for m in masters)
            print(f"{args.orders} deliver orders a row over {args.distributors} distributors, stock x{args.stock}, "
                  "appendfsync always, TCP; host shared")
            print(f"{'workload':<22} {'side':<25} {'orders/s':>9} {'engine us':>9} {'Redis us/order (each)':>23}"
                  f" {'sum':>6} {'shares of the masters':>22} {'one step':>9} {'batch':>6}")
            for label, workload in (("100 SKUs, Zipf 1.1", "zipf"), ("same, on every master", "zipf-spread"),
                                    ("1 hot SKU (3 buckets)", "hot")):
                for side, url, servers, callers in (
                        ("one Redis", f"redis://127.0.0.1:{one.port}/0", [one], CALLERS),
                        ("cluster", cluster_url, masters, CALLERS),
                        ("cluster, callers x3", cluster_url, masters, 3 * CALLERS)):
                    flush(servers)
                    rate, own, us, one_step, batch = asyncio.run(row(
                        url, [s.pid for s in servers], os.path.join(d, "data"), args.orders, workload,
                        args.distributors, callers, args.stock))
                    side = f"{side} ({callers})"
                    share = " ".join(f"{100 * u / sum(us):4.0f}%" for u in us) if len(us) > 1 else ""
                    print(f"{label:<22} {side:<25} {rate:9,.0f} {own:9.1f} {' '.join(f'{u:6.1f}' for u in us):>23}"
                          f" {sum(us):6.1f} {share:>22} {100 * one_step:8.0f}% {batch:6.1f}")
        finally:
            for s in (one, *masters):
                s.stop()


if __name__ == "__main__":
    main()
