"""Instructions the Redis process executes per order, counted by callgrind: the one
figure of this host that does not move with what else it runs (the same code counts
the same within a fraction of a percent), so it is what tells whether a change to a
script made Redis's work per order smaller.

The embedded redis-server runs under `valgrind --tool=callgrind` with instrumentation
off; the store is seeded, each account's hashes are grown past their small (ziplist)
encoding as a long-running shop's are, then instrumentation is switched on around the
measured step calls only (`callgrind_control -i on/off`). Rows:

  deliver, 1 SKU     `deliver` calls of 64 single-code orders over 8 distributors
  deliver, Zipf      `deliver` calls of 125 orders, SKUs drawn Zipf 1.1 from 100
  reserve            `deliver` calls of 64 reservations (one distributor)
  settle (confirm)   `settle` calls confirming them, both sides in one script
  settle, 8 accounts `settle` calls of 128 confirms over 8 distributors (16 each), as a
                     round of bench/compare.py's reserve + confirm brings them
  floor              bench/ceiling.py's DELIVER script (the essential writes only),
                     64 orders a call, one distributor

Instructions are not time: a callgrind count leaves out what the kernel does for Redis
(the socket, the AOF write and fsync), which `bench/compare.py`'s CPU columns include,
and weighs a cache miss as one instruction. Each row also gives the bytes appended to
the AOF per order (what the kernel writes and fsyncs).

    apt-get install valgrind
    .venv/bin/python bench/redis_instructions.py      # about a minute
"""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable

import numpy as np
import redis

import ceiling  # bench/ceiling.py: the floor's script
import compare  # bench/compare.py: the engine's seed and config
from dispatch._core import new_ulid
from dispatch.records import OrderRec, encode
from dispatch.store.embedded import EmbeddedRedis
from dispatch.store.orders import NODE, DeliverItem, EndItem

DISTS = 8


class Counted:
    """An embedded Redis under callgrind, instrumented only inside :meth:`measure`."""

    def __init__(self, data_dir: str) -> None:
        real = EmbeddedRedis(os.path.join(data_dir, "probe")).binary
        self.out = os.path.join(data_dir, "callgrind")
        os.mkdir(self.out)
        self.wrapper = os.path.join(data_dir, "redis-under-callgrind")
        with open(self.wrapper, "w") as f:
            f.write(f"#!/bin/sh\nexec valgrind --tool=callgrind --instr-atstart=no "
                    f"--callgrind-out-file={self.out}/cg.%p {real} \"$@\" 2>{self.out}/valgrind.log\n")
        os.chmod(self.wrapper, 0o755)
        self.server = EmbeddedRedis(os.path.join(data_dir, "redis"), binary=self.wrapper)

    def _control(self, *args: str) -> None:
        subprocess.run(["callgrind_control", *args, str(self.server.pid)], check=True, capture_output=True)

    async def measure(self, work: Callable[[], Awaitable[int]]) -> tuple[float, float]:
        """Instructions and append-only-file bytes per order of *work* (which returns its
        number of orders)."""
        for f in glob.glob(os.path.join(self.out, "cg.*.*")):
            os.remove(f)
        aof = self.aof_size()
        self._control("-i", "on")
        orders = await work()
        self._control("-i", "off")
        aof = self.aof_size() - aof
        self._control("-d")
        total = 0
        for f in glob.glob(os.path.join(self.out, "cg.*.*")):
            with open(f) as fh:
                total += sum(int(line.split()[1]) for line in fh if line.startswith("totals:"))
        return total / orders, aof / orders

    def aof_size(self) -> int:
        r = redis.Redis.from_url(self.server.url)
        r.config_set("auto-aof-rewrite-percentage", 0)  # a rewrite would shrink the file mid-measure
        return int(r.info("persistence")["aof_current_size"])


def record(status: str, deadline: int = 0) -> bytes:
    mode = "reserve" if deadline else "deliver"
    return encode(OrderRec(id="o", ref="r", digest="digest", sku="s0", qty=1, unit_price=100, currency="CNY",
                           mode=mode, ttl=3600 if deadline else 0, partial=False, status=status,
                           hold=100 if deadline else 0, total=100, delivered=1, deadline=deadline, created=0,
                           updated=0, dat=0, v=0 if deadline else 1))


