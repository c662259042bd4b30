"""Purchases on a real Redis Cluster: the deliver saga under load, and after a crash.

On a cluster a purchase in deliver mode is the saga begin (account) -> take (SKU)
-> commit (account); these tests check it keeps every invariant with hundreds of
buyers whose SKUs and accounts live on different masters, and that the sweep (or a
retry) finishes one a crash left half done, or undoes it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from dispatch import SyncEngine, errors
from dispatch.cli import main
from dispatch.engine import Engine
from dispatch.models import Order
from dispatch.records import encode, new_id
from dispatch.store import keys
from dispatch.store.orders import MOVED, BeginItem, DeliverItem, TakeItem

from .conftest import codes_text, make_config
from .test_concurrency import DISTS, SKUS, many_buyers, setup_shop
from .test_engine import stock_up

pytestmark = pytest.mark.cluster


def masters_of(engine: Engine, tags: list[str]) -> set[str]:
    return {engine.store.client.get_node_from_key(t).name for t in tags}


@pytest.mark.timeout(300)
async def test_buyers_on_every_master_keep_every_invariant(flushed_cluster_url: str, tmp_path) -> None:
    engine = Engine(make_config(tmp_path, redis_url=flushed_cluster_url, sweep_interval_s=0.2), sweep=True)
    async with engine:
        # the SKUs' shards, and the accounts', are spread over all three masters
        assert len(masters_of(engine, [keys.sku_tag(s) for s in SKUS])) == 3
        assert len(masters_of(engine, [keys.acct_tag(d) for d in DISTS])) == 3
        await setup_shop(engine)
        await many_buyers(engine, 20261201, buyers=200, per_buyer=25, replays=10)  # 5,000 orders
        stats = engine.coalescer_stats()
        # one step where the buyer's master holds the SKU's shard, a saga where it does not
        assert stats["deliver"][1] > 0
        assert stats["begin"][1] >= stats["commit"][1] > 0


# ---- a deliver saga a crash left half done ---------------------------------------------------

@pytest_asyncio.fixture
async def shop(flushed_cluster_url: str, tmp_path: os.PathLike[str]) -> AsyncIterator[Engine]:
    """g100 (9500, acme's tier 5% off) with 3 codes; acme funded; no background sweep.
    g100's shard and acme's account live on different masters."""
    engine = Engine(make_config(tmp_path, redis_url=flushed_cluster_url), sweep=False)
    async with engine:
        assert len(masters_of(engine, [keys.sku_tag("g100"), keys.acct_tag("acme")])) == 2
        await engine.create_sku("g100", "Game card 100", 10000, "CNY", 9500)
        await engine.create_supplier("sup", "Supplier")
        await engine.create_tier("gold", discount_bps=500)
        await engine.create_distributor("acme", "Acme", tier="gold")
        await engine.topup("acme", 100_000, "seed")
        await stock_up(engine, 3)
        yield engine


async def begin(shop: Engine, ref: str, qty: int) -> str:
    """Step 1 of a purchase of g100 by acme, as Orders.purchase would send it: its order id."""
    digest = hashlib.sha256(encode(("g100", qty, "deliver", 0, None, False))).hexdigest()[:32]
    oid = new_id()
    [held] = await shop.store.orders.step("begin", "acme", [BeginItem(oid, ref, digest, "g100", qty, 9025, "CNY",
                                                                      "deliver", 0, 0)])
    assert held is None
    bal = await shop.balance("acme")
    assert (bal.balance, bal.held) == (100_000, qty * 9025)
    return oid


async def test_the_sweep_finishes_a_deliver_saga_after_its_begin(shop: Engine) -> None:
    oid = await begin(shop, "crash-1", 2)
    assert (await shop.get_order("acme", oid)).status == "pending"
    await shop.sweep(grace_s=0)
    order = await shop.get_order("acme", oid)
    assert (order.status, len(order.codes), order.total) == ("delivered", 2, 18050)
    bal = await shop.balance("acme")
    assert (bal.balance, bal.held) == (100_000 - 18050, 0)
    assert ((await shop.stock("g100")).available, (await shop.stock("g100")).sold) == (1, 2)
    again = await shop.purchase("acme", "g100", 2, "crash-1")  # the client's retry: the same order
    assert (again.order_id, again.codes, again.replayed) == (oid, order.codes, True)
    await shop.sweep(grace_s=0)  # nothing left to do, nothing done twice
    assert [e.kind for e in await shop.ledger("acme")] == ["topup", "hold", "purchase"]
    assert await shop.audit() == []


async def test_a_retry_finishes_a_deliver_saga_after_its_take(shop: Engine) -> None:
    oid = await begin(shop, "crash-2", 1)
    [taken] = await shop.store.orders.step("take", "g100", [TakeItem(oid, 1, 0, 1)])
    assert taken.ok and (await shop.stock("g100")).sold == 1  # codes sold, the account not yet charged
    order = await shop.purchase("acme", "g100", 1, "crash-2")
    assert (order.order_id, order.status, order.replayed) == (oid, "delivered", True)
    assert len(order.codes) == 1
    stock = await shop.stock("g100")
    assert (stock.available, stock.sold) == (2, 1)  # the retry took nothing more
    bal = await shop.balance("acme")
    assert (bal.balance, bal.held) == (100_000 - 9025, 0)
    assert await shop.audit() == []


async def test_the_sweep_undoes_a_deliver_saga_its_sku_refuses(shop: Engine) -> None:
    oid = await begin(shop, "crash-3", 5)  # 5 codes: more than g100 holds
    await shop.sweep(grace_s=0)
    with pytest.raises(errors.NotFoundError):
        await shop.get_order("acme", oid)
    bal = await shop.balance("acme")
    assert (bal.balance, bal.held) == (100_000, 0)
    assert (await shop.stock("g100")).available == 3  # a refused order took no stock
    order = await shop.purchase("acme", "g100", 3, "crash-3")  # the ref is free again
    assert (order.status, len(order.codes), order.replayed) == ("delivered", 3, False)
    assert await shop.audit() == []


async def test_refusals_take_no_stock_and_events_tell_the_delivery(shop: Engine) -> None:
    with pytest.raises(errors.InsufficientBalanceError):
        await shop.purchase("acme", "g100", 12, "big", allow_partial=True)
    with pytest.raises(errors.OutOfStockError):
        await shop.purchase("acme", "g100", 4, "many")
    order = await shop.purchase("acme", "g100", 1, "one")
    with pytest.raises(errors.IdempotencyConflictError):
        await shop.purchase("acme", "g100", 2, "one")
    assert (await shop.stock("g100")).available == 2
    events = [e for e in (await shop.events("dist:acme")).events if e.type == "order.delivered"]
    assert [(e.entity, e.version) for e in events] == [(f"order:{order.order_id}", 1)]
    assert await shop.audit() == []


# ---- where one master holds the account and the SKU ------------------------------------------

def dist_names(engine: Engine, sku: str) -> tuple[str, str]:
    """A distributor id whose account lives on the master of *sku*'s shard, and one whose does not."""
    home = engine.store.node_of(keys.sku_tag(sku))
    names = [f"d{i}" for i in range(1000)]
    return (next(d for d in names if engine.store.node_of(keys.acct_tag(d)) == home),
            next(d for d in names if engine.store.node_of(keys.acct_tag(d)) != home))


async def test_a_buyer_on_the_skus_master_buys_in_one_step(shop: Engine) -> None:
    near, far = dist_names(shop, "g100")
    for d in (near, far):
        await shop.create_distributor(d, d)
        await shop.topup(d, 100_000, "seed")
    await shop.import_codes(codes_text("MORE", 4), sku="g100", supplier="sup", unit_cost=5000)
    before = shop.coalescer_stats()
    got = [await shop.purchase(near, "g100", 1, "near-1"),
           await shop.confirm(near, (await shop.purchase(near, "g100", 2, "near-2", mode="reserve")).order_id)]
    after = shop.coalescer_stats()
    assert after["deliver"][1] - before["deliver"][1] == 2  # the purchase and the reservation: one step each
    assert after["begin"] == before["begin"] and after["take"] == before["take"]
    got.append(await shop.purchase(far, "g100", 1, "far-1"))  # its account is elsewhere: a saga
    assert shop.coalescer_stats()["begin"][1] == before["begin"][1] + 1
    assert [(o.status, len(o.codes)) for o in got] == [("delivered", 1), ("delivered", 2), ("delivered", 1)]
    assert len({c.code for o in got for c in o.codes}) == 4
    assert (await shop.purchase(near, "g100", 1, "near-1")).replayed  # a retry finds it, on the same path
    assert await shop.audit() == []


async def test_a_sku_with_a_bucket_on_every_master_sells_to_every_buyer_in_one_step(shop: Engine) -> None:
    n = shop.buckets_on_every_master("spread")
    placed = [shop.store.node_of(keys.sku_tag(keys.bucket_shard("spread", b))) for b in range(n)]
    assert len(set(placed)) == 3 and set(placed) == set(shop.store.masters())
    assert len(set(placed[:-1])) < 3  # the fewest that do
    await shop.create_sku("spread", "Spread", 100, "CNY", 100, buckets=n)
    await shop.import_codes(codes_text("SPRD", 4 * n), sku="spread", supplier="sup", unit_cost=50)
    buyers: dict[str, str] = {}  # master -> a distributor whose account it holds
    for d in (f"b{i}" for i in range(1000)):
        buyers.setdefault(shop.store.node_of(keys.acct_tag(d)), d)
    assert len(buyers) == 3
    for d in buyers.values():
        await shop.create_distributor(d, d)
        await shop.topup(d, 10_000, "seed")
    before = shop.coalescer_stats()
    got = [await shop.purchase(d, "spread", 2, f"{d}-1") for d in buyers.values()]
    after = shop.coalescer_stats()
    assert after["deliver"][1] - before["deliver"][1] == 3 and after["begin"] == before["begin"]
    assert len({c.code for o in got for c in o.codes}) == 6
    assert (await shop.stock("spread")).available == 4 * n - 6
    assert await shop.audit() == []


async def test_an_import_gives_every_master_an_equal_share_of_a_spread_sku(shop: Engine) -> None:
    """Buckets land on masters by hash slot, so a master may hold more of a SKU's buckets
    than another; each master still gets a third of a batch, each bucket its part of it."""
    def masters_of_buckets(sku: str, n: int) -> dict[str, list[int]]:
        on: dict[str, list[int]] = {}
        for b in range(n):
            on.setdefault(shop.store.node_of(keys.sku_tag(keys.bucket_shard(sku, b))), []).append(b)
        return on

    sku = next(f"u{i}" for i in range(1000) if sorted(map(len, masters_of_buckets(f"u{i}", 4).values())) == [1, 1, 2])
    await shop.create_sku(sku, "Uneven", 100, "CNY", 100, buckets=4)
    await shop.import_codes(codes_text("UNEV", 600), sku=sku, supplier="sup", unit_cost=50)
    held = {b: int(await shop.store.client.hget(keys.SkuKeys(keys.bucket_shard(sku, b)).stats, "available"))
            for b in range(4)}
    per_master = {m: sum(held[b] for b in bs) for m, bs in masters_of_buckets(sku, 4).items()}
    assert sorted(per_master.values()) == [200, 200, 200] and sum(held.values()) == 600
    assert sorted(held.values()) == [100, 100, 200, 200]
    assert (await shop.stock(sku)).available == 600
    assert await shop.audit() == []


async def test_a_dry_bucket_sends_its_buyer_to_another_on_the_same_master(shop: Engine) -> None:
    sku = next(f"p{i}" for i in range(1000)
               if shop.store.node_of(keys.sku_tag(f"p{i}")) == shop.store.node_of(keys.sku_tag(f"p{i}~1")))
    buyer = next(f"c{i}" for i in range(1000)
                 if shop.store.node_of(keys.acct_tag(f"c{i}")) == shop.store.node_of(keys.sku_tag(sku)))
    await shop.create_distributor(buyer, buyer)
    await shop.topup(buyer, 10_000, "seed")
    await shop.create_sku(sku, "Pair", 100, "CNY", 100)
    await shop.import_codes(codes_text("PAIR", 40), sku=sku, supplier="sup", unit_cost=50)
    await shop.update_sku(sku, buckets=2)  # bucket 1 is new and empty; each order looks there first by even odds
    before = shop.coalescer_stats()
    got = [await shop.purchase(buyer, sku, 1, f"pair-{i}") for i in range(40)]
    after = shop.coalescer_stats()
    assert after["begin"] == before["begin"]  # every one in one step
    assert after["deliver"][1] - before["deliver"][1] > 40  # some tried the dry bucket first
    assert len({o.codes[0].code for o in got}) == 40 and (await shop.stock(sku)).available == 0
    assert await shop.audit() == []


def test_the_cli_spreads_a_sku_over_every_master(flushed_cluster_url: str, tmp_path: os.PathLike[str],
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    config = make_config(tmp_path, redis_url=flushed_cluster_url)
    for name, value in (("DISPATCH_REDIS_URL", flushed_cluster_url), ("DISPATCH_DATA_DIR", config.data_dir),
                        ("DISPATCH_MASTER_KEY", config.master_key)):
        monkeypatch.setenv(name, value)
    assert main(["sku", "create", "wide", "--name", "W", "--face-value", "100", "--currency", "CNY", "--price", "90",
                 "--buckets", "masters"]) == 0
    assert main(["sku", "create", "narrow", "--name", "N", "--face-value", "100", "--currency", "CNY",
                 "--price", "90"]) == 0
    assert main(["sku", "update", "narrow", "--buckets", "masters"]) == 0
    with pytest.raises(SystemExit):
        main(["sku", "update", "narrow", "--buckets", "most"])
    assert "an integer from 1 to 16, or masters, not 'most'" in capsys.readouterr().err
    with SyncEngine(config, sweep=False) as e:
        for sku in ("wide", "narrow"):
            n = e.get_sku(sku).buckets
            assert n == e.buckets_on_every_master(sku) > 1
            assert len({e.store.node_of(keys.sku_tag(keys.bucket_shard(sku, b))) for b in range(n)}) == 3


async def test_a_one_step_order_whose_account_moved_is_left_untouched(shop: Engine) -> None:
    """A one-step call's shards must be served by the master it runs on: an order whose
    account is not (its slot moved before the call ran) is answered "moved" untouched,
    while the call's other orders go through; the engine then sends it as a saga."""
    near, far = dist_names(shop, "g100")
    for d in (near, far):
        await shop.create_distributor(d, d)
        await shop.topup(d, 100_000, "seed")
    rec = encode(("placeholder",))
    items = [DeliverItem(new_id(), "moved", "digest", "g100", far, 1, 0, 9500, rec),
             DeliverItem(new_id(), "stayed", "digest", "g100", near, 1, 0, 9500, rec)]
    got = await shop.store.orders.step("deliver", shop.store.node_of(keys.sku_tag("g100")), items)
    assert got[0] is MOVED and isinstance(got[1], list) and len(got[1]) == 1
    assert (await shop.stock("g100")).available == 2
    assert (await shop.balance(far)).balance == 100_000 and len(await shop.ledger(far)) == 1  # the top-up
    assert (await shop.balance(near)).balance == 100_000 - 9500
    order = await shop.purchase(far, "g100", 1, "moved")
    assert (order.status, len(order.codes)) == ("delivered", 1)


# ---- a hot SKU spread over every master --------------------------------------------------------

def hot_sku_name(engine: Engine, buckets: int = 3) -> str:
    """A SKU id whose first *buckets* buckets live on as many masters (bucket shards go
    to masters by hash slot)."""
    return next(f"hot{i}" for i in range(1000)
                if len(masters_of(engine, [keys.sku_tag(keys.bucket_shard(f"hot{i}", b))
                                           for b in range(buckets)])) == buckets)


@pytest.mark.timeout(300)
async def test_a_hot_sku_in_three_buckets_sells_on_every_master(flushed_cluster_url: str, tmp_path) -> None:
    engine = Engine(make_config(tmp_path, redis_url=flushed_cluster_url), sweep=False)
    async with engine:
        hot = hot_sku_name(engine)
        await engine.create_supplier("sup", "Supplier")
        await engine.create_sku(hot, "Hot", 1000, "CNY", 1000, low_stock_threshold=50, buckets=3)
        await engine.import_codes(codes_text("HOT", 600), sku=hot, supplier="sup", unit_cost=500)
        for d in DISTS:
            await engine.create_distributor(d, d)
            await engine.topup(d, 1_000_000, "seed")

        async def buyer(n: int) -> list[object]:
            out: list[object] = []
            for i in range(7):
                mode = "reserve" if (n + i) % 4 == 0 else "deliver"
                try:
                    order = await engine.purchase(list(DISTS)[n % len(DISTS)], hot, 1, f"{n}-{i}", mode=mode)
                    if order.status == "reserved":
                        order = await engine.confirm(list(DISTS)[n % len(DISTS)], order.order_id)
                    out.append(order)
                except errors.DispatchError as e:
                    out.append(e)
            return out

        results = [r for rs in await asyncio.gather(*(buyer(n) for n in range(100))) for r in rs]  # 700 orders
        delivered = [r for r in results if isinstance(r, Order)]
        assert len(delivered) == 600  # no false sold-out: every code sold while any bucket had one
        assert {type(r).__name__ for r in results if not isinstance(r, Order)} == {"OutOfStockError"}
        codes = [c.code for o in delivered for c in o.codes]
        assert len(set(codes)) == 600
        shards = await engine.store.catalog.shards(hot)
        sold = [(await engine.store.catalog.counters(s)).get("sold", 0) for s in shards]
        assert sum(sold) == 600 and all(n >= 150 for n in sold), sold  # every master sold its share
        stock = await engine.stock(hot)
        assert (stock.accepted, stock.available, stock.sold, stock.stock_status) == (600, 0, 600, "out_of_stock")
        levels = [e.type for e in (await engine.events(f"sku:{hot}", limit=100)).events]
        assert levels[0] == "stock.restored" and levels[-1] == "stock.out" and levels[1:-1] in ([], ["stock.low"])
        for d in DISTS:
            bal = await engine.balance(d)
            assert bal.held == 0 and sum(e.amount for e in await engine.ledger(d)) == bal.balance
        assert await engine.audit() == []
