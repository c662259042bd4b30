"""After-sales against a real redis-server: tickets, supplier deposits and blacklists,
sale order, events, exports that reconcile, restock forecasts."""

from __future__ import annotations

import asyncio
import csv
import io
from collections import Counter
from datetime import datetime, timedelta, timezone

import msgspec
import pytest
import redis

from dispatch import errors
from dispatch.engine import Engine
from dispatch.exports import Exports
from dispatch.models import Order, Ticket
from dispatch.records import decode_events
from dispatch.store import keys

from .conftest import codes_text, make_config


async def stock_up(engine: Engine, n: int, *, sku: str = "g100", supplier: str = "sup", prefix: str = "CODE",
                   batch: str = "b1", unit_cost: int = 9000) -> None:
    report = await engine.import_codes(codes_text(prefix, n), sku=sku, supplier=supplier, unit_cost=unit_cost,
                                       batch_id=batch)
    assert report.accepted == n


async def open_shop(engine: Engine, supplier: str, deposit: int = 0) -> None:
    """A SKU g100, the supplier, and a distributor acme with money."""
    await engine.create_sku("g100", "Game card", 10000, "CNY", 9500)
    await engine.create_supplier(supplier, supplier.title(), deposit=deposit)
    await engine.create_distributor("acme", "Acme")
    await engine.topup("acme", 10_000_000, "seed")


async def events(engine: Engine, kind: str, id_: str) -> list[dict[str, object]]:
    page = await engine.events(f"{kind}:{id_}", limit=10_000)
    return [{"type": e.type, "entity": e.entity, "v": e.version, "data": e.data} for e in page.events]


async def export(gen) -> list[dict[str, str]]:
    text = b"".join([block async for block in gen]).decode()
    return list(csv.DictReader(io.StringIO(text)))


# ---- tickets ---------------------------------------------------------------------------------

async def test_ticket_refund_charges_the_supplier_and_refunds_the_buyer(shop: Engine) -> None:
    await shop.deposit("sup", 50_000, "wire-1")
    await stock_up(shop, 10)
    order = await shop.purchase("acme", "g100", 2, "o1")
    before = (await shop.balance("acme")).balance
    t = await shop.open_ticket("acme", order.order_id, order.codes[1].code, "code says already used")
    assert (t.status, t.code_index, t.order_id) == ("open", 1, order.order_id)
    assert (await shop.get_ticket(t.ticket_id, "acme")).status == "open"
    with pytest.raises(errors.NotFoundError):  # another distributor's ticket does not exist for it
        await shop.get_ticket(t.ticket_id, "beta")
    with pytest.raises(errors.AlreadyClaimedError):
        await shop.open_ticket("acme", order.order_id, order.codes[1].code, "again")

    done = await shop.resolve_ticket(t.ticket_id, "approve", note="supplier confirmed")
    assert (done.status, done.outcome, done.refund, done.note) == ("approved", "refund", 9025, "supplier confirmed")
    again = await shop.resolve_ticket(t.ticket_id, "approve")  # idempotent
    assert (again.status, again.refund) == ("approved", 9025)
    with pytest.raises(errors.ConflictError):
        await shop.resolve_ticket(t.ticket_id, "reject")

    assert (await shop.balance("acme")).balance == before + 9025
    refunded = await shop.get_order("acme", order.order_id)
    assert (refunded.status, refunded.refunded, len(refunded.codes)) == ("partially_refunded", 9025, 2)
    assert [e.kind for e in await shop.ledger("acme")][-1] == "refund"
    sup = await shop.get_supplier("sup")
    assert sup.deposit == 50_000 - 9000
    assert [(e.kind, e.amount) for e in await shop.supplier_ledger("sup")] == [("deposit", 50_000), ("charge", -9000)]
    stock = await shop.stock("g100")
    assert (stock.sold, stock.invalidated, stock.available) == (1, 1, 8)

    # the second code too: the order is refunded in full, and never more than was paid
    t2 = await shop.open_ticket("acme", order.order_id, order.codes[0].code, "also bad")
    await shop.resolve_ticket(t2.ticket_id, "approve")
    final = await shop.get_order("acme", order.order_id)
    assert (final.status, final.refunded) == ("refunded", final.total)
    report = await shop.supplier_report("sup")
    assert (report.delivered, report.invalidated, report.invalid_rate) == (2, 2, 1.0)
    assert report.batches[0].invalidated == 2 and report.deposit == 50_000 - 18_000
    assert await shop.audit() == []


