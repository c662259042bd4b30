"""Invariants 1-6 of docs/design.md under real concurrency, and after a crash of Redis.

Hundreds of buyers place thousands of orders at once (deliver and reserve, retries
of the same external_ref, cancels, leases left to expire) against less stock than
they want; afterwards every invariant is checked from what the clients saw and from
what the store holds.
"""

from __future__ import annotations

import asyncio
import collections
import random

import pytest

from dispatch import errors
from dispatch.engine import Engine
from dispatch.models import Order

from .conftest import codes_text, make_config

SKUS = {"s1": 900, "s2": 1200, "s3": 1500, "s4": 2500}  # price per code
STOCK = {"s1": 2000, "s2": 4000, "s3": 5000, "s4": 4000}
DISTS = {"d1": 3_000_000, "d2": 5_000_000, "d3": 8_000_000, "d4": 10_000_000, "d5": 600_000}


class Ledger:
    """What the clients saw."""

    def __init__(self) -> None:
        self.outcomes: dict[tuple[str, str], list[object]] = collections.defaultdict(list)
        self.errors: collections.Counter[str] = collections.Counter()

    def saw(self, dist: str, ref: str, result: object) -> None:
        self.outcomes[(dist, ref)].append(result)
        if isinstance(result, errors.DispatchError):
            self.errors[result.code] += 1


