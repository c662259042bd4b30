"""The engine's API against a real redis-server: catalog, money, orders, reservations, imports."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

import msgspec
import pytest
import redis.asyncio as aredis

from dispatch import errors
from dispatch.engine import Engine
from dispatch.store import keys

from .conftest import codes_text, dump


async def stock_up(engine: Engine, n: int = 10, sku: str = "g100", prefix: str = "CODE", batch: str = "b1") -> None:
    report = await engine.import_codes(codes_text(prefix, n), sku=sku, supplier="sup", unit_cost=9000, batch_id=batch)
    assert report.accepted == n


# ---- catalog and accounts ---------------------------------------------------------------

async def test_sku_lifecycle_and_validation(engine: Engine) -> None:
    sku = await engine.create_sku("steam-100", "Steam 100", 10000, "USD", 9800)
    assert await engine.get_sku("steam-100") == sku
    with pytest.raises(errors.ConflictError):
        await engine.create_sku("steam-100", "again", 1, "USD", 1)
    with pytest.raises(errors.ValidationError, match="sku"):
        await engine.create_sku("bad id!", "x", 1, "USD", 1)
    with pytest.raises(errors.ValidationError, match="price"):
        await engine.create_sku("neg", "x", 1, "USD", -5)
    updated = await engine.update_sku("steam-100", price=9700, status="paused")
    assert (updated.price, updated.status) == (9700, "paused")
    assert (await engine.get_sku("steam-100")).price == 9700
    with pytest.raises(errors.ValidationError):
        await engine.update_sku("steam-100", status="gone")
    with pytest.raises(errors.UnknownSkuError):
        await engine.update_sku("nope", price=1)
    assert [s.sku for s in await engine.list_skus()] == ["steam-100"]


async def test_tier_prices(shop: Engine) -> None:
    assert await shop.unit_price("acme", "g100") == (9025, "CNY")  # 5% off 9500
    assert await shop.unit_price("beta", "g100") == (9500, "CNY")
    await shop.create_tier("vip", prices={"g100": 8000})
    await shop.update_distributor("beta", tier="vip")
    assert await shop.unit_price("beta", "g100") == (8000, "CNY")
    with pytest.raises(errors.NotFoundError):
        await shop.update_distributor("beta", tier="no-such-tier")


async def test_api_keys_hashed_and_rotated(shop: Engine, flushed_redis_url: str) -> None:
    key = shop.test_keys["acme"]
    assert await shop.authenticate(key) == "acme"
    assert key.encode() not in dump(flushed_redis_url)
    new = await shop.rotate_api_key("acme")
    assert await shop.authenticate(new) == "acme"
    with pytest.raises(errors.UnauthorizedError):
        await shop.authenticate(key)
    with pytest.raises(errors.UnauthorizedError):
        await shop.authenticate("")


async def test_topup_is_idempotent_by_reference(shop: Engine) -> None:
    b1 = await shop.topup("acme", 500, "wire-7")
    b2 = await shop.topup("acme", 500, "wire-7")
    assert b1.balance == b2.balance == 1_000_500
    with pytest.raises(errors.IdempotencyConflictError):
        await shop.topup("acme", 600, "wire-7")
    with pytest.raises(errors.ValidationError):
        await shop.topup("acme", 0, "zero")
    with pytest.raises(errors.NotFoundError):
        await shop.topup("ghost", 5, "x")
    assert [e.kind for e in await shop.ledger("acme")] == ["topup", "topup"]


# ---- orders ------------------------------------------------------------------------------

async def test_deliver_debits_and_returns_codes(shop: Engine) -> None:
    await stock_up(shop, 5)
    order = await shop.purchase("acme", "g100", 2, "po-1")
    assert order.status == "delivered" and not order.replayed
    assert [c.code for c in order.codes] == ["CODE000000000000", "CODE000000000001"]
    assert (order.unit_price, order.total) == (9025, 18050)
    assert (await shop.balance("acme")).balance == 1_000_000 - 18050
    stock = await shop.stock("g100")
    assert (stock.available, stock.sold, stock.stock_status) == (3, 2, "low_stock")
    assert await shop.audit() == []


async def test_replay_and_conflict(shop: Engine) -> None:
    await stock_up(shop, 5)
    first = await shop.purchase("acme", "g100", 2, "po-1", max_unit_price=9100)
    again = await shop.purchase("acme", "g100", 2, "po-1", max_unit_price=9100)
    assert again.replayed and again.order_id == first.order_id and again.codes == first.codes
    with pytest.raises(errors.IdempotencyConflictError):
        await shop.purchase("acme", "g100", 3, "po-1")
    # the same ref is another distributor's own business
    other = await shop.purchase("beta", "g100", 1, "po-1")
    assert other.order_id != first.order_id
    # a price rise after the order does not turn its replay into a refusal
    await shop.update_sku("g100", price=20000)
    replay = await shop.purchase("acme", "g100", 2, "po-1", max_unit_price=9100)
    assert replay.order_id == first.order_id
    with pytest.raises(errors.PriceChangedError):
        await shop.purchase("acme", "g100", 1, "po-2", max_unit_price=9100)
    assert (await shop.balance("acme")).balance == 1_000_000 - 2 * 9025


async def test_concurrent_same_ref_with_another_request_is_a_conflict(shop: Engine) -> None:
    await stock_up(shop, 5)
    # one round: deliver.lua reads the digests from the records it was given
    got = await asyncio.gather(shop.purchase("acme", "g100", 1, "dup2"), shop.purchase("acme", "g100", 2, "dup2"),
                               shop.purchase("acme", "g100", 1, "dup2"), return_exceptions=True)
    assert isinstance(got[1], errors.IdempotencyConflictError)
    assert not isinstance(got[0], Exception) and not isinstance(got[2], Exception)
    assert got[2].order_id == got[0].order_id and got[2].replayed and got[2].codes == got[0].codes
    assert (await shop.stock("g100")).sold == 1
    assert await shop.audit() == []


async def test_concurrent_same_ref_makes_one_order(shop: Engine) -> None:
    await stock_up(shop, 20)
    orders = await asyncio.gather(*(shop.purchase("acme", "g100", 3, "dup") for _ in range(20)))
    assert len({o.order_id for o in orders}) == 1
    assert sum(not o.replayed for o in orders) == 1
    await shop.close()  # background steps done
    await shop.start()
    stock = await shop.stock("g100")
    assert (stock.sold, stock.available) == (3, 17)  # the replays took no codes
    assert (await shop.supplier_report("sup")).delivered == 3
    assert await shop.audit() == []


async def test_out_of_stock_changes_nothing_and_frees_the_ref(shop: Engine) -> None:
    await stock_up(shop, 2)
    with pytest.raises(errors.OutOfStockError):
        await shop.purchase("acme", "g100", 3, "big")
    b = await shop.balance("acme")
    assert (b.balance, b.held) == (1_000_000, 0)
    partial = await shop.purchase("acme", "g100", 3, "big", allow_partial=True)
    assert (len(partial.codes), partial.total) == (2, 2 * 9025)
    with pytest.raises(errors.OutOfStockError):
        await shop.purchase("acme", "g100", 1, "more", allow_partial=True)
    assert await shop.audit() == []


async def test_balance_and_credit_limit(shop: Engine) -> None:
    await stock_up(shop, 10)
    await shop.create_distributor("poor", "Poor", credit_limit=10000)
    await shop.topup("poor", 9000, "t")
    # 9000 + 10000 credit covers two cards at 9500, not three
    await shop.purchase("poor", "g100", 2, "a")
    with pytest.raises(errors.InsufficientBalanceError):
        await shop.purchase("poor", "g100", 1, "b")
    b = await shop.balance("poor")
    assert (b.balance, b.held, b.available) == (-10000, 0, 0)
    stock = await shop.stock("g100")
    assert (stock.available, stock.sold) == (8, 2)  # the refused order's codes went back
    assert stock.forecast.daily_velocity == 2.0  # and are not counted as sales
    assert await shop.audit() == []


async def test_refusals(shop: Engine) -> None:
    await stock_up(shop, 5)
    with pytest.raises(errors.UnknownSkuError):
        await shop.purchase("acme", "nope", 1, "x")
    await shop.update_distributor("acme", allowed_skus=["other"])
    with pytest.raises(errors.SkuNotAllowedError):
        await shop.purchase("acme", "g100", 1, "x")
    await shop.update_distributor("acme", allowed_skus=None, status="suspended")
    with pytest.raises(errors.DistributorSuspendedError):
        await shop.purchase("acme", "g100", 1, "x")
    await shop.update_distributor("acme", status="active")
    await shop.update_sku("g100", status="paused")
    with pytest.raises(errors.SkuPausedError):
        await shop.purchase("acme", "g100", 1, "x")
    await shop.update_sku("g100", status="active")
    assert len((await shop.purchase("acme", "g100", 1, "x")).codes) == 1
    for bad in (dict(qty=0), dict(qty=10**6), dict(external_ref=""), dict(external_ref="a\nb"),
                dict(mode="later"), dict(mode="reserve", reserve_ttl_s=0), dict(reserve_ttl_s=5),
                dict(max_unit_price=-1)):
        args = dict(qty=1, external_ref="v") | bad
        with pytest.raises(errors.ValidationError):
            await shop.purchase("acme", "g100", args.pop("qty"), args.pop("external_ref"), **args)


async def test_orders_are_private_and_paged(shop: Engine) -> None:
    await stock_up(shop, 30)
    mine = [await shop.purchase("acme", "g100", 1, f"r{i}") for i in range(7)]
    theirs = await shop.purchase("beta", "g100", 1, "r0")
    with pytest.raises(errors.NotFoundError):
        await shop.get_order("acme", theirs.order_id)
    assert (await shop.get_order_by_ref("beta", "r0")).codes == theirs.codes
    seen, cursor = [], None
    while True:
        page = await shop.list_orders("acme", cursor=cursor, limit=3)
        seen += [o.order_id for o in page.orders]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == sorted(o.order_id for o in mine)  # by id: two ids of one millisecond are in no set order
    future = datetime.now(timezone.utc) + timedelta(hours=1)
    assert (await shop.list_orders("acme", since=future)).orders == []
    past = datetime.now(timezone.utc) - timedelta(hours=1)
    assert len((await shop.list_orders("acme", since=past, limit=100)).orders) == 7
    assert (await shop.list_orders("acme", status="reserved")).orders == []
    with pytest.raises(errors.ValidationError):
        await shop.list_orders("acme", cursor="garbage")


def _member_ids(member: bytes) -> list[str]:
    return [member[x:x + 26].decode() for x in range(0, len(member), 26)]


async def test_the_orders_of_a_call_are_one_index_member_and_still_page_in_id_order(shop: Engine) -> None:
    await stock_up(shop, 60)
    bought = await asyncio.gather(*(shop.purchase("acme", "g100", 1, f"c{i}") for i in range(40)))
    members = await shop.store.client.zrange(keys.AcctKeys("acme").index, 0, -1)
    assert len(members) < 40, "orders coalesced into one call share a member"
    ids = [i for m in members for i in _member_ids(m)]
    assert sorted(ids) == sorted(o.order_id for o in bought)
    assert all(_member_ids(m)[0] == min(_member_ids(m)) for m in members), "a member starts with its least id"
    seen, cursor = [], None
    while True:
        page = await shop.list_orders("acme", cursor=cursor, limit=7)
        seen += [o.order_id for o in page.orders]
        if (cursor := page.next_cursor) is None:
            break
    assert seen == sorted(ids)


async def test_index_members_by_window_and_ranges_across_interleaved_members(shop: Engine) -> None:
    """Orders deliver.lua is given directly, with ids of chosen milliseconds: a call's ids of
    two 32-millisecond windows make two members; calls whose ids interleave still read back
    in id order, a few at a time, past the point where a page of members is read."""
    from dispatch.records import OrderRec, encode
    from dispatch.store.orders import NODE, DeliverItem
    from dispatch._core import ulid_at

    await stock_up(shop, 260)
    await shop.topup("acme", 10_000_000, "for 244 orders")
    orders = shop.store.orders

    def item(ms: int) -> DeliverItem:
        oid = ulid_at(ms, os.urandom(10))
        rec = OrderRec(id=oid, ref="r" + oid, digest="d", sku="g100", qty=1, unit_price=9025, currency="CNY",
                       mode="deliver", ttl=0, partial=False, status="delivered", hold=0, total=9025, delivered=1,
                       deadline=0, created=ms, updated=ms, dat=ms, v=1)
        return DeliverItem(oid, "r" + oid, "d", "g100", "acme", 1, 0, 9025, encode(rec))

    window = 32 * (time.time_ns() // 1_000_000 // 32)
    edge = [item(window - 1), item(window), item(window - 2), item(window + 1)]  # the least of each not first
    await orders.step("deliver", NODE, edge)
    index = keys.AcctKeys("acme").index
    members = sorted(_member_ids(m) for m in await shop.store.client.zrange(index, 0, -1))
    assert members == [[edge[2].order_id, edge[0].order_id], [edge[1].order_id, edge[3].order_id]]

    calls = [[item(window + 1 + (c + 27 * j) % 30) for j in range(3)] for c in range(80)]  # ids interleave
    for call in calls:
        await orders.step("deliver", NODE, call)
    every = sorted([i.order_id for i in edge] + [i.order_id for call in calls for i in call])
    assert await shop.store.client.zcard(index) == 2 + 80
    seen, after = [], ""
    while rows := await orders.order_records("acme", after, "~", 5):
        assert len(rows) == 5 or len(seen) + len(rows) == len(every)
        seen += [r.id for r, _ in rows]
        after = seen[-1]
    assert seen == every
    assert [r.id for r, _ in await orders.order_records("acme", every[10], every[20], 100)] == every[11:20]
    assert [r.id for r, _ in await orders.order_records("acme", "", every[3], 2)] == every[:2]


async def test_an_order_gone_from_a_shared_index_member_is_skipped_and_paging_goes_on(shop: Engine) -> None:
    """commit.lua deletes a saga's order that failed; its id stays in an index member it
    shares with the other orders of its call: readers skip it, and a page still holds
    the orders after it."""
    await stock_up(shop, 10)
    bought = [await shop.purchase("acme", "g100", 1, f"g{i}") for i in range(4)]
    k = keys.AcctKeys("acme")
    await shop.store.client.hdel(k.orders, *[o.order_id for o in bought[:2]])  # as commit.lua, its id kept
    seen, after = [], ""
    while rows := await shop.store.orders.order_records("acme", after, "~", 1):
        seen.append(rows[0][0].id)
        after = seen[-1]
    assert seen == [o.order_id for o in bought[2:]]
    page = await shop.list_orders("acme", limit=2)
    assert [o.order_id for o in page.orders] == seen


# ---- reservations ------------------------------------------------------------------------

async def test_reserve_confirm_cancel(shop: Engine) -> None:
    await stock_up(shop, 5)
    r = await shop.purchase("acme", "g100", 2, "res-1", mode="reserve", reserve_ttl_s=60)
    assert r.status == "reserved" and r.codes == [] and r.reserve_expires_at is not None
    b = await shop.balance("acme")
    assert (b.balance, b.held) == (1_000_000, 18050)
    assert (await shop.stock("g100")).reserved == 2
    done = await shop.confirm("acme", r.order_id)
    assert done.status == "delivered" and len(done.codes) == 2
    assert (await shop.confirm("acme", r.order_id)).codes == done.codes  # idempotent
    with pytest.raises(errors.ConflictError):
        await shop.cancel("acme", r.order_id)
    b = await shop.balance("acme")
    assert (b.balance, b.held) == (1_000_000 - 18050, 0)

    c = await shop.purchase("acme", "g100", 3, "res-2", mode="reserve")
    cancelled = await shop.cancel("acme", c.order_id)
    assert cancelled.status == "cancelled" and cancelled.codes == []
    assert (await shop.cancel("acme", c.order_id)).status == "cancelled"
    with pytest.raises(errors.ConflictError):
        await shop.confirm("acme", c.order_id)
    stock = await shop.stock("g100")
    assert (stock.available, stock.reserved, stock.sold) == (3, 0, 2)
    # the cancelled codes are sold next, to someone else
    again = await shop.purchase("beta", "g100", 3, "after")
    assert len({c.code for c in again.codes} & {c.code for c in done.codes}) == 0
    with pytest.raises(errors.NotFoundError):
        await shop.confirm("beta", r.order_id)
    assert await shop.audit() == []


async def test_an_ended_reservation_has_its_changed_fields_appended_to_its_record(
        shop: Engine, flushed_redis_url: str) -> None:
    await stock_up(shop, 2)
    r = await shop.purchase("acme", "g100", 2, "res-patch", mode="reserve", reserve_ttl_s=60)
    done = await shop.confirm("acme", r.order_id)
    client = aredis.Redis.from_url(flushed_redis_url)
    raw = await client.hget(keys.AcctKeys("acme").orders, r.order_id)
    await client.aclose()
    # settle.lua appends what changed rather than packing the record again: each reader
    # keeps a key's last value
    assert b"\xa6status\xa8reserved" in raw and raw.endswith(b"\xa1v\x01")
    assert raw.index(b"\xa6status\xa8reserved") < raw.index(b"\xa6status\xa9delivered")
    stored = await shop.get_order("acme", r.order_id)
    assert (stored.status, stored.codes) == ("delivered", done.codes)
    assert (await shop.balance("acme")).held == 0
    # a script reading it (cmsgpack) sees the last values too: after-sales needs it delivered
    ticket = await shop.open_ticket("acme", r.order_id, done.codes[0].code, "used")
    assert ticket.status == "open"
    assert await shop.audit() == []


async def test_leases_expire_exactly_once(shop: Engine) -> None:
    await stock_up(shop, 4)
    r = await shop.purchase("acme", "g100", 2, "lease", mode="reserve", reserve_ttl_s=1)
    late = await shop.purchase("acme", "g100", 2, "late", mode="reserve", reserve_ttl_s=1)
    await asyncio.sleep(1.1)
    with pytest.raises(errors.ReservationExpiredError):  # the deadline wins over a late confirm
        await shop.confirm("acme", late.order_id)
    results = await asyncio.gather(*(shop.sweep() for _ in range(5)))
    assert sum(expired for expired, _ in results) == 1
    assert (await shop.get_order("acme", r.order_id)).status == "expired"
    b = await shop.balance("acme")
    assert (b.balance, b.held) == (1_000_000, 0)
    stock = await shop.stock("g100")
    assert (stock.available, stock.reserved) == (4, 0)
    assert [e.kind for e in await shop.ledger("acme")].count("expire") == 2
    assert await shop.audit() == []


async def test_background_sweep_expires(shop: Engine, flushed_redis_url: str) -> None:
    await stock_up(shop, 1)
    async with Engine(shop.config):  # another engine on the same store, sweeping in the background
        r = await shop.purchase("acme", "g100", 1, "bg", mode="reserve", reserve_ttl_s=1)
        for _ in range(50):
            await asyncio.sleep(0.1)
            if (await shop.get_order("acme", r.order_id)).status == "expired":
                break
    assert (await shop.get_order("acme", r.order_id)).status == "expired"
    assert (await shop.stock("g100")).available == 1


# ---- imports -----------------------------------------------------------------------------

async def test_import_dedupes_across_batches_and_skus(shop: Engine) -> None:
    await shop.create_sku("g50", "Game card 50", 5000, "CNY", 4800)
    r1 = await shop.import_codes(b"A1\nA2\nA2\nA3\n", sku="g100", supplier="sup", unit_cost=1, batch_id="b1")
    assert (r1.accepted, r1.duplicate) == (3, 1)
    r2 = await shop.import_codes(b"A3\nA4\n", sku="g50", supplier="sup", unit_cost=1, batch_id="b2")
    assert (r2.accepted, r2.duplicate) == (1, 1)
    r3 = await shop.import_codes("code,pin\nA5,1234\nA1,9\n".encode(), sku="g50", supplier="sup", unit_cost=1)
    assert (r3.accepted, r3.duplicate) == (1, 1) and r3.batch_id
    assert ((await shop.stock("g100")).available, (await shop.stock("g50")).available) == (3, 2)
    order = await shop.purchase("beta", "g50", 2, "x")
    assert [(c.code, c.pin) for c in order.codes] == [("A4", None), ("A5", "1234")]


async def test_import_resend_adds_nothing(shop: Engine) -> None:
    body = codes_text("R", 2500) + b"bad\x07\n"
    shop.config = msgspec.structs.replace(shop.config, import_chunk=1000)  # several chunks
    first = await shop.import_codes(body, sku="g100", supplier="sup", unit_cost=5, batch_id="big")
    again = await shop.import_codes(body, sku="g100", supplier="sup", unit_cost=5, batch_id="big")
    assert (first.accepted, first.malformed) == (again.accepted, again.malformed) == (2500, 1)
    assert first.malformed_lines[0].line == 2501
    assert (await shop.stock("g100")).accepted == 2500
    with pytest.raises(errors.ConflictError, match="other content"):
        await shop.import_codes(codes_text("Q", 10), sku="g100", supplier="sup", unit_cost=5, batch_id="big")
    with pytest.raises(errors.ConflictError, match="exists for SKU"):
        await shop.import_codes(body, sku="g100", supplier="sup", unit_cost=6, batch_id="big")
    with pytest.raises(errors.NotFoundError):
        await shop.import_codes(body, sku="g100", supplier="nobody", unit_cost=5)
    with pytest.raises(errors.UnknownSkuError):
        await shop.import_codes(body, sku="nope", supplier="sup", unit_cost=5)


async def test_void_batch(shop: Engine) -> None:
    await stock_up(shop, 5, batch="old", prefix="OLD")
    await stock_up(shop, 5, batch="new", prefix="NEW")
    held = await shop.purchase("acme", "g100", 2, "hold", mode="reserve")
    sold = await shop.purchase("acme", "g100", 1, "sold")
    assert await shop.void_batch("old") == 2  # 5 - 2 reserved - 1 sold
    assert await shop.void_batch("old") == 0
    await shop.cancel("acme", held.order_id)  # its codes are of a voided batch: voided, not back on sale
    stock = await shop.stock("g100")
    assert (stock.available, stock.voided, stock.sold) == (5, 4, 1)
    rest = await shop.purchase("beta", "g100", 5, "rest")
    assert all(c.code.startswith("NEW") for c in rest.codes)
    assert sold.codes[0].code.startswith("OLD")
    with pytest.raises(errors.ConflictError, match="voided"):
        await shop.import_codes(b"X\n", sku="g100", supplier="sup", unit_cost=9000, batch_id="old")
    assert await shop.audit() == []


# ---- secrecy and robustness --------------------------------------------------------------

async def test_no_plaintext_code_in_redis(shop: Engine, flushed_redis_url: str) -> None:
    await shop.import_codes("code,pin,serial\nSECRETCODE-0001,PIN4242,SER9\nSECRETCODE-0002,,\n".encode(),
                            sku="g100", supplier="sup", unit_cost=1)
    await stock_up(shop, 50, prefix="TOPSECRET")
    order = await shop.purchase("acme", "g100", 3, "s1")
    await shop.purchase("acme", "g100", 2, "s2", mode="reserve")
    blob = dump(flushed_redis_url)
    assert len(blob) > 1000
    assert order.codes[0].code == "SECRETCODE-0001" and order.codes[0].pin == "PIN4242"
    for needle in (b"SECRETCODE", b"PIN4242", b"SER9", b"TOPSECRET"):
        assert needle not in blob


async def test_tampered_ciphertext_is_refused(shop: Engine) -> None:
    await stock_up(shop, 2)
    k = keys.SkuKeys("g100")
    seq = next(iter(await shop.store.inventory.pools("g100")))
    c = await shop.store.client.lindex(k.pool(seq), 0)
    await shop.store.client.lset(k.pool(seq), 0, c[:-1] + bytes([c[-1] ^ 1]))
    with pytest.raises(errors.DispatchError, match="authentication"):
        await shop.purchase("acme", "g100", 1, "t")


async def test_scripts_survive_script_flush(shop: Engine) -> None:
    await stock_up(shop, 3)
    await shop.purchase("acme", "g100", 1, "before")
    await shop.store.client.script_flush()
    assert len((await shop.purchase("acme", "g100", 1, "after")).codes) == 1


async def test_store_unavailable_is_a_clear_retryable_error(tmp_path) -> None:
    from dispatch.server.responses import lookup

    from .conftest import _free_port, make_config
    engine = Engine(make_config(tmp_path, redis_url=f"redis://127.0.0.1:{_free_port()}/0",
                                redis_timeout_s=0.5), sweep=False)
    with pytest.raises(errors.StoreUnavailableError) as e:
        await engine.start()
    assert e.value.retryable and lookup(e.value)[0] == 503


async def test_one_order_twice_in_one_take_call(shop: Engine) -> None:
    """A sweep racing the request can put one order twice into one coalesced call:
    both get the same codes, and only one set leaves the pool."""
    await stock_up(shop, 5)
    replies = await shop.store.orders.step("take", "g100", [("o1", 2, 0, 0), ("o2", 1, 0, 0), ("o1", 2, 0, 0)])
    assert replies[0] == replies[2] and len(replies[0].codes) == 2 and replies[0].ok
    assert set(replies[0].codes).isdisjoint(replies[1].codes)
    again = await shop.store.orders.step("take", "g100", [("o1", 2, 0, 0)])
    assert again[0] == replies[0]
    stock = await shop.stock("g100")
    assert (stock.available, stock.reserved) == (2, 3)


async def test_no_key_for_a_distributor_that_does_not_exist(shop: Engine) -> None:
    with pytest.raises(errors.NotFoundError):
        await shop.rotate_api_key("ghost")


def counted(shop: Engine, step: str) -> list[int]:
    """A counter of the items submitted to *step*'s coalescer from now on."""
    n, real = [0], getattr(shop._sagas, step)

    class Counted:
        def submit(self, shard, item):  # type: ignore[no-untyped-def]
            n[0] += 1
            return real.submit(shard, item)

    setattr(shop._sagas, step, Counted())
    return n