async def test_ticket_rejected_changes_no_money(shop: Engine) -> None:
    await stock_up(shop, 3)
    order = await shop.purchase("beta", "g100", 1, "o1")
    t = await shop.open_ticket("beta", order.order_id, order.codes[0].code, "not working")
    before = await shop.balance("beta")
    r = await shop.resolve_ticket(t.ticket_id, "reject", note="code was redeemed by you")
    assert (r.status, r.refund, r.outcome) == ("rejected", 0, None)
    assert await shop.balance("beta") == before
    with pytest.raises(errors.AlreadyClaimedError):  # a code is claimed once
        await shop.open_ticket("beta", order.order_id, order.codes[0].code, "please")
    assert (await shop.stock("g100")).invalidated == 0
    assert [t.status for t in await shop.list_tickets("beta")] == ["rejected"]
    assert await shop.list_tickets("acme") == []


async def test_ticket_replacement_delivers_another_code(shop: Engine) -> None:
    await shop.update_sku("g100", after_sales="replace")
    await stock_up(shop, 3)
    order = await shop.purchase("acme", "g100", 1, "o1")
    before = await shop.balance("acme")
    t = await shop.open_ticket("acme", order.order_id, order.codes[0].code, "invalid")
    done = await shop.resolve_ticket(t.ticket_id, "approve")
    assert (done.outcome, done.refund) == ("replaced", 0)
    assert done.replacement is not None and done.replacement.code != order.codes[0].code
    assert (await shop.get_ticket(t.ticket_id, "acme")).replacement == done.replacement
    assert await shop.balance("acme") == before
    assert (await shop.get_order("acme", order.order_id)).status == "delivered"
    stock = await shop.stock("g100")
    assert (stock.available, stock.sold, stock.invalidated) == (1, 1, 1)  # the replacement is sold
    assert await shop.audit() == []

    # out of stock: an approval asking for a replacement refunds instead
    last = await shop.purchase("acme", "g100", 1, "o2")
    t2 = await shop.open_ticket("acme", last.order_id, last.codes[0].code, "invalid")
    done2 = await shop.resolve_ticket(t2.ticket_id, "approve", replace=True)
    assert (done2.outcome, done2.refund, done2.replacement) == ("refund", 9025, None)
    assert await shop.audit() == []


async def test_ticket_refusals(shop: Engine) -> None:
    await stock_up(shop, 5)
    order = await shop.purchase("acme", "g100", 1, "o1")
    with pytest.raises(errors.ValidationError, match="not one of"):
        await shop.open_ticket("acme", order.order_id, "NOT-A-CODE-OF-IT", "bad")
    with pytest.raises(errors.ValidationError, match="reason"):
        await shop.open_ticket("acme", order.order_id, order.codes[0].code, "   ")
    with pytest.raises(errors.NotFoundError):
        await shop.open_ticket("beta", order.order_id, order.codes[0].code, "not mine")
    reserved = await shop.purchase("acme", "g100", 1, "r1", mode="reserve")
    with pytest.raises(errors.ConflictError, match="reserved"):
        await shop.open_ticket("acme", reserved.order_id, "WHATEVER", "bad")
    with pytest.raises(errors.NotFoundError):
        await shop.resolve_ticket("tk_nope", "approve")
    t = await shop.open_ticket("acme", order.order_id, order.codes[0].code, "bad")
    with pytest.raises(errors.ValidationError, match="decision"):
        await shop.resolve_ticket(t.ticket_id, "maybe")  # type: ignore[arg-type]

    async with Engine(msgspec.structs.replace(shop.config, ticket_window_s=1), sweep=False) as e:
        late = await e.purchase("beta", "g100", 1, "late")
        await asyncio.sleep(1.1)
        with pytest.raises(errors.TicketWindowClosedError):
            await e.open_ticket("beta", late.order_id, late.codes[0].code, "too late")


