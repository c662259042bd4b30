"""Orders in Redis: the steps of purchases (batches of order items, one script call per
shard and round), order reads, and what the recovery sweep looks for.

Where one node holds every shard, a purchase (delivered or reserved) is one step,
``deliver``: its round is one script call for every SKU and account in it; ending a
reservation is one step too, ``settle`` with both sides. On a cluster a purchase is a
saga of one-shard steps (begin, take, commit; a reservation ends with settle, then
sku_settle).

Each step's replies are decoded here, item by item, into a typed result or the
exception that item's caller gets (see replies.py); the coalescer hands each to its
own caller.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from ..errors import DispatchError
from ..records import OrderRec, decode_codes, decode_order
from . import keys
from .replies import Existing, Settled, Taken, refusal, translated

if TYPE_CHECKING:
    from .store import Call, Store

__all__ = ["OrderStore", "STEPS", "NODE", "MOVED", "DeliverItem", "BeginItem", "TakeItem", "CommitItem", "EndItem",
           "SettleItem", "OrderRef"]

#: The shard of the steps that run on the node holding every shard.
NODE = ""
#: The keys of a SKU and of an account that deliver.lua takes, in its order.
DELIVER_SKU_KEYS = ("meta", "stats", "queue", "dlv", "batch_stats", "sales", "events", "dlv_codes")
DELIVER_ACCT_KEYS = ("acct", "ledger", "refs", "orders", "codes", "index", "events", "leases")
#: The keys of a SKU named "\1" and its pool prefix: settle.lua names a SKU's keys from it.
_SKU_TEMPLATE = " ".join([*keys.SkuKeys("\1").all, keys.SkuKeys("\1").pool_prefix])


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
    plan: str = ""
    #: a sub-distributor's order: its ancestors' margins per code, root first (not a
    #: field of the item: the script reads them after every item, see _margins)
    margins: tuple[int, ...] = ()


class DeliverItem(NamedTuple):
    """deliver.lua: a purchase on one node, delivered (deadline 0) or reserved until
    deadline (ms), and its record once done. ``sku`` is the shard it takes from: the
    SKU, or one of its buckets."""

    order_id: str
    ref: str
    digest: str
    sku: str
    distributor: str
    qty: int
    partial: int
    unit_price: int
    record: bytes
    deadline: int = 0
    #: as BeginItem's
    margins: tuple[int, ...] = ()


class TakeItem(NamedTuple):
    """take.lua: pop a purchase saga's codes (sold at once when ``sell``, else reserved)."""

    order_id: str
    qty: int
    partial: int
    sell: int


class CommitItem(NamedTuple):
    """commit.lua: what the take of a reservation answered, and which bucket took it."""

    order_id: str
    outcome: str
    delivered: int
    codes: bytes
    bucket: int = 0


class OrderRef(NamedTuple):
    """unpend.lua: just the order."""

    order_id: str


class EndItem(NamedTuple):
    """settle.lua: end a reservation of *distributor*'s (confirm, cancel, expire)."""

    order_id: str
    action: str
    distributor: str


class SettleItem(NamedTuple):
    """sku_settle.lua: the SKU side of an ended reservation (sell, return)."""

    order_id: str
    action: str


def _packed(items: Sequence[Any]) -> list[Sequence[Any]]:
    """The fields of begin's items (all but margins), then their margins (_margins)."""
    return [*(item[:-1] for item in items), _margins(items)]


def _margins(items: Sequence[Any]) -> list[int]:
    """The margins of the sub-distributors' orders among deliver's or begin's items, as the
    scripts read them after the items (_margins.lua, read_margins): m, then per such order
    its index (from 1), the count and the margins."""
    tail: list[int] = [0]
    for k, item in enumerate(items, 1):
        if item.margins:
            tail[0] += 1
            tail += [k, len(item.margins), *item.margins]
    return tail


