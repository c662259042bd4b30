"""The catalog in Redis: SKUs (metadata and counters, on their own shards), tiers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from ..models import Tier
from . import keys
from .replies import SkuState, translated

if TYPE_CHECKING:
    from .store import Store

__all__ = ["CatalogStore"]

_decode_tier = msgspec.msgpack.Decoder(Tier).decode


def _sku_state(meta: dict[bytes, bytes], stats: dict[bytes, bytes]) -> SkuState:
    return SkuState({a.decode(): b.decode() for a, b in meta.items()}, {a.decode(): int(b) for a, b in stats.items()})


class CatalogStore:
    def __init__(self, db: Store) -> None:
        self._db = db

    async def create_sku(self, sku: str, fields: dict[str, Any]) -> bool:
        """A new SKU with *fields* as its metadata; False if it exists."""
        with translated():
            await self._db.client.sadd(keys.SKUS, sku)  # first: a listed id without meta is skipped
        return await self._db.put(keys.SkuKeys(sku).meta, "create", fields) == "ok"

    async def update_sku(self, sku: str, fields: dict[str, Any]) -> bool:
        """Change a SKU's metadata; False if there is no such SKU."""
        return await self._db.put(keys.SkuKeys(sku).meta, "update", fields) == "ok"

    async def sku_ids(self) -> list[str]:
        return await self._db.members(keys.SKUS)

    async def sku(self, sku: str) -> SkuState:
        return (await self.skus([sku]))[0]

    async def skus(self, ids: Sequence[str]) -> list[SkuState]:
        """:meth:`sku` of many SKUs in one pipelined round."""
        with translated():
            async with self._db.client.pipeline(transaction=False) as p:
                for sku in ids:
                    k = keys.SkuKeys(sku)
                    p.hgetall(k.meta)
                    p.hgetall(k.stats)
                flat = await p.execute()
        return [_sku_state(meta, stats) for meta, stats in zip(flat[0::2], flat[1::2])]

    async def hourly_sales(self, sku: str) -> dict[int, int]:
        """Codes of *sku* sold per hour (unix ms // 3,600,000)."""
        with translated():
            raw = await self._db.client.hgetall(keys.SkuKeys(sku).sales)
        return {int(h): int(n) for h, n in raw.items()}

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
