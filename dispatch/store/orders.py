"""Orders in Redis: the saga steps (batches of order items, one script call per shard),
order reads, and what the recovery sweep looks for.

Each step's replies are decoded here, item by item, into a typed result or the
exception that item's caller gets (see replies.py); the coalescer hands each to its
own caller.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from msgspec.msgpack import decode as msgpack_decode

from ..errors import DispatchError
from ..records import OrderRec, decode_codes, decode_order
from . import keys
from .replies import Existing, Settled, Taken, refusal, translated

if TYPE_CHECKING:
    from .store import Call, Store

__all__ = ["OrderStore", "STEPS", "BeginItem", "TakeItem", "BuyItem", "CommitItem", "SettleItem", "OrderRef"]


# ---- the items of the saga steps: their fields are the script's, in order -------------

class BeginItem(NamedTuple):
    """begin.lua: hold the money of a reservation."""

    order_id: str
    ref: str
    digest: str
    sku: str
    qty: int
    unit_price: int
    currency: str
    mode: str
    ttl: int
    partial: int


class TakeItem(NamedTuple):
    """take.lua: pop an order's codes (*account*: the buyer of a deliver purchase)."""

    order_id: str
    qty: int
    partial: int
    mode: str
    account: str


class BuyItem(NamedTuple):
    """buy.lua: what the take answered, and the record of the order once bought."""

    order_id: str
    ref: str
    digest: str
    sku: str
    unit_price: int
    outcome: str
    delivered: int
    codes: bytes
    record: bytes


class CommitItem(NamedTuple):
    """commit.lua: what the take of a reservation answered."""

    order_id: str
    outcome: str
    delivered: int
    codes: bytes


class SettleItem(NamedTuple):
    """settle.lua (confirm, cancel, expire) and sku_settle.lua (sell, return, undo)."""

    order_id: str
    action: str


class OrderRef(NamedTuple):
    """keep.lua and fence.lua: just the order."""

    order_id: str


def _account_refusal(step: str, reply: list[Any], dist: str, ref: str, cost: int) -> DispatchError:
    status = reply[0]
    if status == b"insufficient_balance":
        return refusal(step, status, cost=cost, available=int(reply[1]))
    if status == b"conflict":
        return refusal(step, status, ref=ref, order=reply[1].decode())
    return refusal(step, status, dist=dist)


def _begin(reply: list[Any], item: BeginItem, dist: str) -> Any:
    """None (held now) | OrderRec (this very order, begun before) | Existing (a replay) | an error."""
    status = reply[0]
    if status == b"ok":
        return None
    if status == b"exists":
        rec = decode_order(reply[2])
        return rec if reply[1].decode() == item.order_id else Existing(rec)
    return _account_refusal("begin", reply, dist, item.ref, item.qty * item.unit_price)


def _buy(reply: list[Any], item: BuyItem, dist: str) -> Any:
    """OrderRec (bought by a call sent before) | None (bought now) | Existing (a replay) | an error."""
    status = reply[0]
    if status == b"ok":
        return decode_order(reply[1]) if len(reply) > 1 else None
    if status == b"exists":
        return Existing(decode_order(reply[2]))
    if status == b"failed":
        return refusal("buy", reply[1], sku=item.sku)
    return _account_refusal("buy", reply, dist, item.ref, item.delivered * item.unit_price)


def _commit(reply: list[Any], item: CommitItem, dist: str) -> Any:
    status = reply[0]
    if status == b"ok":
        return decode_order(reply[1])
    if status == b"failed":
        return refusal("commit", reply[1])
    if item.outcome != "ok":  # gone: a replay racing the first attempt, which was refused and forgotten
        return refusal("commit", item.outcome)
    return DispatchError(f"order {item.order_id} vanished after its codes were taken")


def _settle(reply: list[Any], item: SettleItem, dist: str) -> Any:
    if reply[0] == b"not_found":
        return refusal("settle", reply[0], order=item.order_id)
    return Settled(reply[0].decode(), decode_order(reply[1]))


def _take(reply: list[Any], item: TakeItem, sku: str) -> Taken:
    return Taken(reply[0].decode(), reply[1:])


def _fence(reply: bytes, item: OrderRef, dist: str) -> bool:
    return reply == b"bought"


def _as_str(reply: bytes, item: Sequence[Any], shard: str) -> str:
    return reply.decode()


Decode = Callable[[Any, Sequence[Any], str], Any]

#: Every saga step: (the shard it runs on, how one item's reply is decoded).
#: An item's fields follow the script's header (dispatch/lua/<step>.lua).
STEPS: dict[str, tuple[str, Decode]] = {
    "begin": ("account", _begin),          # hold the money of a reservation
    "take": ("sku", _take),                # pop an order's codes
    "buy": ("account", _buy),              # check, debit, record a delivered order
    "keep": ("sku", _as_str),              # a bought order is no longer provisional
    "commit": ("account", _commit),        # start a reservation's lease
    "settle": ("account", _settle),        # the account side of ending a reservation
    "sku_settle": ("sku", _as_str),        # the SKU side: sell, return or undo its codes
    "fence": ("account", _fence),          # the sweep: was a provisional purchase bought?
}


