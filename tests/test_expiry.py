"""Codes that expire: refused at import when expired (or inside the SKU's minimum shelf
life), kept in one pool per expiry, retired unsold when their sell-by comes (before any
sale, and by the sweep), counted expired; sold first-expiring-first if asked; the same in
each bucket of a SKU spread over several. Times are never waited for: a code's sell-by
is moved by the SKU's min_shelf_life_s."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import redis

from dispatch import errors
from dispatch.engine import Engine

from .conftest import make_config
from .httpkit import Server, make_server, server  # noqa: F401  (fixtures)

DAY = 86_400


def at(days: float) -> str:
    """An expires_at *days* from now, ISO 8601 with a zone."""
    return (datetime.now(timezone.utc) + timedelta(days=days)).isoformat(timespec="seconds")


def csv(*rows: tuple[str, str]) -> bytes:
    return ("code,expires_at\n" + "".join(f"{c},{e}\n" for c, e in rows)).encode()


async def sell_out(e: Engine) -> list[str]:
    """The codes acme gets buying g100 one at a time until it is out of stock, sorted."""
    sold: list[str] = []
    while True:
        try:
            sold += [c.code for c in (await e.purchase("acme", "g100", 1, f"o{len(sold)}")).codes]
        except errors.OutOfStockError:
            return sorted(sold)


async def test_expired_lines_are_refused_and_the_rest_split_by_expiry(shop: Engine) -> None:
    await shop.update_sku("g100", min_shelf_life_s=DAY)
    body = csv(("OLD-0001", "2020-01-01T00:00:00Z"), ("SOON-001", at(0.5)), ("LATE-001", at(30)),
               ("LATE-002", at(30)), ("DAY-0001", "2999-12-31"), ("NAIVE-01", "2999-01-01T00:00:00"))
    r = await shop.import_codes(body + b"PLAIN-01,\n", sku="g100", supplier="sup", unit_cost=1, batch_id="b1")
    assert (r.accepted, r.malformed) == (5, 2)
    assert [(m.line, m.reason) for m in r.malformed_lines] == [
        (2, "expired (expires_at is past)"), (3, "expires within the SKU's minimum shelf life (86400 s)")]
    batch = await shop._parts["inventory"].batch("b1")
    assert len(batch.subs) == 3  # three expiries; the code without one is in the batch's own pool
    assert (await shop.stock("g100")).available == 5
    assert await shop.audit() == []


async def test_codes_past_their_sell_by_are_never_sold_and_count_expired(shop: Engine) -> None:
    await shop.import_codes(csv(("SHORT-01", at(2)), ("SHORT-02", at(2)), ("SHORT-03", at(2))),
                            sku="g100", supplier="sup", unit_cost=1, batch_id="short")
    await shop.import_codes(csv(("LONG-001", at(60))), sku="g100", supplier="sup", unit_cost=1, batch_id="long")
    held = await shop.purchase("beta", "g100", 1, "held", mode="reserve")
    assert (await shop.stock("g100")).available == 3
    # the short batch is now inside the minimum shelf life: its codes are past their sell-by
    await shop.update_sku("g100", min_shelf_life_s=10 * DAY)
    got = await shop.purchase("acme", "g100", 1, "one")
    assert got.codes[0].code == "LONG-001"
    with pytest.raises(errors.OutOfStockError):
        await shop.purchase("acme", "g100", 1, "two")
    stock = await shop.stock("g100")
    assert (stock.available, stock.expired, stock.reserved, stock.sold) == (0, 2, 1, 1)
    # the reserved code comes back after its batch was retired: expired too, not on sale
    await shop.cancel("beta", held.order_id)
    stock = await shop.stock("g100")
    assert (stock.available, stock.expired, stock.reserved) == (0, 3, 0)
    report = {b.batch_id: b.expired for b in (await shop.supplier_report("sup")).batches}
    assert report == {"short": 3, "long": 0}
    # a resumed import of the retired batch adds no code to sale
    await shop.import_codes(csv(("SHORT-01", at(2)), ("SHORT-02", at(2)), ("SHORT-03", at(2))),
                            sku="g100", supplier="sup", unit_cost=1, batch_id="short")
    assert (await shop.stock("g100")).available == 0
    assert await shop.audit() == []


async def test_the_sweep_retires_stock_that_does_not_sell_parked_too(shop: Engine) -> None:
    await shop.import_codes(csv(("SWEEP-01", at(3)), ("SWEEP-02", at(5))), sku="g100", supplier="sup",
                            unit_cost=1, batch_id="s1")
    await shop.create_supplier("sup2", "Other")
    await shop.import_codes(csv(("PARK-001", at(3))), sku="g100", supplier="sup2", unit_cost=1, batch_id="p1")
    await shop.update_supplier("sup2", status="blacklisted")
    await shop.update_sku("g100", min_shelf_life_s=4 * DAY)  # SWEEP-01 and PARK-001 are past their sell-by
    assert (await shop.stock("g100")).expired == 0  # nothing sold, nothing swept yet
    await shop.sweep()
    stock = await shop.stock("g100")
    assert (stock.available, stock.parked, stock.expired) == (1, 0, 2)
    await shop.update_supplier("sup2", status="active")
    assert (await shop.stock("g100")).available == 1
    assert await shop.audit() == []


async def test_first_expiring_sells_the_earliest_expiry_first(shop: Engine) -> None:
    await shop.update_sku("g100", sale_order="first_expiring")
    await shop.import_codes(csv(("E30-0001", at(30)), ("E10-0001", at(10)), ("NONE-001", "")),
                            sku="g100", supplier="sup", unit_cost=1, batch_id="b1")
    await shop.import_codes(csv(("E20-0001", at(20)), ("E05-0001", at(5))), sku="g100", supplier="sup",
                            unit_cost=1, batch_id="b2")
    await shop.import_codes(b"PLAIN-001\n", sku="g100", supplier="sup", unit_cost=1, batch_id="b3")
    got = await shop.purchase("acme", "g100", 6, "all")
    assert [c.code for c in got.codes] == ["E05-0001", "E10-0001", "E20-0001", "E30-0001", "NONE-001", "PLAIN-001"]
    assert await shop.audit() == []


async def test_oldest_first_keeps_a_batchs_sub_batches_in_its_place(shop: Engine) -> None:
    await shop.import_codes(csv(("A-LATE-1", at(30)), ("A-SOON-1", at(10))), sku="g100", supplier="sup",
                            unit_cost=1, batch_id="a")
    await shop.import_codes(csv(("B-SOON-1", at(5))), sku="g100", supplier="sup", unit_cost=1, batch_id="b")
    got = await shop.purchase("acme", "g100", 3, "all")
    assert [c.code for c in got.codes][2] == "B-SOON-1"  # batch a first, whatever its codes' expiries
    assert await shop.audit() == []


async def test_an_upload_with_expired_lines_over_http(server: Server) -> None:
    await server.shop(codes=0)
    r = await server.admin("POST", "/admin/batches?sku=g100&supplier=sup&unit_cost=9000",
                           body=csv(("HTTP-0001", "2001-01-01"), ("HTTP-0002", at(3))),
                           headers={"Content-Type": "text/csv"})
    assert r.status == 201 and r.json()["accepted"] == 1
    assert r.json()["malformed_lines"] == [{"line": 2, "reason": "expired (expires_at is past)"}]
    await server.engine.sweep()
    metrics = (await server.request("GET", "/metrics")).body.decode()
    assert 'dispatch_stock_expiring_codes{sku="g100"} 1.0' in metrics
    r = await server.admin("PATCH", "/admin/skus/g100", json={"min_shelf_life_s": 30 * DAY})
    assert r.status == 200 and r.json()["min_shelf_life_s"] == 30 * DAY
    r = await server.as_("acme", "POST", "/v1/orders", json={"sku": "g100", "qty": 1, "external_ref": "x"})
    assert (r.status, r.error) == (409, "out_of_stock")
    assert (await server.admin("GET", "/admin/skus/g100/stock")).json()["expired"] == 1


async def test_codes_nearing_their_sell_by_are_counted_and_told_once(tmp_path, flushed_redis_url: str) -> None:
    cfg = make_config(tmp_path, redis_url=flushed_redis_url, expiring_window_s=7 * DAY, expiring_alert_codes=3)
    async with Engine(cfg, sweep=False) as e:
        await e.create_sku("g100", "Game card", 10000, "USD", 9500)
        await e.create_supplier("sup", "Supplier")
        await e.import_codes(csv(("NEAR-001", at(3)), ("NEAR-002", at(3)), ("FAR-0001", at(30))), sku="g100",
                             supplier="sup", unit_cost=1)
        await e.sweep()
        assert (await e.stock("g100")).expiring == 2
        assert [ev.type for ev in (await e.events("sku:g100")).events if ev.type == "stock.expiring"] == []
        await e.import_codes(csv(("NEAR-003", at(4))), sku="g100", supplier="sup", unit_cost=1)
        await e.sweep()
        await e.sweep()  # told once, not once a sweep
        told = [ev for ev in (await e.events("sku:g100")).events if ev.type == "stock.expiring"]
        assert len(told) == 1 and told[0].data["expiring"] == 3 and told[0].data["threshold"] == 3
        assert (await e.stock("g100")).expiring == 3
        assert await e.audit() == []


async def test_a_sweep_with_nothing_new_writes_nothing(shop: Engine, flushed_redis_url: str) -> None:
    await shop.import_codes(csv(("QUIET-01", at(3)), ("QUIET-02", at(30))), sku="g100", supplier="sup", unit_cost=1)
    await shop.sweep()
    with redis.Redis.from_url(flushed_redis_url) as r:
        dirty = r.info("persistence")["rdb_changes_since_last_save"]
        await shop.sweep()
        await shop.sweep()
        assert r.info("persistence")["rdb_changes_since_last_save"] == dirty


async def test_expiry_in_a_sku_spread_over_buckets(tmp_path, flushed_redis_url: str) -> None:
    """Each bucket keeps its own expiring batches: the sweep retires them in every bucket,
    the stock figures and the stock.expiring alert are over the whole SKU, void reaches
    every pool of a batch in every bucket, and no code past its sell-by is sold."""
    cfg = make_config(tmp_path, redis_url=flushed_redis_url, expiring_window_s=7 * DAY, expiring_alert_codes=3)
    async with Engine(cfg, sweep=False) as e:
        await e.create_sku("g100", "Game card", 10000, "USD", 9500, buckets=2)
        await e.create_supplier("sup", "Supplier")
        await e.create_distributor("acme", "Acme")
        await e.topup("acme", 1_000_000, "seed")
        await e.import_codes(csv(("HELD-001", at(2))), sku="g100", supplier="sup", unit_cost=1, batch_id="held")
        held = await e.purchase("acme", "g100", 1, "held", mode="reserve")
        short = [f"SHORT-0{i}" for i in range(1, 5)]
        await e.import_codes(csv(*((c, at(2)) for c in short), ("LONG-001", at(60)), ("LONG-002", at(60))),
                             sku="g100", supplier="sup", unit_cost=1, batch_id="dated")
        await e.import_codes(b"PLAIN-01\nPLAIN-02\n", sku="g100", supplier="sup", unit_cost=1, batch_id="plain")
        shards = await e.store.catalog.shards("g100")
        assert shards == ["g100", "g100~1"]

        async def per_bucket(field: str) -> list[int]:
            return [(await e.store.catalog.counters(s)).get(field, 0) for s in shards]

        await e.sweep()
        assert await per_bucket("expiring") == [2, 2]  # each bucket holds half of the SHORT codes
        stock = await e.stock("g100")
        assert (stock.accepted, stock.available, stock.reserved, stock.expiring) == (9, 8, 1, 4)
        told = [ev for ev in (await e.events("sku:g100")).events if ev.type == "stock.expiring"]
        assert len(told) == 1 and told[0].data["expiring"] == 4  # 2 + 2 reach the threshold of 3

        await e.update_sku("g100", min_shelf_life_s=10 * DAY)  # HELD and SHORT are past their sell-by
        await e.sweep()
        assert await per_bucket("expired") == [2, 2]
        assert await per_bucket("expiring") == [0, 0]
        stock = await e.stock("g100")
        assert (stock.available, stock.expired, stock.reserved, stock.expiring) == (4, 4, 1, 0)
        assert await e.audit() == []

        await e.void_batch("dated")  # its LONG codes, one in each bucket's pool of that expiry
        await e.cancel("acme", held.order_id)  # back to its retired pool: expired
        assert await per_bucket("expired") == [3, 2]
        stock = await e.stock("g100")
        assert (stock.available, stock.expired, stock.voided, stock.reserved) == (2, 5, 2, 0)
        assert await sell_out(e) == ["PLAIN-01", "PLAIN-02"]
        stock = await e.stock("g100")
        assert (stock.accepted, stock.sold, stock.expired, stock.voided, stock.available) == (9, 2, 5, 2, 0)
        report = {b.batch_id: b.expired for b in (await e.supplier_report("sup")).batches}
        assert report == {"held": 1, "dated": 4, "plain": 0}
        assert await e.audit() == []


async def test_a_spread_sku_retires_at_the_sale_in_each_bucket(shop: Engine) -> None:
    await shop.update_sku("g100", buckets=2)
    await shop.import_codes(csv(*((f"SOON-00{i}", at(2)) for i in range(4)), ("KEEP-001", ""), ("KEEP-002", "")),
                            sku="g100", supplier="sup", unit_cost=1, batch_id="b1")
    await shop.create_supplier("sup2", "Other")
    await shop.import_codes(csv(("PARK-001", at(2)), ("PARK-002", at(2))), sku="g100", supplier="sup2",
                            unit_cost=1, batch_id="p1")
    await shop.update_supplier("sup2", status="blacklisted")  # parks each of its pools in each bucket
    assert ((await shop.stock("g100")).available, (await shop.stock("g100")).parked) == (6, 2)
    await shop.update_sku("g100", min_shelf_life_s=4 * DAY)  # no sweep: the sales retire what is due
    assert await sell_out(shop) == ["KEEP-001", "KEEP-002"]
    stock = await shop.stock("g100")
    assert (stock.available, stock.parked, stock.sold, stock.expired) == (0, 0, 2, 6)  # parked ones retired too
    assert await shop.audit() == []