async def setup_shop(engine: Engine) -> None:
    await engine.create_supplier("sup", "Supplier")
    for sku, price in SKUS.items():
        await engine.create_sku(sku, sku, price, "CNY", price)
        report = await engine.import_codes(codes_text(sku.upper(), STOCK[sku]), sku=sku, supplier="sup",
                                           unit_cost=price // 2)
        assert report.accepted == STOCK[sku]
    for dist, money in DISTS.items():
        await engine.create_distributor(dist, dist, credit_limit=1000 if dist == "d5" else 0)
        await engine.topup(dist, money, "seed")


async def buyer(engine: Engine, rng: random.Random, n_orders: int, seen: Ledger, tag: str) -> None:
    for i in range(n_orders):
        dist = rng.choice(list(DISTS))
        sku = rng.choices(list(SKUS), weights=[4, 3, 2, 1])[0]
        ref = f"{tag}-{i}"
        mode = "reserve" if rng.random() < 0.3 else "deliver"
        kw = dict(mode=mode, allow_partial=rng.random() < 0.05)
        if mode == "reserve":
            kw["reserve_ttl_s"] = rng.choice([1, 2, 60])
        qty = rng.randint(1, 3)
        copies = 2 if rng.random() < 0.1 else 1  # a client retrying while the first try is in flight
        results = await asyncio.gather(*(engine.purchase(dist, sku, qty, ref, **kw) for _ in range(copies)),
                                       return_exceptions=True)
        if rng.random() < 0.05:  # a late retry (after a refusal it may make the order)
            results.append(await _try(engine.purchase(dist, sku, qty, ref, **kw)))
        for r in results:
            seen.saw(dist, ref, r)
        order = next((r for r in results if isinstance(r, Order)), None)
        if order is not None and order.status == "reserved" and kw["reserve_ttl_s"] == 60:
            action = engine.confirm if rng.random() < 0.6 else engine.cancel
            seen.saw(dist, ref, await _try(action(dist, order.order_id)))
        # ttl 1-2 s reservations are left to expire (or confirmed too late)
        elif order is not None and order.status == "reserved" and rng.random() < 0.2:
            await asyncio.sleep(rng.choice([0, 2.2]))
            seen.saw(dist, ref, await _try(engine.confirm(dist, order.order_id)))


async def _try(coro):  # type: ignore[no-untyped-def]
    try:
        return await coro
    except errors.DispatchError as e:
        return e


async def check_invariants(engine: Engine, seen: Ledger) -> None:
    """Every invariant, from the store and from what the clients were told."""
    assert await engine.audit() == []
    all_codes: list[str] = []
    spent: collections.Counter[str] = collections.Counter()
    sold: collections.Counter[str] = collections.Counter()
    for dist in DISTS:
        cursor = None
        orders: dict[str, Order] = {}
        while True:
            page = await engine.list_orders(dist, cursor=cursor, limit=500)
            orders.update((o.order_id, o) for o in page.orders)
            if (cursor := page.next_cursor) is None:
                break
        for o in orders.values():
            assert o.status in ("delivered", "cancelled", "expired"), "\n".join(
                [repr((o.status, o.created_at, o.updated_at, o.reserve_expires_at))] + [
                repr((r.status, r.replayed, r.updated_at) if isinstance(r, Order) else r) for r in seen.outcomes[(dist, o.external_ref)]])
            if o.status == "delivered":
                all_codes += [c.code for c in o.codes]
                n = len(o.codes)
                assert n == o.qty or (o.total == n * o.unit_price and n >= 1), "oversold/undersold order"  # 3
                assert o.total == n * o.unit_price
                spent[dist] += o.total
                sold[o.sku] += n
            else:
                assert o.codes == []
        # 5. money: balance = top-ups - what delivered orders cost = sum of the ledger
        bal = await engine.balance(dist)
        assert (bal.balance, bal.held) == (DISTS[dist] - spent[dist], 0)
        assert bal.balance >= -bal.credit_limit
        ledger = await engine.ledger(dist)
        assert sum(e.amount for e in ledger) == bal.balance and sum(e.held_delta for e in ledger) == 0
        # 4. idempotency: every answer for one ref named the same order, with the same codes
        for (d, ref), results in seen.outcomes.items():
            if d != dist:
                continue
            ids = {r.order_id for r in results if isinstance(r, Order) and r.external_ref == ref}
            assert len(ids) <= 1, f"{ref} made {len(ids)} orders"
            for r in results:
                if isinstance(r, Order) and r.status == "delivered" and r.external_ref == ref:
                    assert r.codes == orders[r.order_id].codes
    # 1. unique delivery
    assert len(all_codes) == len(set(all_codes))
    # 2. conservation, with nothing left reserved
    for sku in SKUS:
        st = await engine.stock(sku)
        assert st.accepted == STOCK[sku] == st.available + st.reserved + st.sold + st.voided + st.invalidated
        assert (st.reserved, st.sold) == (0, sold[sku])


async def settle_everything(engine: Engine) -> None:
    """Let every lease lapse and the sweep finish every saga."""
    await asyncio.sleep(2.3)
    for _ in range(3):
        await engine.sweep(grace_s=0)


async def many_buyers(engine: Engine, seed: int, buyers: int, per_buyer: int, replays: int) -> None:
    """*buyers* at once in :func:`setup_shop`'s shop, every saga then settled and every
    invariant checked, and the run shown to exercise what it claims to (with more than
    *replays* refs answered as a replay)."""
    seen = Ledger()
    rng = random.Random(seed)
    await asyncio.gather(*(buyer(engine, random.Random(rng.random()), per_buyer, seen, f"b{i}")
                           for i in range(buyers)))
    await settle_everything(engine)
    await check_invariants(engine, seen)
    assert len(seen.outcomes) == buyers * per_buyer
    assert seen.errors["out_of_stock"] > 0 and seen.errors["insufficient_balance"] > 0
    assert seen.errors["reservation_expired"] > 0
    statuses = collections.Counter(r.status for rs in seen.outcomes.values() for r in rs if isinstance(r, Order))
    assert statuses["delivered"] and statuses["cancelled"] and statuses["reserved"]
    assert sum(1 for rs in seen.outcomes.values() if sum(isinstance(r, Order) and r.replayed for r in rs)) > replays


@pytest.mark.timeout(600)
async def test_many_buyers_keep_every_invariant(flushed_redis_url: str, tmp_path) -> None:
    engine = Engine(make_config(tmp_path, redis_url=flushed_redis_url, sweep_interval_s=0.2), sweep=True)
    async with engine:
        await setup_shop(engine)
        await many_buyers(engine, 20261121, buyers=200, per_buyer=100, replays=100)  # 20,000 orders
        stats = engine.coalescer_stats()
        calls, items = stats["deliver"]  # on one node, every purchase, delivered or reserved, is one step
        assert items > calls, "concurrent purchases were never coalesced"  # how many a call depends on the host
        assert stats["take"] == (0, 0) and stats["begin"] == (0, 0)


@pytest.mark.timeout(600)
async def test_crash_of_redis_mid_load_loses_nothing(tmp_path) -> None:
    """kill -9 the embedded redis-server (appendfsync always) under load, restart it
    from its AOF, let the sweep recover, and check every invariant."""
    cfg = make_config(tmp_path, appendfsync="always", redis_timeout_s=2.0)
    engine = Engine(cfg, sweep=False)
    async with engine:
        await setup_shop(engine)
        seen = Ledger()
        stop = asyncio.Event()
        delivered_before_crash: dict[str, list[str]] = {}
        crashed = False

        async def load(tag: str, rng: random.Random) -> None:
            i = 0
            while not stop.is_set():
                dist, sku, ref = rng.choice(list(DISTS)), rng.choice(list(SKUS)), f"{tag}-{i}"
                mode = "reserve" if rng.random() < 0.3 else "deliver"
                result = await _try(engine.purchase(dist, sku, rng.randint(1, 2), ref, mode=mode))
                seen.saw(dist, ref, result)
                if isinstance(result, errors.StoreUnavailableError):
                    await asyncio.sleep(0.05)  # back off, as a client would (a refused connect never yields)
                if isinstance(result, Order) and result.status == "delivered" and not crashed:
                    delivered_before_crash[result.order_id] = [c.code for c in result.codes]
                if isinstance(result, Order) and result.status == "reserved":
                    seen.saw(dist, ref, await _try(engine.confirm(dist, result.order_id)))
                i += 1

        tasks = [asyncio.create_task(load(f"c{n}", random.Random(n))) for n in range(50)]
        await asyncio.sleep(1.5)
        crashed = True
        engine.store.embedded.kill()  # type: ignore[union-attr]
        await asyncio.sleep(0.5)
        await asyncio.to_thread(engine.store.embedded.start)  # type: ignore[union-attr]
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*tasks)
        assert seen.errors["store_unavailable"] > 0, "the crash did not hit any request"

        await engine.sweep(grace_s=0)  # recovery: finish every order the crash left half done
        # clients look up what failed, and cancel reservations they no longer want
        for (dist, ref), results in list(seen.outcomes.items()):
            if any(isinstance(r, errors.StoreUnavailableError) for r in results):
                order = next((r for r in results if isinstance(r, Order)), None)
                if order is None:
                    try:
                        order = await engine.get_order_by_ref(dist, ref)
                    except errors.NotFoundError:
                        continue  # never begun, or rolled back: nothing to recover
                order = await engine.get_order(dist, order.order_id)
                assert order.status in ("reserved", "delivered", "cancelled")
                if order.status == "reserved":
                    await engine.cancel(dist, order.order_id)
        await engine.sweep(grace_s=0)

        # durability: every order a client saw delivered before the crash is still there, same codes
        assert delivered_before_crash
        for dist in DISTS:
            page = await engine.list_orders(dist, status="delivered", limit=500)
            while True:
                for o in page.orders:
                    if o.order_id in delivered_before_crash:
                        assert [c.code for c in o.codes] == delivered_before_crash.pop(o.order_id)
                if page.next_cursor is None:
                    break
                page = await engine.list_orders(dist, status="delivered", cursor=page.next_cursor, limit=500)
        assert delivered_before_crash == {}
        for dist in DISTS:  # money after the crash: ledger sums equal balances, nothing held
            bal = await engine.balance(dist)
            ledger = await engine.ledger(dist)
            assert (sum(e.amount for e in ledger), sum(e.held_delta for e in ledger)) == (bal.balance, bal.held)
            assert bal.held == 0
        assert await engine.audit() == []