async def test_concurrent_tickets_on_one_code_exactly_one_wins(shop: Engine) -> None:
    await shop.deposit("sup", 100_000, "d1")
    await stock_up(shop, 10)
    order = await shop.purchase("acme", "g100", 1, "o1")
    code = order.codes[0].code
    async with Engine(shop.config, sweep=False) as other:
        engines = [shop, other] * 15
        results = await asyncio.gather(*(e.open_ticket("acme", order.order_id, code, f"claim {i}")
                                         for i, e in enumerate(engines)), return_exceptions=True)
        won = [r for r in results if not isinstance(r, BaseException)]
        assert len(won) == 1
        assert all(isinstance(r, errors.AlreadyClaimedError) for r in results if isinstance(r, BaseException))
        ticket = won[0].ticket_id

        # and racing decisions on that ticket: one decision, one refund, one charge
        racers = [e.resolve_ticket(ticket, "approve") for e in engines[:20]]
        racers += [e.resolve_ticket(ticket, "reject") for e in engines[:6]]
        decided = await asyncio.gather(*racers, return_exceptions=True)
    unexpected = [r for r in decided if isinstance(r, BaseException) and not isinstance(r, errors.ConflictError)]
    assert unexpected == []
    final = await shop.get_ticket(ticket)
    oks = [r for r in decided if not isinstance(r, BaseException)]
    assert {r.status for r in oks} == {final.status}
    kinds = Counter(e.kind for e in await shop.ledger("acme"))
    charges = [e for e in await shop.supplier_ledger("sup") if e.kind == "charge"]
    if final.status == "approved":
        assert (kinds["refund"], len(charges)) == (1, 1)
    else:
        assert (kinds["refund"], len(charges)) == (0, 0)
    assert await shop.audit() == []


async def test_interrupted_approval_is_finished_by_the_sweep(shop: Engine) -> None:
    await stock_up(shop, 3)
    order = await shop.purchase("acme", "g100", 1, "o1")
    t = await shop.open_ticket("acme", order.order_id, order.codes[0].code, "bad")
    # a crash right after the decision: only step 1 of the approval ran
    decided = await shop.store.aftersales.decide_ticket("acme", t.ticket_id, "approve", False, "")
    assert decided.result == "ok"
    assert (await shop.get_ticket(t.ticket_id)).status == "approving"
    await shop.sweep(grace_s=0)
    done = await shop.get_ticket(t.ticket_id)
    assert (done.status, done.outcome, done.refund) == ("approved", "refund", 9025)
    assert (await shop.stock("g100")).invalidated == 1
    await shop.sweep(grace_s=0)  # nothing left to do, nothing done twice
    assert Counter(e.kind for e in await shop.ledger("acme"))["refund"] == 1
    assert await shop.audit() == []


# ---- suppliers -------------------------------------------------------------------------------

async def test_supplier_deposits_are_idempotent(shop: Engine) -> None:
    s = await shop.create_supplier("s2", "Second", deposit=1000)
    assert s.deposit == 1000
    assert (await shop.deposit("s2", 500, "wire-9")).deposit == 1500
    assert (await shop.deposit("s2", 500, "wire-9")).deposit == 1500
    with pytest.raises(errors.IdempotencyConflictError):
        await shop.deposit("s2", 700, "wire-9")
    with pytest.raises(errors.NotFoundError):
        await shop.deposit("nobody", 5, "x")
    with pytest.raises(errors.ValidationError):
        await shop.deposit("s2", -5, "neg")
    with pytest.raises(errors.ConflictError):
        await shop.create_supplier("s2", "again")
    assert [x.supplier for x in await shop.list_suppliers()] == ["s2", "sup"]