def _account_refusal(step: str, reply: list[Any], dist: str, ref: str, cost: int) -> DispatchError:
    status = reply[0]
    if status == b"insufficient_balance":
        return refusal(step, status, cost=cost, available=int(reply[1]))
    if status == b"conflict":
        return refusal(step, status, ref=ref, order=reply[1].decode())
    if status == b"limit_exceeded":
        return refusal(step, status, dist=dist, limit=reply[1].decode(), left=int(reply[2]))
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


#: Steps whose script answers one flat array (per order: status, count, fields): a nested
#: array per order costs Redis a tenth of the order's work.
_FLAT = frozenset({"deliver", "settle", "begin", "take", "commit"})


def _per_item(flat: list[Any]) -> list[list[Any]]:
    """A flat reply (per order: status, count, fields) as one list per order."""
    out, i = [], 0
    while i < len(flat):
        n = flat[i + 1]
        out.append([flat[i], *flat[i + 2:i + 2 + n]])
        i += 2 + n
    return out


#: deliver's answer to an order whose account or shard its node no longer serves (a slot
#: moved): nothing was done, and the order goes as a saga, which follows redirects.
MOVED = object()


def _ids_of(member: str) -> list[str]:
    """The order ids of an index member: 26-character ULIDs concatenated, or one other id."""
    if len(member) % 26:
        return [member]
    return [member[x:x + 26] for x in range(0, len(member), 26)]


def _deliver(reply: list[Any], item: DeliverItem, node: str) -> Any:
    """The codes (encrypted) | Existing (a replay, with its codes) | MOVED | an error."""
    status = reply[0]
    if status == b"ok":
        return reply[1:]
    if status == b"moved":
        return MOVED
    if status == b"exists":
        return Existing(decode_order(reply[2]), decode_codes(reply[3]) if reply[3] else [])
    if status in (b"unknown_sku", b"paused", b"out_of_stock"):
        return refusal("deliver", status, sku=item.sku.partition(keys.BUCKET)[0])
    return _account_refusal("deliver", reply, item.distributor, item.ref, item.qty * item.unit_price)


def _commit(reply: list[Any], item: CommitItem, dist: str) -> Any:
    status = reply[0]
    if status == b"ok":
        return decode_order(reply[1])
    if status == b"failed":
        return refusal("commit", reply[1])
    if item.outcome != "ok":  # gone: a replay racing the first attempt, which was refused and forgotten
        return refusal("commit", item.outcome)
    return DispatchError(f"order {item.order_id} vanished after its codes were taken")


def _settle(reply: list[Any], item: EndItem, shard: str) -> Any:
    if reply[0] == b"not_found":
        return refusal("settle", reply[0], order=item.order_id)
    return Settled(reply[0].decode(), decode_order(reply[1]), decode_codes(reply[2]) if reply[2] else [])


def _take(reply: list[Any], item: TakeItem, sku: str) -> Taken:
    return Taken(reply[0].decode(), reply[1:])


def _as_str(reply: bytes, item: Sequence[Any], shard: str) -> str:
    return reply.decode()


Decode = Callable[[Any, Sequence[Any], str], Any]

#: Every saga step: (the shard it runs on, how one item's reply is decoded).
#: An item's fields follow the script's header (dispatch/lua/<step>.lua).
STEPS: dict[str, tuple[str, Decode]] = {
    "deliver": ("node", _deliver),         # check, take, debit or hold, record: a purchase at once (one node)
    "begin": ("account", _begin),          # hold the money of a saga's order
    "take": ("sku", _take),                # pop its codes: sold, or reserved (a SKU's, or a bucket's)
    "commit": ("account", _commit),        # charge a delivery, or start a reservation's lease
    "settle": ("account", _settle),        # ending a reservation: the account side; on one node both
                                           # sides, every account of a round in one call (Orders._settle)
    "sku_settle": ("sku", _as_str),        # the SKU side: sell or return its codes
    "unpend": ("account", _as_str),        # a saga done: off the account's pending set
}