async def test_refused_buyers_never_make_stock_look_sold_out(engine: Engine) -> None:
    """A distributor with an API key and no money floods a flash-sale SKU with orders it
    cannot pay for, while a funded one buys: every code goes to a funded order, and the
    stock level never flaps (a refused order never takes a code, not even for a moment)."""
    await engine.create_supplier("sup", "Supplier")
    await engine.create_sku("flash", "Flash", 1000, "CNY", 1000)
    await engine.import_codes(codes_text("FLASH", 2), sku="flash", supplier="sup", unit_cost=500)
    await engine.create_distributor("broke", "Broke")
    await engine.create_distributor("funded", "Funded")
    await engine.topup("funded", 1_000_000, "seed")
    before = (await engine.events("sku:flash")).events  # the import put it in stock

    async def attempt(dist: str, ref: str, qty: int) -> object:
        try:
            return await engine.purchase(dist, "flash", qty, ref)
        except errors.DispatchError as e:
            return e

    tries = [attempt("broke", f"b{i}", 2) for i in range(300)] + [attempt("funded", f"f{i}", 1) for i in range(150)]
    random.Random(7).shuffle(tries)
    results = await asyncio.gather(*tries)
    funded = [r for r in results if isinstance(r, Order)]
    assert len(funded) == 2 and {r.external_ref[0] for r in funded} == {"f"}
    refused = collections.Counter(r.code for r in results
                                  if isinstance(r, errors.DispatchError))
    assert set(refused) <= {"insufficient_balance", "out_of_stock"}
    assert sum(refused.values()) == 448
    levels = [e.type for e in (await engine.events("sku:flash", after=before[-1].event_id, limit=1000)).events]
    assert levels == ["stock.out"], levels  # out once, when the last code went; never restored
    assert (await engine.stock("flash")).sold == 2
    assert (await engine.balance("broke")).balance == 0
    assert await engine.audit() == []
