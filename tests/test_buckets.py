"""A SKU spread over buckets: each bucket a shard of its own (on a cluster, on its own
master), imports split between them, an order taking from its bucket or, if that one
is empty, from another. No false sold-out, no code lost or sold twice, counters,
alerts and the audit over the whole SKU; changing the number of buckets loses nothing.

These run on one Redis here, and on the cluster in test_cluster_engine.py.
"""

from __future__ import annotations

import asyncio
import collections

import pytest

from dispatch import errors
from dispatch.engine import Engine
from dispatch.models import Order
from dispatch.store import keys

from .test_engine import stock_up


async def bucket_stock(shop: Engine, sku: str = "g100") -> list[int]:
    """Codes on sale in each bucket of *sku*."""
    return [(await shop.store.catalog.counters(s)).get("available", 0)
            for s in await shop.store.catalog.shards(sku)]


def split(shop: Engine, n: int, buckets: int, of: int = 3, sku: str = "g100") -> list[int]:
    """How one chunk of *n* codes goes to *sku*'s first *of* buckets when it has *buckets*
    (its route: on one Redis, in turn)."""
    route = shop.store.inventory.route(sku, buckets)
    order = [int(b) for b in route.split(",")] if route else list(range(buckets))
    out = [0] * of
    for i in range(n):
        out[order[i % len(order)]] += 1
    return out


async def sku_events(shop: Engine, sku: str = "g100") -> list[tuple[str, int]]:
    return [(e.type, e.data["available"]) for e in (await shop.events(f"sku:{sku}", limit=1000)).events]


async def buy_all(shop: Engine, n: int, tag: str, **kw: object) -> list[object]:
    async def one(i: int) -> object:
        try:
            return await shop.purchase("acme" if i % 2 else "beta", "g100", 1, f"{tag}{i}", **kw)
        except errors.DispatchError as e:
            return e
    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def test_buckets_are_validated_and_changed_by_the_update_path(shop: Engine) -> None:
    assert (await shop.get_sku("g100")).buckets == 1
    for bad in (0, 17, "3"):
        with pytest.raises(errors.ValidationError, match=r"buckets"):
            await shop.update_sku("g100", buckets=bad)
    with pytest.raises(errors.ValidationError, match=r"buckets"):
        await shop.create_sku("wide", "Wide", 100, "CNY", 100, buckets=99)
    assert (await shop.update_sku("g100", buckets=3)).buckets == 3
    assert (await shop.get_sku("g100")).buckets == 3
    assert await shop.store.catalog.shards("g100") == ["g100", "g100~1", "g100~2"]
    assert await shop.audit() == []


async def test_a_spread_sku_sells_every_code_once(shop: Engine) -> None:
    await shop.update_sku("g100", buckets=3)
    await stock_up(shop, 30)
    # the import split between the buckets: an equal share to each master holding some
    split = await bucket_stock(shop)
    on: dict[str, int] = {}
    for b, n in enumerate(split):
        master = shop.store.node_of(keys.sku_tag(keys.bucket_shard("g100", b)))
        on[master] = on.get(master, 0) + n
    assert sum(split) == 30 and max(on.values()) - min(on.values()) <= 1 and min(split) > 0
    assert shop.store.cluster or split == [10, 10, 10]
    stock = await shop.stock("g100")
    assert (stock.accepted, stock.available, stock.stock_status) == (30, 30, "in_stock")
    results = await buy_all(shop, 33, "o")  # 33 buyers of one code each, at once: 30 get one
    orders = [r for r in results if isinstance(r, Order)]
    refused = collections.Counter(type(r).__name__ for r in results if not isinstance(r, Order))
    assert len(orders) == 30 and refused == {"OutOfStockError": 3}  # no false sold-out
    codes = [c.code for o in orders for c in o.codes]
    assert len(set(codes)) == 30
    stock = await shop.stock("g100")
    assert (stock.available, stock.sold, stock.stock_status) == (0, 30, "out_of_stock")
    # the level follows the whole SKU: in stock from the import, out once, at 0 (low in
    # between unless one round of takes went past it), never back
    told = await sku_events(shop)
    assert told[0] == ("stock.restored", split[0]) and told[-1] == ("stock.out", 0)
    assert [t for t, _ in told[1:-1]] in ([], ["stock.low"])
    i = int(orders[0].external_ref[1:])
    again = await shop.purchase("acme" if i % 2 else "beta", "g100", 1, f"o{i}")  # a replay: the same order
    assert (again.order_id, again.codes, again.replayed) == (orders[0].order_id, orders[0].codes, True)
    assert await shop.audit() == []


