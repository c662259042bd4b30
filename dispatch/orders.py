"""Orders: purchases (delivered at once, or reserved until confirmed), their reads, and
the saga steps the recovery sweep uses to finish them.

Where one node holds the buyer's account and the SKU's shard (one Redis always; on a
Redis Cluster, a master holding both, or a bucket of the SKU), a purchase is one
script (``deliver``) on that node, coalesced with every other purchase of its round
there: it checks the external_ref, the distributor, the SKU and the money before
taking a code, then takes and debits (or holds the money and starts the lease) and
records at once; on one Redis ending a reservation is one script too (``settle``, both
sides). A refused order never touches stock, and nothing is ever half done: a retry of
the same external_ref finds the order, or makes it.

Otherwise (a cluster whose masters split the two, or a spread SKU whose first bucket
is out of stock), a purchase is a short saga of idempotent steps, each one Lua script
on one shard, coalesced per shard (sagas.py): ``begin`` (account: hold the money),
``take`` (SKU: codes reserved, or sold), ``commit`` (account: start the lease, or
charge and deliver); ending such a reservation is ``settle`` (account, which fences)
then ``sku_settle`` (SKU). A SKU spread over buckets is taken from the buckets of the
plan its order keeps from ``begin`` (:func:`plan_of`), in turn. Until its last step is
done an order sits in its account's ``pending`` set; the sweep drives any left there
by a crash to its end.
"""

from __future__ import annotations

import hashlib
import time
import zlib
from collections.abc import Awaitable, Iterable
from datetime import datetime
from functools import lru_cache
from typing import Literal

from . import imports
from .catalog import Catalog
from .config import Config
from .errors import (DispatchError, IdempotencyConflictError, NotFoundError, OutOfStockError, PriceChangedError,
                     ReservationExpiredError, ValidationError)
from .models import Code, Order, OrderPage
from .records import PAID, OrderRec, check_ref, encode, ms_id_floor, ms_to_dt, new_id
from .sagas import Sagas
from .subs import Subs
from .store import Store
from .store.keys import SUB, bucket_shard
from .store.orders import MOVED, NODE, BeginItem, CommitItem, DeliverItem, EndItem, OrderRef, SettleItem, TakeItem
from .store.replies import Existing, Settled, refusal
from .vault import Vault

__all__ = ["Orders"]

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


@lru_cache(maxsize=4096)
def _digest(*request: object) -> str:
    """What an external_ref's request asked for, to tell its replay from another request
    (the same few requests come again and again: each is hashed once)."""
    return hashlib.sha256(encode(request)).hexdigest()[:32]


def plan_of(order_id: str, buckets: int, spread: int) -> str:
    """The buckets an order's take looks in, in order: its own (by a hash of its id,
    among the *buckets* imports go to), then every other that may hold codes; "" when
    the SKU has one."""
    if spread == 1:
        return ""
    home = zlib.crc32(order_id.encode()) % buckets
    return ",".join(str((home + j) % spread) for j in range(spread))