@pytest.mark.parametrize("action", ["park", "void"])
async def test_auto_blacklist_takes_the_suppliers_codes_off_sale(action: str, tmp_path, flushed_redis_url: str) -> None:
    cfg = make_config(tmp_path, redis_url=flushed_redis_url, blacklist_min_delivered=5, blacklist_invalid_rate=0.1,
                      blacklist_action=action)
    async with Engine(cfg, sweep=False) as e:
        await open_shop(e, "bad", deposit=100_000)
        await stock_up(e, 20, supplier="bad")
        orders = [await e.purchase("acme", "g100", 1, f"o{i}") for i in range(10)]
        t1 = await e.open_ticket("acme", orders[0].order_id, orders[0].codes[0].code, "bad")
        await e.resolve_ticket(t1.ticket_id, "approve")
        assert (await e.get_supplier("bad")).status == "active"  # 1 of 10: at the limit, not over it
        t2 = await e.open_ticket("acme", orders[1].order_id, orders[1].codes[0].code, "bad")
        await e.resolve_ticket(t2.ticket_id, "approve")
        report = await e.supplier_report("bad")
        assert report.status == "blacklisted" and report.blacklist_reason.startswith("auto: 2 of 10")
        stock = await e.stock("g100")
        assert stock.available == 0
        assert (stock.parked, stock.voided) == ((10, 0) if action == "park" else (0, 10))
        with pytest.raises(errors.OutOfStockError):
            await e.purchase("acme", "g100", 1, "after")
        with pytest.raises(errors.SupplierBlacklistedError):
            await e.import_codes(codes_text("MORE", 3), sku="g100", supplier="bad", unit_cost=1)
        told = [ev for ev in await events(e, "supplier", "bad") if ev["type"] == "supplier.blacklisted"]
        assert len(told) == 1 and told[0]["data"]["invalid_rate_bps"] == 2000

        await e.update_supplier("bad", status="active")
        assert (await e.stock("g100")).available == (10 if action == "park" else 0)
        assert [ev["type"] for ev in await events(e, "supplier", "bad")] == ["supplier.blacklisted",
                                                                             "supplier.reinstated"]
        assert await e.audit() == []


async def test_manual_blacklist_parks_reserved_codes_when_they_come_back(shop: Engine) -> None:
    await stock_up(shop, 4)
    held = await shop.purchase("acme", "g100", 2, "r1", mode="reserve")
    await shop.update_supplier("sup", status="blacklisted", reason="fraud report")
    assert (await shop.supplier_report("sup")).blacklist_reason == "fraud report"
    await shop.cancel("acme", held.order_id)
    stock = await shop.stock("g100")
    assert (stock.available, stock.parked, stock.reserved) == (0, 4, 0)
    assert await shop.audit() == []


async def test_best_rated_supplier_sells_first(shop: Engine) -> None:
    await shop.update_distributor("acme", credit_limit=0)
    await shop.create_supplier("good", "Good")
    await stock_up(shop, 10, supplier="sup", prefix="SUP", batch="old")
    await stock_up(shop, 10, supplier="good", prefix="GOOD", batch="new")
    first = await shop.purchase("acme", "g100", 2, "o1")
    assert all(c.code.startswith("SUP") for c in first.codes)  # oldest first by default
    t = await shop.open_ticket("acme", first.order_id, first.codes[0].code, "bad")
    await shop.resolve_ticket(t.ticket_id, "approve")
    assert (await shop.supplier_report("sup")).rating < (await shop.supplier_report("good")).rating == 100.0
    assert (await shop.purchase("acme", "g100", 1, "o2")).codes[0].code.startswith("SUP")
    await shop.update_sku("g100", sale_order="best_rated")
    assert (await shop.purchase("acme", "g100", 3, "o3")).codes[0].code.startswith("GOOD")
    await shop.update_sku("g100", sale_order="oldest_first")
    assert (await shop.purchase("acme", "g100", 1, "o4")).codes[0].code.startswith("SUP")
    assert await shop.audit() == []


# ---- events ----------------------------------------------------------------------------------

async def test_stock_alerts_have_hysteresis(shop: Engine) -> None:
    await stock_up(shop, 6)  # threshold 3
    assert [e["type"] for e in await events(shop, "sku", "g100")] == ["stock.restored"]
    await shop.purchase("acme", "g100", 2, "a")      # 4 left
    r = await shop.purchase("acme", "g100", 1, "b", mode="reserve")  # 3: low
    await shop.cancel("acme", r.order_id)             # 4: inside the band, still low
    r = await shop.purchase("acme", "g100", 1, "c", mode="reserve")  # 3 again: no new alert
    await shop.cancel("acme", r.order_id)
    for i in range(4):
        await shop.purchase("acme", "g100", 1, f"d{i}")  # down to 0: out
    await stock_up(shop, 10, prefix="MORE", batch="b2")  # 10 > 3 + 1: restored
    told = await events(shop, "sku", "g100")
    assert [e["type"] for e in told] == ["stock.restored", "stock.low", "stock.out", "stock.restored"]
    assert [e["v"] for e in told] == [1, 2, 3, 4]
    assert told[1]["data"] == {"sku": "g100", "level": "low", "was": "in", "available": 3, "threshold": 3}