async def test_reservations_return_to_their_bucket(shop: Engine) -> None:
    await shop.update_sku("g100", buckets=2)
    await stock_up(shop, 4)
    held = [await shop.purchase("acme", "g100", 1, f"r{i}", mode="reserve") for i in range(4)]
    assert await bucket_stock(shop) == [0, 0]
    with pytest.raises(errors.OutOfStockError):
        await shop.purchase("acme", "g100", 1, "none")
    await shop.cancel("acme", held[0].order_id)
    await shop.confirm("acme", held[1].order_id)
    assert sum(await bucket_stock(shop)) == 1
    late = await shop.purchase("beta", "g100", 1, "late")  # whichever bucket it is in: found
    assert late.status == "delivered"
    await shop.cancel("acme", held[2].order_id)
    stock = await shop.stock("g100")
    assert (stock.available, stock.reserved, stock.sold) == (1, 1, 2)
    assert stock.stock_status == "low_stock"  # the level of the whole SKU, whichever bucket the code went back to
    assert await shop.audit() == []


async def test_changing_buckets_loses_and_duplicates_nothing(shop: Engine) -> None:
    await shop.update_sku("g100", buckets=2)
    await stock_up(shop, 10, batch="b1")
    await shop.update_sku("g100", buckets=3)
    await stock_up(shop, 9, prefix="MORE", batch="b2")
    two_then_three = [a + b for a, b in zip(split(shop, 10, 2), split(shop, 9, 3))]
    assert await bucket_stock(shop) == two_then_three
    assert shop.store.cluster or two_then_three == [8, 8, 3]
    await shop.update_sku("g100", buckets=1)  # new codes to the SKU's own shard; the others still sell
    await stock_up(shop, 5, prefix="LAST", batch="b3")
    then_one = [two_then_three[0] + 5, *two_then_three[1:]]
    assert await bucket_stock(shop) == then_one
    assert (await shop.stock("g100")).available == 24
    await stock_up(shop, 9, prefix="MORE", batch="b2")  # a re-sent batch adds nothing, wherever it went
    assert await bucket_stock(shop) == then_one
    results = await buy_all(shop, 26, "x")
    orders = [r for r in results if isinstance(r, Order)]
    assert len(orders) == 24
    assert all(isinstance(r, errors.OutOfStockError) for r in results if not isinstance(r, Order))
    codes = {c.code for o in orders for c in o.codes}
    assert len(codes) == 24 and sum(c.startswith("MORE") for c in codes) == 9
    assert await bucket_stock(shop) == [0, 0, 0]
    assert await shop.audit() == []


async def test_void_park_and_tickets_across_buckets(shop: Engine) -> None:
    await shop.update_sku("g100", buckets=3, after_sales="replace")
    await stock_up(shop, 6, batch="b1")
    await stock_up(shop, 6, prefix="KEEP", batch="b2")
    order = await shop.purchase("acme", "g100", 1, "t1")
    assert order.codes[0].code.startswith("CODE")  # each bucket sells its oldest batch first
    assert await shop.void_batch("b1") == 5  # from every bucket
    assert await bucket_stock(shop) == split(shop, 6, 3)  # b2's, each where it went
    assert shop.store.cluster or split(shop, 6, 3) == [2, 2, 2]
    ticket = await shop.open_ticket("acme", order.order_id, order.codes[0].code, "does not work")
    done = await shop.resolve_ticket(ticket.ticket_id, "approve")
    assert done.outcome == "replaced" and done.replacement.code.startswith("KEEP")
    stock = await shop.stock("g100")
    assert (stock.accepted, stock.available, stock.sold, stock.voided, stock.invalidated) == (12, 5, 1, 5, 1)
    assert await shop.audit() == []


