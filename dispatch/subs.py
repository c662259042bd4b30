"""Sub-distributors: a distributor's own resellers, up to ``MAX_SUB_DEPTH`` levels below it.

A distributor creates and manages its own subs: their API keys, status, allowed SKUs and
a markup over its own price. A sub's id is its parent's, ``~`` and its own name
(``shop-1~agent-a``), so its ancestors are in its id and its keys carry its root's hash
tag (``store/keys.py``, ``acct_tag``): the script that charges a sub credits every
ancestor its margin and checks their status in the same call, on one Redis or a cluster.

Prices: the root pays its own price P0 (``Catalog.unit_price``, by its tier); each sub
pays its parent's price plus its markup, ``P(k) = P(k-1) + markups[sku]`` where its
parent set one for the SKU, else ``P(k-1) * markup_bps / 10000`` rounded half up. An
order of the sub at level n charges it P(n) a code and credits ancestor k (root 0) its
margin P(k+1) - P(k) a code; what the platform gets is P0. The margins travel with the
order (``OrderRec.mg``, ``bp``) so every script that pays or refunds it moves them too.

A parent sees its own subs, their balances, orders (never their codes) and the margin
it earned on each; a sub sees nothing of its parent or siblings (its API key is a
distributor's key, its reads its own).
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from .accounts import Accounts, allowed_field
from .catalog import Catalog
from .config import Config
from .errors import ConflictError, NotFoundError, ValidationError
from .models import (MAX_SUB_DEPTH, Id, NewSubDistributor, SubDistributor, SubOrder, SubOrderPage)
from .records import PAID, check, check_ref, ms_to_dt
from .store import Store
from .store.keys import SUB

__all__ = ["Subs", "ancestors", "is_sub"]

_UNSET: Any = msgspec.UNSET


def is_sub(distributor: str) -> bool:
    return SUB in distributor


def ancestors(distributor: str) -> list[str]:
    """The ids of *distributor*'s ancestors, root first (none for a distributor)."""
    parts = distributor.split(SUB)
    return [SUB.join(parts[:k]) for k in range(1, len(parts))]


def marked_up(price: int, sub: SubDistributor, sku: str) -> int:
    """A sub's price of *sku* over its parent's *price*."""
    explicit = sub.markups.get(sku)
    if explicit is not None:
        return price + explicit
    return price + (price * sub.markup_bps + 5_000) // 10_000  # half up, in integers