async def a_bit_of_everything(shop: Engine) -> tuple[Order, Order, Order, Ticket]:
    """On acme: a delivered order (2 codes), a reservation confirmed, one cancelled, and
    an approved ticket on the delivered order's first code."""
    await stock_up(shop, 10)
    d = await shop.purchase("acme", "g100", 2, "d1")
    r = await shop.purchase("acme", "g100", 1, "r1", mode="reserve")
    await shop.confirm("acme", r.order_id)
    c = await shop.purchase("acme", "g100", 1, "c1", mode="reserve")
    await shop.cancel("acme", c.order_id)
    t = await shop.open_ticket("acme", d.order_id, d.codes[0].code, "bad")
    await shop.resolve_ticket(t.ticket_id, "approve")
    return d, r, c, t


async def test_order_and_ticket_events_carry_versions_and_no_codes(shop: Engine, flushed_redis_url: str) -> None:
    d, r, c, t = await a_bit_of_everything(shop)
    told = await events(shop, "dist", "acme")
    assert [(e["type"], e["entity"]) for e in told] == [
        ("order.delivered", f"order:{d.order_id}"), ("order.delivered", f"order:{r.order_id}"),
        ("order.cancelled", f"order:{c.order_id}"), ("ticket.opened", f"ticket:{t.ticket_id}"),
        ("order.refunded", f"order:{d.order_id}"), ("ticket.approved", f"ticket:{t.ticket_id}")]
    by_entity: dict[str, list[int]] = {}
    for e in told:
        by_entity.setdefault(e["entity"], []).append(e["v"])
    assert all(v == sorted(set(v)) for v in by_entity.values())  # versions only grow
    assert told[0]["data"] == {"order_id": d.order_id, "external_ref": "d1", "sku": "g100", "qty": 2,
                               "delivered": 2, "unit_price": 9025, "total": 2 * 9025, "refunded": 0,
                               "status": "delivered"}
    assert (told[4]["data"]["refunded"], told[4]["data"]["status"]) == (9025, "partially_refunded")
    with redis.Redis.from_url(flushed_redis_url) as client:
        raw = b"".join(v for kind, id_ in (("dist", "acme"), ("sku", "g100"), ("supplier", "sup"))
                       for _, f in client.xrange(keys.events_key(kind, id_)) for v in f.values())
    for code in [*d.codes, *(await shop.get_order("acme", r.order_id)).codes]:
        assert code.code.encode() not in raw


async def test_a_round_of_deliveries_is_one_entry_read_as_one_event_per_order(shop: Engine) -> None:
    await stock_up(shop, 40)
    orders = await asyncio.gather(*(shop.purchase("acme", "g100", 1, f"x{i}") for i in range(30)))
    pages, after = [], None
    while True:
        page = await shop.events("dist:acme", after, 7)
        pages.append(page.events)
        if page.next_after is None:
            break
        after = page.next_after
    told = [e for p in pages for e in p]
    assert all(len(p) == 7 for p in pages[:-1])
    assert sorted(e.entity for e in told) == sorted(f"order:{o.order_id}" for o in orders)
    assert len({e.event_id for e in told}) == 30
    subs: dict[str, list[int]] = {}
    for e in told:
        entry, _, k = e.event_id.partition(".")
        subs.setdefault(entry, []).append(int(k))
    assert len(subs) < 30  # rounds of several orders: one entry each, told event by event
    assert all(ks == list(range(len(ks))) for ks in subs.values())
    with pytest.raises(ValueError):
        decode_events("1-1", {b"type": b"order.delivered", b"at": b"1", b"records": b"\x91\xc1"})


async def test_lease_expiry_is_an_event(shop: Engine) -> None:
    await stock_up(shop, 2)
    r = await shop.purchase("beta", "g100", 1, "r1", mode="reserve", reserve_ttl_s=1)
    await asyncio.sleep(1.05)
    assert await shop.sweep() == (1, 0)
    await shop.sweep()
    told = [e for e in await events(shop, "dist", "beta") if e["type"] == "order.expired"]
    assert len(told) == 1 and told[0]["entity"] == f"order:{r.order_id}"


