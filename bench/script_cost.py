"""Redis time per order of each saga step's script (INFO commandstats deltas), on the
embedded Redis (appendfsync always), in batches of 64 single-code orders:

    .venv/bin/python bench/script_cost.py
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
import compare  # noqa: E402

from dispatch._core import new_ulid  # noqa: E402
from dispatch.records import encode as _encode  # noqa: E402
from dispatch.store.embedded import EmbeddedRedis  # noqa: E402

BATCH, ORDERS = 64, 64 * 800


async def usec(engine: compare.Engine) -> int:
    return (await engine.store.client.info("commandstats"))["cmdstat_evalsha"]["usec"]


async def main(url: str, data_dir: str) -> None:
    async with compare.Engine(compare.config(url, data_dir, True), sweep=False) as engine:
        await compare.seed(engine, 1, ORDERS + 1000)
        st = engine.store
        ids = [new_ulid() for _ in range(ORDERS)]
        steps = {
            "begin": ("d0", lambda o: (o, "r" + o, "digest", "s0", 1, 100, "CNY", "deliver", 0, 0)),
            "take": ("s0", lambda o: (o, 1, 0, "deliver")),
            "commit": ("d0", lambda o: (o, "ok", 1, _encode([b"x" * 45]))),
        }
        for name, (shard, item) in steps.items():
            before = await usec(engine)
            for k in range(0, ORDERS, BATCH):
                await st.step(name, shard, [item(o) for o in ids[k:k + BATCH]])
            print(f"{name:7} {(await usec(engine) - before) / ORDERS:6.1f} us of Redis time per order")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d, EmbeddedRedis(os.path.join(d, "r")) as server:
        asyncio.run(main(server.url, d))