async def test_the_sweep_finishes_a_spread_order_where_it_began(shop: Engine) -> None:
    """An order's buckets are chosen when it begins and kept with it: a saga a crash left
    after its take is finished with those codes, whatever the buckets are now."""
    from dispatch.orders import plan_of
    from dispatch.records import new_id
    from dispatch.store.orders import BeginItem, TakeItem
    await shop.update_sku("g100", buckets=3)
    await stock_up(shop, 3)
    oid = new_id()
    plan = plan_of(oid, 3, 3)
    [held] = await shop.store.orders.step("begin", "acme", [BeginItem(oid, "crash", "d" * 32, "g100", 1, 9025,
                                                                      "CNY", "deliver", 0, 0, plan)])
    assert held is None
    first = int(plan.split(",")[0])
    [taken] = await shop.store.orders.step("take", keys.bucket_shard("g100", first), [TakeItem(oid, 1, 0, 1)])
    assert taken.ok
    await shop.update_sku("g100", buckets=1)
    await shop.sweep(grace_s=0)
    order = await shop.get_order("acme", oid)
    assert order.status == "delivered" and len(order.codes) == 1
    stock = await shop.stock("g100")
    assert (stock.available, stock.sold) == (2, 1)  # nothing taken twice
    assert await shop.audit() == []


async def test_pausing_a_spread_sku_stops_every_bucket(shop: Engine) -> None:
    await shop.update_sku("g100", buckets=3)
    await stock_up(shop, 3)
    await shop.update_sku("g100", status="paused")
    for i in range(3):  # whichever bucket an order starts in
        with pytest.raises(errors.SkuPausedError):
            await shop.purchase("acme", "g100", 1, f"p{i}")
    await shop.update_sku("g100", status="active")
    assert all(isinstance(r, Order) for r in await buy_all(shop, 3, "q"))
    assert (await shop.stock("g100")).sold == 3
    assert await shop.audit() == []


async def test_the_hashes_a_purchase_reads_are_hash_tables_from_the_start(shop: Engine) -> None:
    """A small hash is a flat list that every field read or added scans: an account, its
    codes and external_refs, and a SKU's metadata, counters, delivery records and their
    codes, are pinned hash tables from their creation (keys.PIN), and readers skip the pin."""
    skus = [keys.SkuKeys(s) for s in ("g100", "g100~1")]
    acme = keys.AcctKeys("acme")

    async def encodings() -> list[bytes]:
        return [await shop.store.client.object("encoding", key)
                for key in [*(k for s in skus for k in (s.meta, s.stats, s.dlv, s.dlv_codes, s.batch_stats, s.sales)),
                            acme.acct, acme.codes, acme.refs]]

    await shop.update_sku("g100", buckets=2)
    assert await encodings() == [b"hashtable"] * 15
    for s in skus:  # as a SKU made before the pin
        await shop.store.client.hdel(s.meta, keys.PIN)
        await shop.store.client.hdel(s.stats, keys.PIN)
        await shop.store.client.delete(s.dlv, s.dlv_codes, s.batch_stats, s.sales)
    await shop.store.client.delete(acme.codes, acme.refs)  # and an account
    await shop.update_sku("g100", price=9100)
    await shop.update_distributor("acme", name="Acme")
    assert await encodings() == [b"hashtable"] * 15
    await stock_up(shop, 4)
    order = await shop.purchase("acme", "g100", 1, "pinned")
    held = await shop.purchase("acme", "g100", 1, "~", mode="reserve")  # an external_ref like keys.PIN
    again = await shop.purchase("acme", "g100", 1, "~", mode="reserve")
    assert again.order_id == held.order_id and again.replayed
    await shop.cancel("acme", held.order_id)
    deliveries = {**await shop.store.inventory.deliveries("g100"), **await shop.store.inventory.deliveries("g100~1")}
    assert sorted(deliveries) == sorted([order.order_id, held.order_id])
    assert sum((await shop.store.catalog.hourly_sales("g100")).values()) == 1
    state = await shop.store.catalog.sku("g100")
    assert keys.PIN not in state.meta and keys.PIN not in state.stats
    assert keys.PIN not in await shop.store.catalog.counters("g100~1")
    assert (await shop.stock("g100")).available == 3
    assert (await shop.get_distributor("acme")).name
    assert await shop.audit() == []