# ---- exports and reconciliation ----------------------------------------------------------------

def month_of(t: datetime) -> str:
    return f"{t.year:04d}-{t.month:02d}"


async def test_a_statement_sums_the_months_ledger_by_kind_and_reconciles(shop: Engine, flushed_redis_url: str) -> None:
    await a_bit_of_everything(shop)
    await shop.topup("acme", 5_000, "more")

    now = datetime.now(timezone.utc)
    s = await shop.statement("acme", month_of(now))
    ledger = await shop.ledger("acme")
    balance = await shop.balance("acme")
    assert (s.opening_balance, s.opening_held) == (0, 0)  # every entry of the shop was made this month
    assert (s.closing_balance, s.closing_held) == (balance.balance, balance.held)
    assert s.reconciled
    by_kind: dict[str, list[int]] = {}
    for e in ledger:
        k = by_kind.setdefault(e.kind, [0, 0, 0])
        k[0], k[1], k[2] = k[0] + 1, k[1] + e.amount, k[2] + e.held_delta
    assert {x.kind: [x.count, x.amount, x.held_delta] for x in s.lines} == by_kind
    assert {"topup", "purchase", "hold", "release", "refund"} <= by_kind.keys()
    assert sum(x.amount for x in s.lines) == balance.balance

    before = await shop.statement("acme", month_of(now.replace(day=1) - timedelta(days=1)))
    assert (before.opening_balance, before.closing_balance, before.lines, before.reconciled) == (0, 0, [], True)
    after = await shop.statement("acme", month_of(now.replace(day=28) + timedelta(days=7)))
    assert (after.opening_balance, after.opening_held, after.lines) == (balance.balance, balance.held, [])
    assert (after.closing_balance, after.closing_held) == (balance.balance, balance.held)

    rows = list(csv.reader(io.StringIO(Exports.statement_csv(s).decode())))
    assert rows[0] == list(Exports.STATEMENT_COLUMNS)
    assert rows[1][2:] == ["opening", "", "", "", "0", "0"] and rows[-1][2] == "closing"
    assert sum(int(row[4]) for row in rows[2:-1]) == int(rows[-1][6]) == balance.balance

    for bad in ("2026-13", "26-01", "2026-1", "1969-12", "", "2026-01-01"):
        with pytest.raises(errors.ValidationError, match="month must be YYYY-MM"):
            await shop.statement("acme", bad)
    with pytest.raises(errors.NotFoundError):
        await shop.statement("nobody", month_of(now))

    # a ledger off its own sums is told, not hidden: an entry's amount changed under the engine
    with redis.Redis.from_url(flushed_redis_url) as client:
        k = keys.AcctKeys("acme").ledger
        fields = client.lindex(k, 0).decode().split("\x1f")
        fields[2] = str(int(fields[2]) + 1)
        client.lset(k, 0, "\x1f".join(fields))
    assert not (await shop.statement("acme", month_of(now))).reconciled


async def test_a_calls_entries_carry_running_figures_only_on_its_last(shop: Engine, flushed_redis_url: str) -> None:
    await stock_up(shop, 40)
    await asyncio.gather(*(shop.purchase("acme", "g100", 1, f"o{i}") for i in range(16)),
                         *(shop.purchase("acme", "g100", 1, f"r{i}", mode="reserve") for i in range(8)))
    with redis.Redis.from_url(flushed_redis_url) as client:
        stored = [e.decode().split("\x1f") for e in client.lrange(keys.AcctKeys("acme").ledger, 0, -1)]
    assert {len(e) for e in stored} == {5, 7}  # the orders came in calls of several
    assert stored[-1][0] in ("purchase", "hold") and len(stored[-1]) == 7
    ledger = await shop.ledger("acme")
    balance = held = 0
    for e, row in zip(ledger, stored, strict=True):
        balance, held = balance + e.amount, held + e.held_delta
        assert (e.balance, e.held) == (balance, held)
        if len(row) == 7:
            assert (int(row[4]), int(row[5])) == (balance, held)
    now = await shop.balance("acme")
    assert (ledger[-1].balance, ledger[-1].held) == (now.balance, now.held)
    exported = [r for r in await export(shop.export_ledger(page=5)) if r["party"] == "acme"]  # pages carry the sums
    assert [(int(r["balance"]), int(r["held"])) for r in exported] == [(e.balance, e.held) for e in ledger]
    s = await shop.statement("acme", month_of(datetime.now(timezone.utc)))
    assert s.reconciled and (s.closing_balance, s.closing_held) == (now.balance, now.held)

    # a ledger written before, every entry with its running figures, reads the same
    with redis.Redis.from_url(flushed_redis_url) as client:
        k = keys.AcctKeys("acme").ledger
        client.delete(k)
        client.rpush(k, *["\x1f".join(map(str, (e.kind, e.ref, e.amount, e.held_delta, e.balance, e.held, row[-1])))
                          for e, row in zip(ledger, stored)])
    assert await shop.ledger("acme") == ledger
    assert (await shop.statement("acme", month_of(datetime.now(timezone.utc)))).reconciled
    assert await shop.audit() == []


