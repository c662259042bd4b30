"""The catalog: SKUs, tiers, the price a distributor pays (cached), and stock figures."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec

from .config import Config
from .errors import ConflictError, NotFoundError, UnknownSkuError
from .forecast import forecast
from .models import CatalogItem, Forecast, Sku, SkuDetail, Stock, Tier
from .paging import window
from .records import check
from .shared import SharedLoads
from .store import Store
from .store.replies import SkuState

__all__ = ["Catalog"]

_UNSET: Any = msgspec.UNSET


#: SKU fields kept in its metadata HASH as JSON (the others are plain strings).
_JSON_FIELDS = ("code_rule", "pin_rule")


def _meta_of(fields: dict[str, Any]) -> dict[str, Any]:
    """SKU fields as its metadata HASH keeps them."""
    return {k: msgspec.json.encode(v) if k in _JSON_FIELDS else int(v) if isinstance(v, bool) else v
            for k, v in fields.items()}


def sku_of(sku: str, meta: dict[str, str]) -> Sku:
    """A SKU from its metadata HASH."""
    fields: dict[str, Any] = {"sku": sku, **meta}
    for k in _JSON_FIELDS:
        if k in fields:
            fields[k] = msgspec.json.decode(fields[k])
    return msgspec.convert(fields, Sku, strict=False)


def _plain(value: Any) -> Any:
    """A Struct argument as builtins, so check() validates every field alike."""
    return msgspec.to_builtins(value) if isinstance(value, msgspec.Struct) else value


def stock_of(sku: str, state: SkuState) -> Stock:
    """A SKU's codes by state, from its counters."""
    stats = state.stats
    available = stats.get("available", 0)
    threshold = int(state.meta.get("low_stock_threshold", 0))
    level = "out_of_stock" if available <= 0 else "low_stock" if available <= threshold else "in_stock"
    return Stock(sku=sku, accepted=stats.get("accepted", 0), available=available,
                 reserved=stats.get("reserved", 0), sold=stats.get("sold", 0), voided=stats.get("voided", 0),
                 invalidated=stats.get("invalidated", 0), stock_status=level, parked=stats.get("parked", 0),
                 expired=stats.get("expired", 0), expiring=stats.get("expiring", 0))