async def until(done: Callable[[], bool]) -> None:
    for i in range(100_000):
        if done():
            return
        await asyncio.sleep(0.001 if i > 1000 else 0)
    raise AssertionError("never came true")


async def test_close_lets_orders_in_flight_finish(shop: Engine, flushed_redis_url: str) -> None:
    """Orders whose callers went away are finished by close(), not left pending."""
    import redis.asyncio as aioredis

    await stock_up(shop, 50)
    submitted = counted(shop, "deliver")
    calls = [asyncio.create_task(shop.purchase("acme", "g100", 1, f"gone-{i}")) for i in range(40)]
    await until(lambda: submitted[0] == 40)  # every order is on its way to the store ...
    for c in calls:
        c.cancel()                # ... and every caller goes away
    await shop.close()
    async with aioredis.from_url(flushed_redis_url) as r:  # what close() left behind
        assert await r.zcard(keys.AcctKeys("acme").pending) == 0
        assert await r.hlen(keys.AcctKeys("acme").codes) == 40 + 1  # and the pin (keys.PIN)
    await shop.start()
    assert await shop.audit() == []
    assert (await shop.stock("g100")).sold == 40


async def test_reservations_ended_by_callers_that_went_away_are_ended_whole(shop: Engine,
                                                                         flushed_redis_url: str) -> None:
    """On one node a confirm or cancel is one script and no task of its own: a caller
    that goes away once its ending is on its way leaves nothing half done."""
    import redis.asyncio as aioredis

    await stock_up(shop, 50)
    held = [await shop.purchase("acme", "g100", 1, f"held-{i}", mode="reserve") for i in range(40)]
    submitted = counted(shop, "settle")
    calls = [asyncio.create_task(shop.confirm("acme", o.order_id) if i % 2 else shop.cancel("acme", o.order_id))
             for i, o in enumerate(held)]
    await until(lambda: submitted[0] == 40)
    for c in calls:
        c.cancel()
    await shop.close()
    async with aioredis.from_url(flushed_redis_url) as r:
        assert await r.zcard(keys.AcctKeys("acme").pending) == 0
        assert await r.zcard(keys.AcctKeys("acme").leases) == 0
    await shop.start()
    assert [(await shop.get_order("acme", o.order_id)).status for o in held] == ["cancelled", "delivered"] * 20
    stock = await shop.stock("g100")
    assert (stock.sold, stock.reserved, stock.available) == (20, 0, 30)
    assert await shop.audit() == []


async def test_large_amounts_stay_exact(shop: Engine) -> None:
    """Money crosses Lua as doubles: amounts up to 10^15 must stay exact integers."""
    await shop.create_sku("gold-bar", "Gold", 10**12, "CNY", 10**12 - 1)
    await shop.import_codes(b"BAR-1\nBAR-2\n", sku="gold-bar", supplier="sup", unit_cost=1)
    await shop.topup("beta", 10**15 - 7, "whale")
    order = await shop.purchase("beta", "gold-bar", 2, "bars")
    assert order.total == 2 * (10**12 - 1)
    b = await shop.balance("beta")
    assert b.balance == 1_000_000 + 10**15 - 7 - 2 * (10**12 - 1)
    ledger = await shop.ledger("beta")
    assert ledger[-1].balance == b.balance and sum(e.amount for e in ledger) == b.balance
    assert await shop.audit() == []