async def test_exports_reconcile_with_ledgers_and_balances(shop: Engine) -> None:
    await shop.deposit("sup", 1_000_000, "d1")
    await stock_up(shop, 60)
    await shop.update_distributor("beta", credit_limit=50_000)
    orders = []
    for i in range(12):
        dist = ("acme", "beta")[i % 2]
        orders.append((dist, await shop.purchase(dist, "g100", 1 + i % 3, f"o{i}")))
    for i in range(6):
        dist = ("acme", "beta")[i % 2]
        r = await shop.purchase(dist, "g100", 2, f"r{i}", mode="reserve")
        await (shop.confirm if i % 3 else shop.cancel)(dist, r.order_id)
    for dist, o in orders[:5]:
        t = await shop.open_ticket(dist, o.order_id, o.codes[0].code, "bad")
        await shop.resolve_ticket(t.ticket_id, "approve" if o.qty > 1 else "reject")
    await shop.topup("beta", 12_345, "late-topup")

    ledger = await export(shop.export_ledger())
    sums: Counter[tuple[str, str]] = Counter()
    for row in ledger:
        sums[(row["party_type"], row["party"])] += int(row["amount"])
    for dist in ("acme", "beta"):
        assert sums[("distributor", dist)] == (await shop.balance(dist)).balance
        assert sums[("distributor", dist)] == sum(e.amount for e in await shop.ledger(dist))
    assert sums[("supplier", "sup")] == (await shop.get_supplier("sup")).deposit

    rows = await export(shop.export_orders())
    for dist in ("acme", "beta"):
        spent = sum(int(r["total"]) - int(r["refunded"]) for r in rows
                    if r["distributor"] == dist and r["status"] in ("delivered", "partially_refunded", "refunded"))
        moved = sum(int(r["amount"]) for r in ledger
                    if r["party"] == dist and r["kind"] in ("purchase", "refund"))
        assert spent == -moved
    codes = [c.code for _, o in orders for c in o.codes]
    text = "\n".join(r["codes"] for r in rows)
    assert not any(code in text for code in codes)  # masked: ************0001
    assert any(r["codes"].startswith("*" * 12) for r in rows)
    plain = await export(shop.export_orders(show_codes=True))
    assert {c for r in plain for c in r["codes"].split()} >= set(codes)
    assert await shop.audit() == []


async def test_stock_report_has_a_forecast(shop: Engine) -> None:
    await stock_up(shop, 40)
    for i in range(5):
        await shop.purchase("acme", "g100", 2, f"o{i}")
    stock = await shop.stock("g100")
    f = stock.forecast
    assert f is not None and f.history_days == 1
    assert f.daily_velocity == 10.0 and f.days_of_cover == 3.0
    assert f.reorder_qty == 10 * 14 - 30  # 14 days of lead time + review, no spread yet


# ---- void, park, blacklist on empty and sold-out batches -------------------------------------

async def _batch_states(engine: Engine, supplier: str) -> dict[str, tuple[str, int, int]]:
    return {b.batch_id: (b.status, b.delivered, b.voided) for b in (await engine.supplier_report(supplier)).batches}