class Catalog:
    """SKUs and tiers, and the (distributor, SKU) -> price cache of the purchase path.

    Prices are cached for ``catalog_ttl_s``: a price or tier change reaches buyers
    within it, while pausing a SKU or suspending a distributor acts at once (the
    scripts check those)."""

    def __init__(self, store: Store, config: Config) -> None:
        self._store = store
        self._config = config
        self._cache: SharedLoads[tuple[str, str], Any] = SharedLoads(config.catalog_ttl_s)
        self._prices: dict[tuple[str, str], tuple[float, tuple[int, str]]] = {}
        self._spreads: dict[str, tuple[float, tuple[int, int]]] = {}

    # ---- SKUs ------------------------------------------------------------------------
    async def create_sku(self, sku: str, name: str, face_value: int, currency: str, price: int,
                         low_stock_threshold: int = 0, *, sale_order: str = "oldest_first",
                         after_sales: str = "refund", code_rule: Any = None, pin_rule: Any = None,
                         free: bool = False, min_shelf_life_s: int = 0, buckets: int = 1) -> Sku:
        """A new SKU. *code_rule* and *pin_rule* (CodeRule, or a dict of its fields) say
        what its imported codes and PINs must look like; *buckets* the shards its stock
        is spread over."""
        s = check(dict(sku=sku, name=name, face_value=face_value, currency=currency, price=price,
                       low_stock_threshold=low_stock_threshold, sale_order=sale_order, after_sales=after_sales,
                       code_rule=_plain(code_rule), pin_rule=_plain(pin_rule), free=free,
                       min_shelf_life_s=min_shelf_life_s, buckets=buckets),
                  Sku, "SKU")
        fields = msgspec.structs.asdict(s)
        del fields["sku"]
        if not await self._store.catalog.create_sku(s.sku, _meta_of(fields)):
            raise ConflictError(f"SKU {s.sku} exists already")
        return s

    async def update_sku(self, sku: str, *, name: str = _UNSET, price: int = _UNSET,
                         low_stock_threshold: int = _UNSET, status: str = _UNSET, sale_order: str = _UNSET,
                         after_sales: str = _UNSET, code_rule: Any = _UNSET, pin_rule: Any = _UNSET,
                         free: bool = _UNSET, min_shelf_life_s: int = _UNSET, buckets: int = _UNSET) -> Sku:
        """Change a SKU; ``status="paused"`` stops its sales at once; a rule of None
        takes any code (or PIN) from then on. A new number of ``buckets`` takes the
        imports that follow; codes stay in the buckets they are in, and orders look in
        every bucket that may hold some (purchasers see the change within
        ``catalog_ttl_s``)."""
        current = await self.get_sku(sku)
        changes = {k: _plain(v) for k, v in dict(name=name, price=price, low_stock_threshold=low_stock_threshold,
                                                 status=status, sale_order=sale_order, after_sales=after_sales,
                                                 code_rule=code_rule, pin_rule=pin_rule,
                                                 free=free, min_shelf_life_s=min_shelf_life_s,
                                                 buckets=buckets).items()
                   if v is not _UNSET}
        merged = msgspec.to_builtins(current) | changes
        if merged.get("price") == 0 and not merged.get("free"):
            raise ConflictError(f"SKU {sku}: price 0 is only for a SKU marked free (free: true)")
        s = check(merged, Sku, "SKU")
        if not await self._store.catalog.update_sku(sku, _meta_of({k: getattr(s, k) for k in changes})):
            raise UnknownSkuError(f"unknown SKU {sku}")
        self._cache.forget(("sku", sku))
        self._cache.forget(("buckets", sku))
        self._prices.clear()
        self._spreads.pop(sku, None)
        return s

    async def get_sku(self, sku: str) -> Sku:
        meta = (await self._store.catalog.sku(sku)).meta
        if not meta:
            raise UnknownSkuError(f"unknown SKU {sku}")
        return sku_of(sku, meta)

    async def list_skus(self, *, after: str | None = None, limit: int | None = None) -> list[Sku]:
        """SKUs by id: those after *after*, at most *limit*."""
        ids = window(await self._store.catalog.sku_ids(), after, limit)
        return [sku_of(sku, st.meta) for sku, st in zip(ids, await self._store.catalog.skus(ids)) if st.meta]

    async def sku_details(self, *, after: str | None = None, limit: int | None = None) -> list[SkuDetail]:
        """:meth:`list_skus` with each SKU's stock and restock forecast."""
        ids = window(await self._store.catalog.sku_ids(), after, limit)
        found = [(sku, st) for sku, st in zip(ids, await self._store.catalog.skus(ids)) if st.meta]
        stocks = [stock_of(sku, st) for sku, st in found]
        for stock, fc in zip(stocks, await asyncio.gather(*(self.forecast(s.sku, s.available) for s in stocks))):
            stock.forecast = fc
        return [SkuDetail(**msgspec.structs.asdict(sku_of(sku, st.meta)), stock=stock)
                for (sku, st), stock in zip(found, stocks)]

    async def sku_detail(self, sku: str) -> SkuDetail:
        """A SKU with its stock and restock forecast."""
        s, stock = await asyncio.gather(self.get_sku(sku), self.stock(sku))
        return SkuDetail(**msgspec.structs.asdict(s), stock=stock)

    # ---- tiers -----------------------------------------------------------------------
    async def create_tier(self, tier: str, discount_bps: int = 0, prices: dict[str, int] | None = None) -> Tier:
        t = check(dict(tier=tier, discount_bps=discount_bps, prices=prices or {}), Tier, "tier")
        if not await self._store.catalog.create_tier(t):
            raise ConflictError(f"tier {t.tier} exists already")
        return t

    async def get_tier(self, tier: str) -> Tier:
        t = await self._store.catalog.tier(tier)
        if t is None:
            raise NotFoundError(f"unknown tier {tier}")
        return t

    async def list_tiers(self, *, after: str | None = None, limit: int | None = None) -> list[Tier]:
        """Tiers by id: those after *after*, at most *limit*."""
        tiers = {t.tier: t for t in await self._store.catalog.tiers()}
        return [tiers[t] for t in window(tiers, after, limit)]

    # ---- prices ----------------------------------------------------------------------
    async def unit_price(self, distributor: str, sku: str) -> tuple[int, str]:
        """(unit price, currency) of *sku* for *distributor*, by its tier."""
        hit = self._prices.get((distributor, sku))
        if hit is not None and hit[0] > time.monotonic():  # the hot path: one dict lookup
            return hit[1]
        s: Sku = await self._cached("sku", sku, self.get_sku)
        tier_id: str | None = await self._cached("dist", distributor, self._tier_of)
        price = (s.price, s.currency)
        if tier_id is not None:
            t: Tier = await self._cached("tier", tier_id, self.get_tier)
            price = (t.price_of(s), s.currency)
        if len(self._prices) > 100_000:
            self._prices.clear()
        self._prices[distributor, sku] = (time.monotonic() + self._config.catalog_ttl_s, price)
        return price

    def buckets_on_every_master(self, sku: str) -> int:
        """The fewest buckets of *sku* that put one on every master as the cluster's slots
        are served now (1 on one Redis; at most 16), so that every buyer's purchase of it
        is one step: a bucket's master is its hash slot's."""
        return self._store.catalog.buckets_on_every_master(sku)

    async def buckets(self, sku: str) -> tuple[int, int]:
        """(buckets, spread) of *sku*: new codes go to buckets 0..buckets-1, and
        0..spread-1 may hold some. Cached for ``catalog_ttl_s``."""
        hit = self._spreads.get(sku)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        got: tuple[int, int] = await self._cached("buckets", sku, self._buckets)
        if len(self._spreads) > 100_000:
            self._spreads.clear()
        self._spreads[sku] = (time.monotonic() + self._config.catalog_ttl_s, got)
        return got

    async def _buckets(self, sku: str) -> tuple[int, int]:
        s: Sku = await self._cached("sku", sku, self.get_sku)
        return s.buckets, max(s.buckets, await self._store.catalog.spread(sku))

    def forget_distributor(self, distributor: str) -> None:
        """Its tier changed (or its account did): its prices are looked up afresh."""
        self._cache.forget(("dist", distributor))
        self._prices.clear()

    async def _tier_of(self, distributor: str) -> str | None:
        a = await self._store.accounts.get(distributor)
        if a is None:
            raise NotFoundError(f"unknown distributor {distributor}")
        return a.tier or None

    async def _cached(self, kind: str, key: str, load: Any) -> Any:
        return await self._cache.get((kind, key), lambda: load(key))

    # ---- stock -----------------------------------------------------------------------
    async def stock(self, sku: str) -> Stock:
        """A SKU's codes by state, with a restock forecast from its recent sales."""
        state = await self._store.catalog.sku(sku)
        if not state.meta:
            raise UnknownSkuError(f"unknown SKU {sku}")
        stock = stock_of(sku, state)
        stock.forecast = await self.forecast(sku, stock.available)
        return stock

    async def stocks(self) -> list[Stock]:
        """The stock of every SKU, read in one round (for metrics)."""
        ids = await self._store.catalog.sku_ids()
        return [stock_of(sku, st) for sku, st in zip(ids, await self._store.catalog.skus(ids)) if st.meta]

    async def forecast(self, sku: str, available: int) -> Forecast:
        """Days of cover and a reorder quantity for *sku* from its hourly sales."""
        return forecast(await self._store.catalog.hourly_sales(sku), time.time_ns() // 3_600_000_000_000, available,
                        window_days=self._config.forecast_window_days,
                        lead_time_days=self._config.restock_lead_time_days)

    async def offer(self, tier: str | None, allowed: list[str] | None) -> list[CatalogItem]:
        """The active SKUs among *allowed* (None: all), at the price of *tier* (None: the
        base price), with their stock status."""
        t = await self.get_tier(tier) if tier is not None else None
        ids = [s for s in await self._store.catalog.sku_ids() if allowed is None or s in allowed]
        out = []
        for sku, st in zip(ids, await self._store.catalog.skus(ids)):
            if not st.meta or st.meta.get("status") != "active":
                continue
            s = sku_of(sku, st.meta)
            out.append(CatalogItem(sku=sku, name=s.name, face_value=s.face_value, currency=s.currency,
                                   price=t.price_of(s) if t is not None else s.price,
                                   stock_status=stock_of(sku, st).stock_status))
        return out
