"""The catalog in Redis: SKUs (metadata and counters, on their own shards), tiers.

A SKU spread over buckets (``buckets`` > 1) has a shard per bucket (keys.bucket_shard),
each with a copy of its metadata and counters of its own; ``spread`` in the SKU's own
metadata is the most buckets it ever had (every one that may hold its codes), and the
SKU's counters are the sums over those.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from ..models import Tier
from . import keys
from .replies import SkuState, translated

if TYPE_CHECKING:
    from .store import Store

__all__ = ["CatalogStore", "COUNTERS"]

_decode_tier = msgspec.msgpack.Decoder(Tier).decode
#: The counters of a SKU's codes by state, summed over its buckets.
COUNTERS = ("accepted", "available", "reserved", "sold", "voided", "invalidated", "parked", "expired")
#: Also summed over a SKU's buckets: its codes on sale reaching their sell-by soon.
_SUMMED = (*COUNTERS, "expiring")


def _sku_state(meta: dict[bytes, bytes], stats: dict[bytes, bytes]) -> SkuState:
    m = {a.decode(): b.decode() for a, b in meta.items() if a != keys.PIN_FIELD}
    spread = int(m.pop("spread", 1))
    return SkuState(m, {a.decode(): int(b) for a, b in stats.items() if a != keys.PIN_FIELD}, spread)


class CatalogStore:
    def __init__(self, db: Store) -> None:
        self._db = db

    async def create_sku(self, sku: str, fields: dict[str, Any]) -> bool:
        """A new SKU with *fields* as its metadata; False if it exists."""
        with translated():
            await self._db.client.sadd(keys.SKUS, sku)  # first: a listed id without meta is skipped
        buckets = int(fields.get("buckets", 1))
        if await self._db.put(keys.SkuKeys(sku).meta, "create", {**fields, "spread": buckets}) != "ok":
            return False
        await self._copy_meta(sku, buckets, {})  # a new SKU has no codes to sell yet
        await self._pin(sku, buckets)
        return True

    async def update_sku(self, sku: str, fields: dict[str, Any]) -> bool:
        """Change a SKU's metadata (in every bucket); False if there is no such SKU. More
        buckets widen its spread; fewer leave it (the others still hold codes)."""
        spread = await self.spread(sku)
        if "buckets" in fields:
            spread = max(spread, int(fields["buckets"]))
            fields = {**fields, "spread": spread}
        await self._copy_meta(sku, spread, fields)
        if await self._db.put(keys.SkuKeys(sku).meta, "update", fields) != "ok":
            return False
        await self._pin(sku, spread)  # (a SKU made before the pin gets it here)
        return True

    async def _copy_meta(self, sku: str, spread: int, changes: dict[str, Any]) -> None:
        """The SKU's metadata with *changes* copied to its buckets 1..spread-1 (their
        scripts check it), before the SKU's own shard changes: a take looks in a bucket
        as soon as the SKU's spread names it."""
        if spread == 1:
            return
        with translated():
            meta = {k.decode(): v for k, v in (await self._db.client.hgetall(keys.SkuKeys(sku).meta)).items()}
            meta.update(changes)
            meta.pop("spread", None)
            for b in range(1, spread):
                await self._db.client.hset(keys.SkuKeys(keys.bucket_shard(sku, b)).meta, mapping=meta)

    async def _pin(self, sku: str, spread: int) -> None:
        """The metadata, counters, delivery records and their codes, batch counters and sales
        by hour of each shard of the SKU kept hash tables (keys.PIN)."""
        with translated():
            async with self._db.client.pipeline(transaction=False) as p:
                for b in range(spread):
                    k = keys.SkuKeys(keys.bucket_shard(sku, b))
                    for key in (k.meta, k.stats, k.dlv, k.dlv_codes, k.batch_stats, k.sales):
                        p.hset(key, keys.PIN, keys.PIN_VALUE)
                await p.execute()

    def buckets_on_every_master(self, sku: str) -> int:
        masters, seen = set(self._db.masters()), set()
        for b in range(keys.MAX_BUCKETS):
            seen.add(self._db.node_of(keys.sku_tag(keys.bucket_shard(sku, b))))
            if seen >= masters:
                return b + 1
        return keys.MAX_BUCKETS

    async def spread(self, sku: str) -> int:
        """The buckets that may hold the SKU's codes: 0..spread-1 (1 when unknown)."""
        with translated():
            return int(await self._db.client.hget(keys.SkuKeys(sku).meta, "spread") or 1)

    async def shards(self, sku: str) -> list[str]:
        """The shard ids of every bucket of the SKU that may hold its codes."""
        return [keys.bucket_shard(sku, b) for b in range(await self.spread(sku))]

    async def shards_of(self, skus: Sequence[str]) -> list[list[str]]:
        """:meth:`shards` of many SKUs, in one pipelined round."""
        if not skus:
            return []
        with translated():
            async with self._db.client.pipeline(transaction=False) as p:
                for sku in skus:
                    p.hget(keys.SkuKeys(sku).meta, "spread")
                spreads = await p.execute()
        return [[keys.bucket_shard(sku, b) for b in range(int(n or 1))] for sku, n in zip(skus, spreads)]

    async def counters(self, shard: str) -> dict[str, int]:
        """The counters of one shard of a SKU (its own, or a bucket's), as kept there."""
        with translated():
            stats = await self._db.client.hgetall(keys.SkuKeys(shard).stats)
        return {f.decode(): int(v) for f, v in stats.items() if f != keys.PIN_FIELD}

    async def sku_ids(self) -> list[str]:
        return await self._db.members(keys.SKUS)

    async def sku(self, sku: str) -> SkuState:
        return (await self.skus([sku]))[0]

    async def skus(self, ids: Sequence[str]) -> list[SkuState]:
        """:meth:`sku` of many SKUs in one pipelined round (and one more for the buckets
        of those spread over several)."""
        with translated():
            async with self._db.client.pipeline(transaction=False) as p:
                for sku in ids:
                    k = keys.SkuKeys(sku)
                    p.hgetall(k.meta)
                    p.hgetall(k.stats)
                flat = await p.execute()
            states = [_sku_state(meta, stats) for meta, stats in zip(flat[0::2], flat[1::2])]
            spread = [(st, keys.bucket_shard(sku, b)) for sku, st in zip(ids, states) for b in range(1, st.spread)]
            if spread:
                async with self._db.client.pipeline(transaction=False) as p:
                    for _, shard in spread:
                        p.hmget(keys.SkuKeys(shard).stats, _SUMMED)
                    for (st, _), counts in zip(spread, await p.execute()):
                        for f, n in zip(_SUMMED, counts):
                            st.stats[f] = st.stats.get(f, 0) + int(n or 0)
        return states

    async def hourly_sales(self, sku: str) -> dict[int, int]:
        """Codes of *sku* sold per hour (unix ms // 3,600,000), over its buckets."""
        out: dict[int, int] = {}
        with translated():
            for shard in await self.shards(sku):
                for h, n in (await self._db.client.hgetall(keys.SkuKeys(shard).sales)).items():
                    if h != keys.PIN_FIELD:
                        out[int(h)] = out.get(int(h), 0) + int(n)
        return out

    async def create_tier(self, tier: Tier) -> bool:
        """False if a tier of that id exists."""
        with translated():
            return bool(await self._db.client.hsetnx(keys.TIERS, tier.tier, msgspec.msgpack.encode(tier)))

    async def tier(self, tier: str) -> Tier | None:
        with translated():
            raw = await self._db.client.hget(keys.TIERS, tier)
        return None if raw is None else _decode_tier(raw)

    async def tiers(self) -> list[Tier]:
        with translated():
            raw = await self._db.client.hgetall(keys.TIERS)
        return [_decode_tier(v) for _, v in sorted(raw.items())]