class Orders:
    """Purchases, reservations and order reads of distributors."""

    def __init__(self, store: Store, config: Config, vault: Vault, catalog: Catalog, sagas: Sagas,
                 subs: Subs) -> None:
        self._store = store
        self._config = config
        self._vault = vault
        self._catalog = catalog
        self._sagas = sagas
        self._subs = subs

    async def purchase(self, distributor: str, sku: str, qty: int, external_ref: str, *,
                       mode: Literal["deliver", "reserve"] = "deliver", reserve_ttl_s: int | None = None,
                       max_unit_price: int | None = None, allow_partial: bool = False) -> Order:
        """Buy *qty* codes of *sku*: delivered now (``mode="deliver"``) or held until
        :meth:`confirm` / :meth:`cancel` / the lease ends (``mode="reserve"``).

        Idempotent by ``(distributor, external_ref)``: a repeat with the same
        arguments returns the same order and codes (``replayed=True``); with other
        arguments it raises IdempotencyConflictError.
        """
        cfg = self._config
        if not isinstance(qty, int) or isinstance(qty, bool) or not 1 <= qty <= cfg.max_order_qty:
            raise ValidationError(f"qty must be an integer from 1 to {cfg.max_order_qty}")
        check_ref(external_ref)
        if mode not in ("deliver", "reserve"):
            raise ValidationError('mode must be "deliver" or "reserve"')
        ttl = 0
        if mode == "reserve":
            ttl = cfg.reserve_ttl_s if reserve_ttl_s is None else reserve_ttl_s
            if not isinstance(ttl, int) or not 1 <= ttl <= cfg.max_reserve_ttl_s:
                raise ValidationError(f"reserve_ttl_s must be an integer from 1 to {cfg.max_reserve_ttl_s}")
        elif reserve_ttl_s is not None:
            raise ValidationError("reserve_ttl_s applies to mode reserve only")
        if max_unit_price is not None and (not isinstance(max_unit_price, int) or max_unit_price < 0):
            raise ValidationError("max_unit_price must be a non-negative integer")
        digest = _digest(sku, qty, mode, ttl, max_unit_price, bool(allow_partial))

        margins: tuple[int, ...] = ()
        if SUB in distributor:  # a sub-distributor: its price is its parent's marked up
            price, currency, chain = await self._subs.price(distributor, sku)
            margins = tuple(chain)
        else:
            price, currency = await self._catalog.unit_price(distributor, sku)
        if max_unit_price is not None and price > max_unit_price:
            earlier = await self._replay(distributor, external_ref, digest)
            if earlier is not None:
                return earlier
            raise PriceChangedError(f"unit price {price} is above max_unit_price {max_unit_price}",
                                    unit_price=price)
        buckets, spread = await self._catalog.buckets(sku)
        oid = new_id()
        p = BeginItem(oid, external_ref, digest, sku, qty, price, currency, mode, ttl, int(bool(allow_partial)),
                      plan_of(oid, buckets, spread), margins)
        where = self._store.orders.together(distributor, sku, p.plan)
        if where is not None:  # one atomic step on the node: no saga task needed
            node, buckets = where
            for bucket in buckets:
                try:
                    order = await self._at_once(distributor, p, node, bucket)
                except OutOfStockError:
                    if spread == 1:
                        raise
                    continue  # that bucket is empty, nothing was recorded: the next one on the node
                if order is None:  # a slot moved: the saga follows redirects
                    break
                return order
        return await self._sagas.run(self._saga(distributor, p))  # it looks in every bucket

    async def _at_once(self, distributor: str, p: BeginItem, node: str, bucket: int) -> Order | None:
        """A purchase where *node* holds the account and *bucket* of the SKU: one script
        does it all (or refuses it), delivered or reserved; None if the node no longer
        serves one of them (a slot moved), which leaves the order untouched. Dated by this
        clock, like its id; a lease ends by it too."""
        now = time.time_ns() // 1_000_000
        total = p.qty * p.unit_price
        # OrderRec's fields in their order: (id, ref, digest, sku, qty, unit_price, currency),
        # (mode, ttl, partial, status, hold, total, delivered, deadline), (created, updated,
        # dat, refunded, v, plan, bk). Given by keyword, as many cost five times as much.
        if p.mode == "deliver":
            rec = OrderRec(p.order_id, p.ref, p.digest, p.sku, p.qty, p.unit_price, p.currency,
                           "deliver", 0, bool(p.partial), "delivered", 0, total, p.qty, 0,
                           now, now, now, 0, 1, p.plan, bucket)
        else:
            rec = OrderRec(p.order_id, p.ref, p.digest, p.sku, p.qty, p.unit_price, p.currency,
                           "reserve", p.ttl, bool(p.partial), "reserved", total, total, p.qty, now + p.ttl * 1000,
                           now, now, 0, 0, 0, p.plan, bucket)
        if p.margins:
            rec.mg, rec.bp = list(p.margins), p.unit_price - sum(p.margins)
        got = await self._sagas.deliver.submit(node, DeliverItem(p.order_id, p.ref, p.digest,
                                                                 bucket_shard(p.sku, bucket), distributor, p.qty,
                                                                 p.partial, p.unit_price, encode(rec), rec.deadline,
                                                                 p.margins))
        if got is MOVED:
            return None
        if isinstance(got, Existing):
            order = self._present(got.rec, got.codes)
            order.replayed = True
            return order
        if len(got) < p.qty:  # allow_partial
            rec.delivered, rec.total = len(got), len(got) * p.unit_price
            if rec.status == "reserved":
                rec.hold = rec.total
        return self._present(rec, got)

    async def _saga(self, distributor: str, p: BeginItem) -> Order:
        """A purchase as a saga: begin (hold the money), take, commit (start the lease,
        or charge and deliver)."""
        begun = await self._sagas.begin.submit(distributor, p)
        if isinstance(begun, Existing):
            return await self._replayed(distributor, begun.rec)
        return await self.drive(distributor, p.order_id, p.sku, p.qty, bool(p.partial), p.mode, p.plan)

    async def _replayed(self, distributor: str, rec: OrderRec) -> Order:
        """The earlier order of the same external_ref, finished first if it is on its way
        (or crashed)."""
        if rec.status == "pending":
            order = await self.drive(distributor, rec.id, rec.sku, rec.qty, rec.partial, rec.mode, rec.plan)
        else:
            order = await self.get_order(distributor, rec.id)
        order.replayed = True
        return order

    async def drive(self, distributor: str, order_id: str, sku: str, qty: int, partial: bool, mode: str,
                    plan: str = "") -> Order:
        """Steps 2 and 3 of an order whose begin is done: take the codes (from the buckets
        of its plan in turn, until one is not out of stock), commit."""
        item = TakeItem(order_id, qty, int(partial), int(mode == "deliver"))
        for bucket in map(int, plan.split(",")) if plan else (0,):
            # each bucket records its answer to the order: a retry gets the same ones
            taken = await self._sagas.take.submit(bucket_shard(sku, bucket), item)
            if taken.outcome != "out_of_stock":
                break
        blob = encode(taken.codes) if taken.ok else b""
        rec = await self._sagas.commit.submit(distributor, CommitItem(order_id, taken.outcome, len(taken.codes), blob,
                                                                      bucket))
        return self._present(rec, taken.codes)

    def _present(self, rec: OrderRec, ciphertexts: Iterable[bytes]) -> Order:
        # Codes are shown once paid for: not while reserved (a buyer could use one and
        # cancel), never after a cancel or expiry (they are back on sale).
        aad = rec.sku.encode()
        codes = ([Code(*imports.decode_secret(self._vault.decrypt(c, aad))) for c in ciphertexts]
                 if rec.status in PAID else [])
        created = ms_to_dt(rec.created)
        return Order(order_id=rec.id, external_ref=rec.ref, sku=rec.sku, qty=rec.qty, unit_price=rec.unit_price,
                     total=rec.total, currency=rec.currency, status=rec.status,  # type: ignore[arg-type]
                     codes=codes, created_at=created,
                     updated_at=created if rec.updated == rec.created else ms_to_dt(rec.updated), mode=rec.mode,
                     reserve_expires_at=ms_to_dt(rec.deadline) if rec.status == "reserved" else None,
                     refunded=rec.refunded)

    async def _replay(self, distributor: str, ref: str, digest: str) -> Order | None:
        oid = await self._store.orders.order_id_by_ref(distributor, ref)
        if oid is None:
            return None
        rec, codes = await self._store.orders.order(distributor, oid)
        if rec is None:
            return None
        if rec.digest != digest:
            raise IdempotencyConflictError(f"external_ref {ref!r} was used for another request (order {oid})")
        order = self._present(rec, codes)
        order.replayed = True
        return order

    # ---- reservations ----------------------------------------------------------------
    async def confirm(self, distributor: str, order_id: str) -> Order:
        """Confirm a reservation: its codes are sold and the money is taken."""
        return await self._end(distributor, order_id, "confirm")

    async def cancel(self, distributor: str, order_id: str) -> Order:
        """Cancel a reservation: its codes go back to stock and the hold is released."""
        return await self._end(distributor, order_id, "cancel")

    def _end(self, distributor: str, order_id: str, action: str) -> Awaitable[Order]:
        """Ending a reservation. On a cluster it is a saga (settle, then the SKU's step): a
        task of its own, so that a caller going away does not leave the SKU's step to the
        sweep. On one node settle does both sides in one script, which a caller going away
        cannot cut short (a spread SKU's step after it is left to the sweep then): no task,
        which would cost a fifth of the reservation's work."""
        steps = self._end_reservation(distributor, order_id, action)
        return self._sagas.run(steps) if self._store.cluster else steps

    async def _end_reservation(self, distributor: str, order_id: str, action: str) -> Order:
        settled = await self._settle(distributor, order_id, action)
        if settled.result in ("ok", "expired") and self._saga_ends(settled.rec):
            await self.finish_sku_side(distributor, settled.rec)
        if settled.result == "expired":
            raise ReservationExpiredError(f"order {order_id} expired before it was confirmed")
        if settled.result == "invalid_state":
            raise refusal("settle", "invalid_state", order=order_id, state=settled.rec.status, action=action)
        return self._present(settled.rec, settled.codes)

    def _settle(self, distributor: str, order_id: str, action: str) -> Awaitable[Settled]:
        """The account's side of ending a reservation (on one node both sides): one call
        per account and round on a cluster, one for every account of the round on one node."""
        return self._sagas.settle.submit(distributor if self._store.cluster else NODE,
                                         EndItem(order_id, action, distributor))

    def _saga_ends(self, rec: OrderRec) -> bool:
        """Whether ending *rec* takes a SKU step after ``settle``: on a cluster, and for an
        order of a SKU spread over buckets (whose stock level its buckets report); on one
        node ``settle`` does the SKU side of the others itself."""
        return self._store.cluster or rec.plan != ""

    async def finish_sku_side(self, distributor: str, rec: OrderRec) -> None:
        """The SKU side of a reservation its account has ended: codes sold or returned."""
        action = "sell" if rec.status == "delivered" else "return"
        await self._sagas.sku_settle.submit(bucket_shard(rec.sku, rec.bk), SettleItem(rec.id, action))
        await self._sagas.unpend.submit(distributor, OrderRef(rec.id))

    # ---- what the recovery sweep does ------------------------------------------------------
    async def expire(self, distributor: str, order_id: str) -> bool:
        """End a reservation whose lease is over; True if it expired now."""
        settled = await self._settle(distributor, order_id, "expire")
        if settled.result not in ("ok", "expired"):
            return False
        if self._saga_ends(settled.rec):
            await self.finish_sku_side(distributor, settled.rec)
        return settled.result == "ok"

    async def recover(self, distributor: str, order_id: str) -> bool:
        """Finish an order left pending by a crash: drive it on, or finish its SKU side."""
        rec, _ = await self._store.orders.order(distributor, order_id)
        if rec is None:
            await self._store.orders.clear_pending(distributor, [order_id])
            return False
        if rec.status == "pending":
            try:
                await self.drive(distributor, rec.id, rec.sku, rec.qty, rec.partial, rec.mode, rec.plan)
            except DispatchError:  # a refusal (out of stock...) also ends it
                pass
        elif rec.mode == "reserve" and rec.status in ("delivered", "cancelled", "expired"):
            await self.finish_sku_side(distributor, rec)
        else:
            await self._store.orders.clear_pending(distributor, [order_id])
        return True

    # ---- reads -----------------------------------------------------------------------
    async def get_order(self, distributor: str, order_id: str) -> Order:
        """One of the distributor's orders, with its codes (only its own: others are not found)."""
        rec, codes = await self._store.orders.order(distributor, order_id)
        if rec is None:
            raise NotFoundError(f"no order {order_id}")
        return self._present(rec, codes)

    async def get_order_by_ref(self, distributor: str, external_ref: str) -> Order:
        oid = await self._store.orders.order_id_by_ref(distributor, external_ref)
        if oid is None:
            raise NotFoundError(f"no order with external_ref {external_ref!r}")
        return await self.get_order(distributor, oid)

    async def list_orders(self, distributor: str, *, status: str | None = None, since: datetime | None = None,
                          cursor: str | None = None, limit: int = 50) -> OrderPage:
        """The distributor's orders, oldest first, a page at a time (pass ``next_cursor`` back)."""
        if not isinstance(limit, int) or not 1 <= limit <= 500:
            raise ValidationError("limit must be an integer from 1 to 500")
        if cursor is not None and (len(cursor) != 26 or any(c not in _CROCKFORD for c in cursor)):
            raise ValidationError("cursor is not one this API returned")
        after = cursor
        if since is not None:
            floor = ms_id_floor(int(since.timestamp() * 1000))
            after = max(after or "", floor[:-1] + "/")  # "/" sorts just below "0"
        orders: list[Order] = []
        while len(orders) < limit:
            rows = await self._store.orders.order_records(distributor, after or "", "~", limit)
            if not rows:
                after = None
                break
            for rec, codes in rows:
                after = rec.id
                if status is None or rec.status == status:
                    orders.append(self._present(rec, codes))
                    if len(orders) == limit:
                        break
            if len(rows) < limit and len(orders) < limit:
                after = None
                break
        return OrderPage(orders=orders, next_cursor=after)