class OrderStore:
    def __init__(self, db: Store) -> None:
        self._db = db

    def _call(self, step: str, shard: str, items: Sequence[Sequence[Any]]) -> Call:
        if STEPS[step][0] == "account":
            return keys.AcctKeys(shard).all, [len(items)], items
        k = keys.SkuKeys(shard)
        return k.all, [k.pool_prefix, len(items)], items

    async def step(self, step: str, shard: str, items: Sequence[Sequence[Any]]) -> list[Any]:
        """Run saga *step* for *items* of one shard (a distributor's account, or a SKU):
        per item, its typed result or the exception its caller gets."""
        return (await self.steps(step, {shard: items}))[shard]

    async def steps(self, step: str, batches: dict[str, Sequence[Sequence[Any]]]) -> dict[str, list[Any]]:
        """:meth:`step` for several shards in one pipelined round: {shard: results}."""
        decode = STEPS[step][1]
        replies = await self._db.run_many(step, [self._call(step, s, items) for s, items in batches.items()])
        return {shard: [decode(r, item, shard) for r, item in zip(got, items)]
                for (shard, items), got in zip(batches.items(), replies)}

    # ---- reads ---------------------------------------------------------------------
    async def order(self, dist: str, order_id: str) -> tuple[OrderRec | None, list[bytes]]:
        """(record, encrypted codes) of one order; (None, []) when unknown."""
        k = keys.AcctKeys(dist)
        with translated():
            async with self._db.client.pipeline(transaction=False) as p:
                p.hget(k.orders, order_id)
                p.hget(k.codes, order_id)
                rec, codes = await p.execute()
        return (None, []) if rec is None else (decode_order(rec), decode_codes(codes) if codes else [])

    async def order_id_by_ref(self, dist: str, ref: str) -> str | None:
        with translated():
            oid = await self._db.client.hget(keys.AcctKeys(dist).refs, ref)
        return oid.decode() if oid else None

    async def order_records(self, dist: str, after: str, before: str,
                            count: int) -> list[tuple[OrderRec, list[bytes]]]:
        """(record, codes) of *dist*'s orders with ids in (after, before), oldest first
        ("" and "~" are below and above every id)."""
        k = keys.AcctKeys(dist)
        with translated():
            ids = await self._db.client.zrangebylex(k.index, "(" + after, "(" + before, 0, count)
            if not ids:
                return []
            async with self._db.client.pipeline(transaction=False) as p:
                p.hmget(k.orders, ids)
                p.hmget(k.codes, ids)
                recs, codes = await p.execute()
        return [(decode_order(r), decode_codes(c) if c else []) for r, c in zip(recs, codes) if r is not None]

    # ---- what the sweep looks for ------------------------------------------------------
    async def due(self, dists: Sequence[str], now_ms: int,
                  pending_before_ms: int) -> list[tuple[list[str], list[str]]]:
        """Per distributor: (leases due by now_ms, orders and tickets pending since before
        pending_before_ms), at most 1000 of each."""
        with translated():
            async with self._db.client.pipeline(transaction=False) as p:
                for d in dists:
                    k = keys.AcctKeys(d)
                    p.zrangebyscore(k.leases, "-inf", now_ms, 0, 1000)
                    p.zrangebyscore(k.pending, "-inf", pending_before_ms, 0, 1000)
                flat = await p.execute()
        ids = [[i.decode() for i in found] for found in flat]
        return list(zip(ids[0::2], ids[1::2]))

    async def provisional(self, skus: Sequence[str], before_ms: int) -> dict[str, list[tuple[str, str]]]:
        """Per SKU: (order id, distributor) of purchases taken before *before_ms* and not
        yet confirmed bought (at most 1000 a SKU)."""
        client = self._db.client
        with translated():
            async with client.pipeline(transaction=False) as p:
                for sku in skus:
                    p.zrangebyscore(keys.SkuKeys(sku).prov, "-inf", before_ms, 0, 1000)
                ids = await p.execute()
            out = {}
            for sku, found in zip(skus, ids):
                if found:
                    recs = await client.hmget(keys.SkuKeys(sku).dlv, found)
                    out[sku] = [(i.decode(), msgpack_decode(r)["a"]) for i, r in zip(found, recs) if r is not None]
        return out

    async def clear_pending(self, dist: str, ids: Sequence[str]) -> None:
        """Orders (or tickets) whose saga is done leave the account's pending set."""
        with translated():
            await self._db.client.zrem(keys.AcctKeys(dist).pending, *ids)