class OrderStore:
    def __init__(self, db: Store) -> None:
        self._db = db
        self._sku_keys: dict[str, keys.SkuKeys] = {}
        self._acct_keys: dict[str, list[str]] = {}
        self._node_keys: dict[tuple[str, str], list[str]] = {}

    @property
    def cluster(self) -> bool:
        return self._db.cluster

    def _sku(self, sku: str) -> keys.SkuKeys:
        k = self._sku_keys.get(sku)
        if k is None:
            if len(self._sku_keys) > 100_000:
                self._sku_keys.clear()
            k = self._sku_keys[sku] = keys.SkuKeys(sku)
        return k

    def _acct(self, dist: str) -> list[str]:
        k = self._acct_keys.get(dist)
        if k is None:
            if len(self._acct_keys) > 100_000:
                self._acct_keys.clear()
            k = self._acct_keys[dist] = keys.AcctKeys(dist).all
        return k

    def _call(self, step: str, shard: str, items: Sequence[Any]) -> Call:
        kind = STEPS[step][0]
        if kind == "account":
            if step == "begin":
                return self._acct(shard), [len(items), int(self._db.require_verification)], _packed(items)
            return self._acct(shard), [len(items)], items
        if kind == "sku":
            k = self._sku(shard)
            return k.all, [k.pool_prefix, len(items)], items
        skus: dict[str, int] = {}
        dists: dict[str, int] = {}
        terms: dict[tuple[int, int, int, int], int] = {}
        n = len(items)
        rows: list[Sequence[Any]] = []
        for item in items:  # where: an order's terms, shard and distributor in one number (deliver.lua)
            s = skus.setdefault(item.sku, len(skus))
            a = dists.setdefault(item.distributor, len(dists))
            t = terms.setdefault((item.qty, item.partial, item.unit_price, item.deadline), len(terms))
            rows.append((item.order_id, item.ref, item.record, (t * n + s) * n + a))
        nS, nA = len(skus), len(dists)
        keys_: list[str] = []
        for sku in skus:
            keys_ += self._deliver_keys(sku, "sku")
        for dist in dists:
            keys_ += self._deliver_keys(dist, "dist")
        head = [nS, nA, *skus, *dists, len(items), int(self._db.require_verification)]
        tail = [len(terms), *(x for t in terms for x in t)]
        rows.append(_margins(items))
        if self._db.cluster:  # the keys of several slots of one master: in the args (deliver.lua)
            return keys_[:1], [*head, len(keys_), *keys_, *tail], rows
        return keys_, [*head, 0, *tail], rows

    def _deliver_keys(self, id_: str, kind: str) -> list[str]:
        """The keys of a SKU or an account that deliver.lua uses, in its order."""
        k = self._node_keys.get((kind, id_))
        if k is None:
            if len(self._node_keys) > 100_000:
                self._node_keys.clear()
            if kind == "sku":
                s = self._sku(id_)
                k = [getattr(s, name) for name in DELIVER_SKU_KEYS]
            else:
                a = keys.AcctKeys(id_)
                k = [getattr(a, name) for name in DELIVER_ACCT_KEYS]
            self._node_keys[(kind, id_)] = k
        return k

    async def step(self, step: str, shard: str, items: Sequence[Sequence[Any]]) -> list[Any]:
        """Run saga *step* for *items* of one shard (a distributor's account, or a SKU):
        per item, its typed result or the exception its caller gets."""
        return (await self.steps(step, {shard: items}))[shard]

    async def steps(self, step: str, batches: dict[str, Sequence[Sequence[Any]]]) -> dict[str, list[Any]]:
        """:meth:`step` for several shards in one pipelined round: {shard: results}."""
        if step == "settle":  # settle.lua ends one account's orders after the other's
            return await self._settle_grouped(batches)
        decode = STEPS[step][1]
        replies = await self._db.run_many(step, [self._call(step, s, items) for s, items in batches.items()])
        if STEPS[step][0] == "sku":
            await self._db.tell_levels(batches)
        if step in _FLAT:
            replies = [_per_item(flat) for flat in replies]
        if step == "deliver":  # after its orders, a call may name buckets down to their threshold
            low: list[str] = []
            for got, items in zip(replies, batches.values()):
                if len(got) > len(items):
                    low += (shard.decode() for shard in got.pop()[1:])
            if low:
                await self._db.tell_levels(low)
        return {shard: [decode(r, item, shard) for r, item in zip(got, items)]
                for (shard, items), got in zip(batches.items(), replies)}

    async def _settle_grouped(self, batches: dict[str, Sequence[EndItem]]) -> dict[str, list[Any]]:
        """settle's :meth:`steps`. settle.lua ends one account's orders after another's, so a
        call's items go grouped by account (in the order each account first comes, each
        account's in their order), and their results come back in the items' order."""
        calls, places = [], []
        template = "" if self._db.cluster else _SKU_TEMPLATE  # on one node, with the SKU side
        for items in batches.values():
            of: dict[str, list[int]] = {}
            for k, item in enumerate(items):
                of.setdefault(item.distributor, []).append(k)
            order = [k for ks in of.values() for k in ks]
            calls.append(([key for d in of for key in self._acct(d)],
                          [len(items), template, len(of), *map(len, of.values())],
                          [(items[k].order_id, items[k].action) for k in order]))
            places.append(order)
        replies = await self._db.run_many("settle", calls)
        out = {}
        for (shard, items), order, flat in zip(batches.items(), places, replies):
            results: list[Any] = [None] * len(items)
            for k, reply in zip(order, _per_item(flat)):
                results[k] = _settle(reply, items[k], shard)
            out[shard] = results
        return out

    def together(self, dist: str, sku: str, plan: str) -> tuple[str, list[int]] | None:
        """Where one node holds the distributor's account and shards of the SKU: (that
        node, the buckets of the plan it holds, in the plan's order). On one Redis the
        plan's first bucket only (the saga looks in the others, each once); on a cluster,
        on the master of the account if it holds any, else None."""
        buckets = [int(b) for b in plan.split(",")] if plan else [0]
        if not self._db.cluster:
            return NODE, buckets[:1]
        home = self._db.node_of(self._acct(dist)[0])
        here = [b for b in buckets if self._db.node_of(self._sku(keys.bucket_shard(sku, b)).meta) == home]
        return (home, here) if here else None

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
        ("" and "~" are below and above every id), *count* of them unless there are fewer.
        The index may name an order that is gone (a saga's order that failed, when its id
        shares its member with others): it is skipped, and the next ones read instead."""
        k = keys.AcctKeys(dist)
        out: list[tuple[OrderRec, list[bytes]]] = []
        with translated():
            while len(out) < count:
                want = count - len(out)
                ids = await self._index_range(k.index, after, before, want)
                if not ids:
                    break
                async with self._db.client.pipeline(transaction=False) as p:
                    p.hmget(k.orders, ids)
                    p.hmget(k.codes, ids)
                    recs, codes = await p.execute()
                out += [(decode_order(r), decode_codes(c) if c else []) for r, c in zip(recs, codes) if r is not None]
                if len(ids) < want:
                    break
                after = ids[-1]
        return out

    async def _index_range(self, index: str, after: str, before: str, count: int) -> list[str]:
        """The *count* least ids in (after, before) of an account's index, whose members are
        the ids of one call and 32-millisecond window (their first 9 characters), the least
        first (index_entries, lua/_events.lua). A member holding an id above *after* is of
        its window or a later one; members come by their least id, so once *count* ids are
        found below the least id of the next member, no later member has a lesser one."""
        start = b"[" + after[:9].encode() if after else b"-"
        found: list[str] = []
        page = min(count, 64)  # members: one may hold a call's every order
        while True:
            members = await self._db.client.zrangebylex(index, start, "(" + before, 0, page)
            for m in members:
                found += [i for i in _ids_of(m.decode()) if after < i < before]
            if len(members) < page:
                break
            start = b"(" + members[-1]
            if len(found) >= count:
                found.sort()
                if found[count - 1] <= members[-1][:26].decode():
                    break
        found.sort()
        return found[:count]

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

    async def clear_pending(self, dist: str, ids: Sequence[str]) -> None:
        """Orders (or tickets) whose saga is done leave the account's pending set."""
        with translated():
            await self._db.client.zrem(keys.AcctKeys(dist).pending, *ids)