@pytest.mark.parametrize("action", ["park", "void"])
async def test_blacklist_and_reinstate_with_sold_out_and_empty_batches(action: str, tmp_path,
                                                                      flushed_redis_url: str) -> None:
    cfg = make_config(tmp_path, redis_url=flushed_redis_url, blacklist_action=action)
    async with Engine(cfg, sweep=False) as e:
        await open_shop(e, "sup")
        await e.create_supplier("other", "Other")
        await stock_up(e, 2, batch="sold-out")
        await e.purchase("acme", "g100", 2, "all")
        empty = await e.import_codes(codes_text("CODE", 2), sku="g100", supplier="sup", unit_cost=9000,
                                     batch_id="empty")
        assert (empty.accepted, empty.duplicate) == (0, 2)
        await stock_up(e, 3, batch="full", prefix="FULL")
        await stock_up(e, 1, batch="theirs", prefix="OTHER", supplier="other")

        await e.update_supplier("sup", status="blacklisted", reason="fraud")
        stock = await e.stock("g100")
        assert (stock.available, stock.sold) == (1, 2)
        assert (stock.parked, stock.voided) == ((3, 0) if action == "park" else (0, 3))
        off = "parked" if action == "park" else "voided"
        assert await _batch_states(e, "sup") == {"sold-out": (off, 2, 0), "empty": (off, 0, 0),
                                                 "full": (off, 0, 0 if action == "park" else 3)}
        assert await e.audit() == []
        # the next orders get the other supplier's code, then none of the blacklisted one's
        got = await e.purchase("acme", "g100", 1, "next")
        assert got.codes[0].code.startswith("OTHER")
        with pytest.raises(errors.OutOfStockError):
            await e.purchase("acme", "g100", 1, "after")

        await e.update_supplier("sup", status="active")
        stock = await e.stock("g100")
        assert (stock.available, stock.parked) == ((3, 0) if action == "park" else (0, 0))
        if action == "park":
            assert await _batch_states(e, "sup") == {"sold-out": ("imported", 2, 0), "empty": ("imported", 0, 0),
                                                     "full": ("imported", 0, 0)}
            assert len((await e.purchase("acme", "g100", 3, "back")).codes) == 3
        assert await e.audit() == []


async def test_void_park_and_unpark_of_empty_and_sold_out_batches(shop: Engine) -> None:
    await stock_up(shop, 2, batch="sold-out")
    await shop.purchase("acme", "g100", 2, "all")
    await shop.import_codes(codes_text("CODE", 2), sku="g100", supplier="sup", unit_cost=9000, batch_id="empty")
    inventory = shop._parts["inventory"]
    for batch_id in ("sold-out", "empty"):
        b = await inventory.batch(batch_id)
        await inventory.park_batch(b, True)
        await inventory.park_batch(b, True)  # again: nothing changes
        assert (await _batch_states(shop, "sup"))[batch_id][0] == "parked"
        await inventory.park_batch(b, False)
        assert (await _batch_states(shop, "sup"))[batch_id][0] == "imported"
        assert await shop.void_batch(batch_id) == 0
        assert await shop.void_batch(batch_id) == 0
        assert (await _batch_states(shop, "sup"))[batch_id] == ("voided", 2 if batch_id == "sold-out" else 0, 0)
    stock = await shop.stock("g100")
    assert (stock.accepted, stock.available, stock.sold, stock.voided, stock.parked) == (2, 0, 2, 0, 0)
    assert await shop.audit() == []


async def test_auto_blacklist_with_a_sold_out_first_batch_parks_the_rest(tmp_path, flushed_redis_url: str) -> None:
    cfg = make_config(tmp_path, redis_url=flushed_redis_url, blacklist_min_delivered=5, blacklist_invalid_rate=0.2)
    async with Engine(cfg, sweep=False) as e:
        await open_shop(e, "bad", deposit=100_000)
        await stock_up(e, 10, supplier="bad")
        orders = [await e.purchase("acme", "g100", 1, f"o{i}") for i in range(10)]
        await stock_up(e, 5, supplier="bad", batch="b2", prefix="MORE")
        for o in orders[:3]:  # the third approval blacklists
            t = await e.open_ticket("acme", o.order_id, o.codes[0].code, "bad")
            assert (await e.resolve_ticket(t.ticket_id, "approve")).status == "approved"
        assert (await e.get_supplier("bad")).status == "blacklisted"
        stock = await e.stock("g100")
        assert (stock.available, stock.parked) == (0, 5)
        with pytest.raises(errors.OutOfStockError):
            await e.purchase("acme", "g100", 1, "after")
        assert await e.audit() == []