class Subs:
    """Sub-distributors of a distributor, their prices, transfers and the parent's reads."""

    def __init__(self, store: Store, config: Config, catalog: Catalog, accounts: Accounts) -> None:
        self._store = store
        self._config = config
        self._catalog = catalog
        self._accounts = accounts
        self._markups: dict[str, tuple[float, SubDistributor]] = {}

    # ---- prices ----------------------------------------------------------------------
    async def price(self, distributor: str, sku: str) -> tuple[int, str, list[int]]:
        """(unit price, currency, margins per code of its ancestors, root first) of *sku*
        for *distributor*; no margins for a distributor that is no sub. Markups are
        cached for ``catalog_ttl_s``, as tiers are."""
        chain = [*ancestors(distributor), distributor]
        price, currency = await self._catalog.unit_price(chain[0], sku)
        prices = [price]
        for sub in chain[1:]:
            prices.append(marked_up(prices[-1], await self._cached(sub), sku))
        return prices[-1], currency, [b - a for a, b in zip(prices, prices[1:])]

    async def _cached(self, sub: str) -> SubDistributor:
        hit = self._markups.get(sub)
        now = time.monotonic()
        if hit is None or hit[0] <= now:
            if len(self._markups) > 100_000:
                self._markups.clear()
            hit = self._markups[sub] = (now + self._config.catalog_ttl_s, await self._read(sub))
        return hit[1]

    # ---- management ------------------------------------------------------------------
    async def create_subdistributor(self, parent: str, name: str, display_name: str, *,
                                    markup_bps: int = 0, markups: dict[str, int] | None = None,
                                    allowed_skus: list[str] | None = None) -> NewSubDistributor:
        """A new sub-distributor of *parent*, with id ``<parent>~<name>``; its API key is
        in this answer only."""
        check(name, Id, "subdistributor")
        sub_id = parent + SUB + name
        if sub_id.count(SUB) > MAX_SUB_DEPTH:
            raise ValidationError(f"sub-distributors go at most {MAX_SUB_DEPTH} levels below a distributor")
        s = check(dict(subdistributor=sub_id, parent=parent, name=display_name, markup_bps=markup_bps,
                       markups=markups or {}, allowed_skus=allowed_skus, depth=sub_id.count(SUB)),
                  SubDistributor, "subdistributor")
        if not await self._store.accounts.exists(parent):
            raise NotFoundError(f"unknown distributor {parent}")
        fields = {"name": s.name, "tier": "", "credit_limit": 0, "allowed": allowed_field(s.allowed_skus),
                  "status": "active", "balance": 0, "held": 0, "markup_bps": s.markup_bps,
                  "markups": msgspec.json.encode(s.markups).decode(), "created": time.time_ns() // 1_000_000}
        if not await self._store.accounts.create(sub_id, fields):
            raise ConflictError(f"sub-distributor {sub_id} exists already")
        await self._store.accounts.add_child(parent, sub_id)
        return NewSubDistributor(subdistributor=s, api_key=await self._accounts.rotate_api_key(sub_id))

    async def update_subdistributor(self, parent: str, sub: str, *, name: str = _UNSET, status: str = _UNSET,
                                    allowed_skus: list[str] | None = _UNSET, markup_bps: int = _UNSET,
                                    markups: dict[str, int] = _UNSET) -> SubDistributor:
        """Change one of *parent*'s own subs; ``status="suspended"`` stops its orders, and
        its whole subtree's, at once."""
        current = await self.get_subdistributor(parent, sub)
        changes = {k: v for k, v in dict(name=name, status=status, allowed_skus=allowed_skus,
                                         markup_bps=markup_bps, markups=markups).items() if v is not _UNSET}
        s = check(msgspec.structs.asdict(current) | changes, SubDistributor, "subdistributor")
        fields: dict[str, Any] = {}
        for k in changes:
            if k == "allowed_skus":
                fields["allowed"] = allowed_field(s.allowed_skus)
            elif k == "markups":
                fields["markups"] = msgspec.json.encode(s.markups).decode()
            else:
                fields[k] = getattr(s, k)
        await self._store.accounts.update(sub, fields)
        self._markups.pop(sub, None)
        return s

    async def get_subdistributor(self, parent: str, sub: str) -> SubDistributor:
        """One of *parent*'s own subs (another's, or a grandchild, is not found)."""
        if sub.rpartition(SUB)[0] != parent:
            raise NotFoundError(f"no sub-distributor {sub}")
        return await self._read(sub)

    async def _read(self, sub: str) -> SubDistributor:
        a = await self._store.accounts.get(sub)
        if a is None:
            raise NotFoundError(f"no sub-distributor {sub}")
        return SubDistributor(subdistributor=sub, parent=sub.rpartition(SUB)[0], name=a.name,
                              status=a.status,  # type: ignore[arg-type]
                              allowed_skus=None if a.allowed == "*" else [x for x in a.allowed.split(",") if x],
                              markup_bps=a.markup_bps, markups=msgspec.json.decode(a.markups or "{}"),
                              depth=sub.count(SUB), balance=a.balance, held=a.held)

    async def list_subdistributors(self, parent: str) -> list[SubDistributor]:
        """*parent*'s own subs, by id."""
        return [await self._read(s) for s in await self._store.accounts.children(parent)]

    async def rotate_subdistributor_key(self, parent: str, sub: str) -> str:
        """A new API key for one of *parent*'s subs; the old one stops working."""
        await self.get_subdistributor(parent, sub)
        return await self._accounts.rotate_api_key(sub)

    async def transfer(self, parent: str, sub: str, amount: int, reference: str) -> SubDistributor:
        """Move *amount* of *parent*'s balance (not its credit) to its sub's, once per
        *reference*: a ``transfer`` ledger entry on each side."""
        await self.get_subdistributor(parent, sub)
        amount = check(amount, int, "amount")
        if amount <= 0:
            raise ValidationError("amount must be a positive integer (minor units)")
        await self._store.accounts.transfer(parent, sub, check_ref(reference, "reference"), amount)
        return await self._read(sub)

    # ---- the parent's reads ------------------------------------------------------------
    async def subdistributor_orders(self, parent: str, sub: str, *, cursor: str | None = None,
                                    limit: int = 50) -> SubOrderPage:
        """One of *parent*'s subs' orders, oldest first, a page at a time: never their
        codes; each with the margin *parent* earned on it."""
        await self.get_subdistributor(parent, sub)
        if not isinstance(limit, int) or not 1 <= limit <= 500:
            raise ValidationError("limit must be an integer from 1 to 500")
        level = parent.count(SUB)  # the parent's place in the sub's chain (root 0)
        rows = await self._store.orders.order_records(sub, cursor or "", "~", limit)
        out = []
        for rec, _codes in rows:  # the codes are read with the records and dropped here
            m = rec.mg[level] if rec.mg and level < len(rec.mg) else 0
            kept = (rec.delivered if rec.status in PAID else 0) - (rec.refunded // rec.unit_price
                                                                   if rec.unit_price else 0)
            created = ms_to_dt(rec.created)
            out.append(SubOrder(order_id=rec.id, external_ref=rec.ref, sku=rec.sku, qty=rec.qty,
                                delivered=rec.delivered, unit_price=rec.unit_price, total=rec.total,
                                currency=rec.currency, status=rec.status,  # type: ignore[arg-type]
                                refunded=rec.refunded, created_at=created, updated_at=ms_to_dt(rec.updated),
                                margin=m * kept))
        return SubOrderPage(orders=out, next_cursor=rows[-1][0].id if len(rows) == limit else None)
