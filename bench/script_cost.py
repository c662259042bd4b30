"""Redis time per order of each saga step's script (INFO commandstats deltas), on the
embedded Redis (appendfsync always), in batches of 64 single-code orders: a purchase
in deliver mode (take, buy, and the keep that rides along with later takes) and one
in reserve mode (begin, take, commit; the confirm is not counted):

    .venv/bin/python bench/script_cost.py
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile

import redis.asyncio as aioredis

sys.path.insert(0, os.path.dirname(__file__))
import compare  # noqa: E402

from dispatch._core import new_ulid  # noqa: E402
from dispatch.records import OrderRec  # noqa: E402
from dispatch.store.orders import NODE, DeliverItem, TakeItem  # noqa: E402
from dispatch.records import encode as _encode  # noqa: E402
from dispatch.store.embedded import EmbeddedRedis  # noqa: E402

BATCH, ORDERS = 64, 64 * 800


async def usec(client: aioredis.Redis) -> int:
    return (await client.info("commandstats"))["cmdstat_evalsha"]["usec"]


async def main(url: str, data_dir: str) -> None:
    async with compare.Engine(compare.config(url, data_dir, True), sweep=False) as engine:
        await compare.seed(engine, 1, 2 * ORDERS + 1000)
        st = engine.store.orders
        client = aioredis.from_url(url)
        blob = _encode([b"x" * 45])
        record = _encode(OrderRec(id="o", ref="r", digest="digest", sku="s0", qty=1, unit_price=100, currency="CNY",
                                  mode="deliver", ttl=0, partial=False, status="delivered", hold=0, total=100,
                                  delivered=1, deadline=0, created=0, updated=0, dat=0, v=1))
        sagas = {
            "deliver": [
                ("deliver", NODE, lambda o: DeliverItem(o, "r" + o, "digest", "s0", "d0", 1, 0, 100, record)),
            ],
            "reserve": [
                ("begin", "d0", lambda o: (o, "r" + o, "digest", "s0", 1, 100, "CNY", "reserve", 60, 0)),
                ("take", "s0", lambda o: TakeItem(o, 1, 0, 0)),
                ("commit", "d0", lambda o: (o, "ok", 1, blob)),
            ],
        }
        for saga, steps in sagas.items():
            ids = [new_ulid() for _ in range(ORDERS)]
            total = 0.0
            for name, shard, item in steps:
                before = await usec(client)
                for k in range(0, ORDERS, BATCH):
                    await st.step(name, shard, [item(o) for o in ids[k:k + BATCH]])
                cost = (await usec(client) - before) / ORDERS
                total += cost
                print(f"{saga:8} {name:7} {cost:6.1f} us of Redis time per order")
            print(f"{saga:8} {'total':7} {total:6.1f} us")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d, EmbeddedRedis(os.path.join(d, "r")) as server:
        asyncio.run(main(server.url, d))
