"""Purchases on a real Redis Cluster: the deliver saga under load, and after a crash.

On a cluster a purchase in deliver mode is the saga begin (account) -> take (SKU)
-> commit (account); these tests check it keeps every invariant with hundreds of
buyers whose SKUs and accounts live on different masters, and that the sweep (or a
retry) finishes one a crash left half done, or undoes it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from dispatch import errors
from dispatch.engine import Engine
from dispatch.records import encode, new_id
from dispatch.store import keys
from dispatch.store.orders import BeginItem, TakeItem

from .conftest import make_config
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
        assert stats["deliver"] == (0, 0)  # the one-node script never ran: every purchase was a saga
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