async def engine_rows(counted: Counted, data_dir: str) -> dict[str, tuple[float, float]]:
    rows = {}
    url = counted.server.url
    for label, skus, batch, warm, n in (("deliver, 1 SKU", 1, 64, 6_400, 6_400),
                                        ("deliver, Zipf", 100, 125, 6_000, 7_000)):
        redis.Redis.from_url(url).flushall()
        async with compare.Engine(compare.config(url, data_dir, True), sweep=False) as engine:
            await compare.seed(engine, skus, warm + n + 1_000)
            picks = (np.random.default_rng(1).choice(skus, size=warm + n, p=compare.zipf_weights(skus, 1.1))
                     if skus > 1 else np.zeros(warm + n, int))
            ids, rec = [new_ulid() for _ in range(warm + n)], record("delivered")

            async def deliver(lo: int, hi: int) -> int:
                for k in range(lo, hi, batch):
                    await engine.store.orders.step("deliver", NODE, [
                        DeliverItem(o, "r" + o, "digest", f"s{picks[j]}", f"d{j % DISTS}", 1, 0, 100, rec)
                        for j, o in enumerate(ids[k:min(k + batch, hi)], k)])
                return hi - lo

            await deliver(0, warm)  # the accounts' hashes past their ziplist encoding
            rows[label] = await counted.measure(lambda: deliver(warm, warm + n))

    redis.Redis.from_url(url).flushall()
    async with compare.Engine(compare.config(url, data_dir, True), sweep=False) as engine:
        warm, n, batch = 6_400, 6_400, 64
        await compare.seed(engine, 1, warm + 3 * n + 1_000)
        deadline = int(time.time() * 1000) + 3_600_000
        ids, rec = [new_ulid() for _ in range(warm + n)], record("reserved", deadline)
        st = engine.store.orders

        async def reserve(lo: int, hi: int) -> int:
            for k in range(lo, hi, batch):
                await st.step("deliver", NODE, [DeliverItem(o, "r" + o, "digest", "s0", "d0", 1, 0, 100, rec, deadline)
                                                for o in ids[k:k + batch]])
            return hi - lo

        async def confirm(lo: int, hi: int) -> int:
            for k in range(lo, hi, batch):
                await st.step("settle", NODE, [EndItem(o, "confirm", "d0") for o in ids[k:k + batch]])
            return hi - lo

        await reserve(0, warm)
        await confirm(0, warm)
        rows["reserve"] = await counted.measure(lambda: reserve(warm, warm + n))
        rows["settle (confirm)"] = await counted.measure(lambda: confirm(warm, warm + n))

        # a round of compare.py's callers: 128 endings over 8 accounts in one call
        more = [new_ulid() for _ in range(2 * n)]
        for k in range(0, 2 * n, 128):
            await st.step("deliver", NODE, [DeliverItem(o, "r" + o, "digest", "s0", f"d{j % DISTS}", 1, 0, 100, rec,
                                                        deadline) for j, o in enumerate(more[k:k + 128], k)])

        async def confirm_round(lo: int, hi: int) -> int:
            for k in range(lo, hi, 128):
                await st.step("settle", NODE, [EndItem(o, "confirm", f"d{j % DISTS}")
                                               for j, o in enumerate(more[k:k + 128], k)])
            return hi - lo

        await confirm_round(0, n)
        rows["settle, 8 accounts"] = await counted.measure(lambda: confirm_round(n, 2 * n))
    return rows


async def floor_row(counted: Counted) -> tuple[float, float]:
    r = redis.asyncio.Redis.from_url(counted.server.url)
    await r.flushall()
    sha = await r.script_load(ceiling.DELIVER)
    pool, _, stats = ceiling.sku_keys("s0")
    for _ in range(14):
        await r.rpush(pool, *[os.urandom(23) + os.urandom(23) for _ in range(1_000)])
    keys = [*ceiling.acct_keys("d0"), pool, stats]

    async def calls(lo: int, hi: int) -> int:
        for base in range(lo, hi, 64):
            args: list[object] = [64, 1]
            for i in range(base, base + 64):
                oid = f"{i:026d}"
                args += [oid, "r" + oid, ceiling.record(oid, "r" + oid)]
            await r.evalsha(sha, len(keys), *keys, *args)
        return hi - lo

    await calls(0, 6_400)
    got = await counted.measure(lambda: calls(6_400, 12_800))
    await r.aclose()
    return got


def main() -> None:
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: apt-get install valgrind")
    with tempfile.TemporaryDirectory() as d:
        counted = Counted(d)
        counted.server.start(timeout=120)
        try:
            rows = asyncio.run(engine_rows(counted, d))
            rows["floor"] = asyncio.run(floor_row(counted))
        finally:
            counted.server.stop()
    print("per order: Redis instructions (callgrind; the kernel's work for Redis is not counted), "
          "and bytes appended to the AOF")
    for label, (n, aof) in rows.items():
        print(f"{label:18} {n:>10,.0f} {aof:>8,.0f}")


if __name__ == "__main__":
    main()
