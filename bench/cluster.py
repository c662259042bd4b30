"""The deliver purchase on a Redis Cluster of three masters against one Redis, in one run.

Four redis-server processes from the same binary, each on TCP with ``appendfsync
always``: one alone, three formed into a cluster (CLUSTER ADDSLOTS, MEET). The same
closed loop (256 callers over 8 distributors, or --distributors, single-code deliver
orders) runs on each, for two catalogues: 100 SKUs picked by Zipf 1.1, and one hot
SKU (on the cluster, spread over 3 buckets that land on the 3 masters), and the
Zipf SKUs again, each spread over the fewest buckets that put one on every master
(on one Redis: 1, the same catalogue); on the
cluster a second time with 3 x the callers, meant to give each master calls as big
as one Redis's (a call's fixed costs, the script's start and the fsync, are shared
by the orders it carries). Each row
gives orders/s, the CPU per order (user + system, from /proc, over the measured run
only) of each Redis process and their sum, each master's share of the Redis CPU,
the share of orders that went in one step and their mean count a call (batch).

On one Redis a deliver purchase is one script per round. On a cluster it is that
script, per master, for the orders whose account lives on the master of the SKU's
shard (or of a bucket of it), and the saga begin -> take -> commit otherwise, each
step one script per shard (docs/design.md): so the hot SKU, whose buckets are on
every master, sells in one step, and each of the Zipf SKUs to about a third of the
accounts.

    .venv/bin/python bench/cluster.py             # 20,000 orders a row
    .venv/bin/python bench/cluster.py --orders 5000 --distributors 48
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


def hot_sku(engine: Engine) -> str:
    """A SKU id whose 3 buckets live on 3 different masters (one Redis: any)."""
    if not engine.store.cluster:
        return "hot0"
    return next(f"hot{i}" for i in range(1000) if masters_of(engine, f"hot{i}", 3) == 3)


def on_every_master(engine: Engine, sku: str) -> int:
    """The fewest buckets of *sku* that have one on every master (one Redis: 1)."""
    if not engine.store.cluster:
        return 1
    return next((n for n in range(1, keys.MAX_BUCKETS + 1) if masters_of(engine, sku, n) == 3), keys.MAX_BUCKETS)


async def row(url: str, pids: list[int], data_dir: str, orders: int, workload: str,
              dists: int, callers: int) -> tuple[float, list[float], float, float]:
    """orders/s, CPU us per order of each Redis process, the share of orders that went
    in one step and the mean count of orders in a one-step call, for one catalogue."""
    async with Engine(config(url, data_dir, True), sweep=False) as engine:
        await engine.create_supplier("sup", "Supplier")
        if workload == "hot":
            skus = [hot_sku(engine)]
            picks = np.zeros(orders, int)
            await engine.create_sku(skus[0], "Hot", 100, "CNY", 100, buckets=3 if engine.store.cluster else 1)
            await engine.import_codes(codes("HOTX", orders + 100), sku=skus[0], supplier="sup", unit_cost=50)
        else:
            skus = [f"s{s}" for s in range(100)]
            weights = zipf_weights(100, 1.1)
            picks = np.random.default_rng(7).choice(100, size=orders, p=weights)
            for s, sku in enumerate(skus):
                spread = on_every_master(engine, sku) if workload == "zipf-spread" else 1
                await engine.create_sku(sku, sku, 100, "CNY", 100, buckets=spread)
                await engine.import_codes(codes(f"S{s}X", int((picks == s).sum()) + 10), sku=sku, supplier="sup",
                                          unit_cost=50)
        for d in range(dists):
            await engine.create_distributor(f"d{d}", f"D{d}")
            await engine.topup(f"d{d}", 10**12, "seed")
        gc.collect()
        tune_gc()
        nxt = iter(range(orders))

        async def caller(c: int) -> None:
            for i in nxt:
                await engine.purchase(f"d{c % dists}", skus[picks[i]], 1, f"o{i}")

        cpu0, wall0 = [redis_cpu(p) for p in pids], time.perf_counter()
        await asyncio.gather(*(caller(c) for c in range(callers)))
        wall, cpu = time.perf_counter() - wall0, [redis_cpu(p) for p in pids]
        assert await engine.audit() == []
        calls, one_step = engine.coalescer_stats()["deliver"]
    return orders / wall, [1e6 * (b - a) / orders for a, b in zip(cpu0, cpu)], one_step / orders, one_step / calls


def flush(servers: list[EmbeddedRedis]) -> None:
    for s in servers:
        with redis.Redis(port=s.port) as c:
            c.flushall()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--orders", type=int, default=20_000, help="orders a row")
    ap.add_argument("--distributors", type=int, default=8, help="buyers' accounts (shards spread over the masters)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        one = start(os.path.join(d, "one"), cluster=False)
        masters = [start(os.path.join(d, f"m{k}"), cluster=True) for k in range(3)]
        try:
            form(masters)
            cluster_url = "redis+cluster://" + ",".join(f"127.0.0.1:{m.port}" for m in masters)
            print(f"{args.orders} deliver orders a row over {args.distributors} distributors, "
                  "appendfsync always, TCP; host shared")
            print(f"{'workload':<26} {'side':<22} {'orders/s':>9} {'Redis us/order (each)':>30} {'sum':>6}"
                  f" {'shares of the masters':>22} {'one step':>9} {'batch':>6}")
            for label, workload in (("100 SKUs, Zipf 1.1", "zipf"), ("same, on every master", "zipf-spread"),
                                    ("1 hot SKU (3 buckets)", "hot")):
                for side, url, servers, callers in (
                        ("one Redis", f"redis://127.0.0.1:{one.port}/0", [one], CALLERS),
                        ("cluster", cluster_url, masters, CALLERS),
                        ("cluster, callers x3", cluster_url, masters, 3 * CALLERS)):
                    flush(servers)
                    rate, us, one_step, batch = asyncio.run(row(url, [s.pid for s in servers], os.path.join(d, "data"),
                                                         args.orders, workload, args.distributors, callers))
                    side = f"{side} ({callers})"
                    share = " ".join(f"{100 * u / sum(us):4.0f}%" for u in us) if len(us) > 1 else ""
                    print(f"{label:<26} {side:<22} {rate:9,.0f} {' '.join(f'{u:6.1f}' for u in us):>30}"
                          f" {sum(us):6.1f} {share:>22} {100 * one_step:8.0f}% {batch:6.1f}")
        finally:
            for s in (one, *masters):
                s.stop()


if __name__ == "__main__":
    main()
