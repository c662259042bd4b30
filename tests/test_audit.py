"""engine.audit() can fail: a healthy shop audits clean, and every check it makes names
the corruption it exists for, made behind the engine's back through a raw Redis client.

Each test asserts the whole report, so a corruption is also shown not to be blamed on
anything else.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from dispatch.engine import Engine
from dispatch.records import decode_batch, decode_codes
from dispatch.store import keys
from dispatch.store.inventory import split_codes

from .conftest import codes_text

SKU = keys.SkuKeys("g100")
ACME, BETA = keys.AcctKeys("acme"), keys.AcctKeys("beta")
SUMS = "available+reserved+sold+voided+invalidated+parked+expired"


@dataclass
class Shop:
    """Order ids and batch seqs of the healthy shop (see :func:`healthy`)."""

    bought: str     # acme, delivered, 2 codes at 9025
    refunded: str   # acme, 1 code at 9025, refunded by an approved ticket
    held: str       # beta, reserved, 1 code at 9500
    cancelled: str  # beta, reserved then cancelled: its code is back in b1's pool
    seq1: int       # batch b1 of supplier sup, 10 codes
    seq2: int       # batch b2 of supplier sup2, 4 codes, parked (sup2 is blacklisted)


@pytest_asyncio.fixture
async def r(flushed_redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A raw client on the engine's Redis: the way the corruptions get in."""
    client = aioredis.Redis.from_url(flushed_redis_url)
    yield client
    await client.aclose()


@pytest_asyncio.fixture
async def healthy(shop: Engine, r: aioredis.Redis) -> Shop:
    """:func:`shop` with a little of everything audit() looks at, audited clean.

    g100: accepted 14 = available 6 + reserved 1 + sold 2 + invalidated 1 + parked 4.
    acme: balance 981950, held 0. beta: balance 1000000, held 9500.
    supplier sup: deposit 41000 (50000 less one ticket's 9000); sup2: deposit 0.
    """
    await shop.deposit("sup", 50_000, "wire-1")
    await shop.import_codes(codes_text("CODE", 10), sku="g100", supplier="sup", unit_cost=9000, batch_id="b1")
    await shop.create_supplier("sup2", "Parked supplier")
    await shop.import_codes(codes_text("PARK", 4), sku="g100", supplier="sup2", unit_cost=9000, batch_id="b2")
    await shop.update_supplier("sup2", status="blacklisted")
    bought = await shop.purchase("acme", "g100", 2, "bought")
    refunded = await shop.purchase("acme", "g100", 1, "refunded")
    ticket = await shop.open_ticket("acme", refunded.order_id, refunded.codes[0].code, "already used")
    await shop.resolve_ticket(ticket.ticket_id, "approve")
    held = await shop.purchase("beta", "g100", 1, "held", mode="reserve")
    cancelled = await shop.purchase("beta", "g100", 1, "cancelled", mode="reserve")
    await shop.cancel("beta", cancelled.order_id)

    seq1, seq2 = [decode_batch(await r.hget(keys.BATCHES, b)).seq for b in ("b1", "b2")]
    stock = await shop.stock("g100")
    assert (stock.accepted, stock.available, stock.reserved, stock.sold, stock.invalidated, stock.parked) == \
        (14, 6, 1, 2, 1, 4)
    acme, beta = await shop.balance("acme"), await shop.balance("beta")
    assert (acme.balance, acme.held, beta.balance, beta.held) == (981_950, 0, 1_000_000, 9500)
    assert [s.deposit for s in await shop.list_suppliers()] == [41_000, 0]
    assert await shop.audit() == []
    return Shop(bought.order_id, refunded.order_id, held.order_id, cancelled.order_id, seq1, seq2)


# ---- raw edits ---------------------------------------------------------------------------------

async def edit_record(r: aioredis.Redis, key: str, field: str, **changes: Any) -> None:
    """Change fields of a msgpack map stored in a hash (an order or a delivery record)."""
    rec = msgspec.msgpack.decode(await r.hget(key, field))
    for name, value in changes.items():
        if value is None:
            del rec[name]
        else:
            rec[name] = value
    await r.hset(key, field, msgspec.msgpack.encode(rec))


async def delivered_codes(r: aioredis.Redis, order_id: str, acct: AcctKeys | None = None) -> list[bytes]:
    """The ciphertexts of an order: a reservation's from g100's delivery record, a
    delivered order's from its account (acme's unless *acct*) where alone they live."""
    blob = await r.hget(SKU.dlv_codes, order_id)
    return split_codes(blob) if blob is not None else decode_codes(await r.hget((acct or ACME).codes, order_id))


def pack_codes(codes: list[bytes]) -> bytes:
    """A delivery record's codes blob (the inverse of split_codes)."""
    return b"".join(len(c).to_bytes(2, "big") + c for c in codes)


async def set_account_codes(r: aioredis.Redis, acct: keys.AcctKeys, order_id: str, codes: list[bytes]) -> None:
    await r.hset(acct.codes, order_id, msgspec.msgpack.encode(codes))


async def add_ledger_entry(r: aioredis.Redis, acct: keys.AcctKeys, amount: int, held: int = 0) -> None:
    """Move a balance (and held) by *amount* (and *held*) with a ledger entry: all stay in step."""
    balance = await r.hincrby(acct.acct, "balance", amount)
    now_held = await r.hincrby(acct.acct, "held", held)
    entry = ("adjust", "raw", amount, held, balance, now_held, time.time_ns() // 1_000_000)
    await r.rpush(acct.ledger, "\x1f".join(map(str, entry)))


async def edit_ledger_entry(r: aioredis.Redis, key: str, index: int, *, amount: int | None = None,
                            held: int | None = None) -> None:
    """Change the balance or held delta of one entry, leaving the account's fields alone."""
    fields = (await r.lindex(key, index)).decode().split("\x1f")
    if amount is not None:
        fields[2] = str(amount)
    if held is not None:
        fields[3] = str(held)
    await r.lset(key, index, "\x1f".join(fields))


# ---- codes: unique delivery ----------------------------------------------------------------------

def two_places(a: str, b: str) -> list[list[str]]:
    """The report of one code found at a and at b, in either order."""
    return [[f"a code is in two places: {a} and {b}"], [f"a code is in two places: {b} and {a}"]]


@pytest.mark.parametrize("where", ["pool-and-order", "two-pools", "two-orders"])
async def test_a_code_in_two_places(shop: Engine, healthy: Shop, r: aioredis.Redis, where: str) -> None:
    h = healthy
    sold = (await delivered_codes(r, h.bought))[0]
    if where == "pool-and-order":  # a sold code back on sale, in the place of one that is lost
        await r.lset(SKU.pool(h.seq1), 0, sold)
        expected = two_places(f"pool g100/{h.seq1}", f"order {h.bought}")
    elif where == "two-pools":
        await r.lset(SKU.pool(h.seq2), 0, await r.lindex(SKU.pool(h.seq1), 0))
        expected = two_places(f"pool g100/{h.seq1}", f"pool g100/{h.seq2}")
    else:  # the reservation handed the code sold to acme, on both sides of the saga
        await r.hset(SKU.dlv_codes, h.held, pack_codes([sold]))
        await set_account_codes(r, BETA, h.held, [sold])
        expected = two_places(f"order {h.bought}", f"order {h.held}")
    assert await shop.audit() in expected


# ---- counters: conservation ----------------------------------------------------------------------

@pytest.mark.parametrize("state, pooled", [("available", 6), ("parked", 4)])
async def test_a_state_counter_off_its_pools(shop: Engine, healthy: Shop, r: aioredis.Redis, state: str,
                                             pooled: int) -> None:
    await r.hincrby(SKU.stats, state, 1)
    await r.hincrby(SKU.stats, "accepted", 1)  # the sum stays whole: only the pools disagree
    assert await shop.audit() == [f"g100: {state} counter {pooled + 1} != {pooled} codes in its pools"]


@pytest.mark.parametrize("state", ["reserved", "sold", "invalidated"])
async def test_a_delivery_counter_off_the_delivery_records(shop: Engine, healthy: Shop, r: aioredis.Redis,
                                                           state: str) -> None:
    counters = {"reserved": 1, "sold": 2, "invalidated": 1}
    counters[state] += 1
    await r.hincrby(SKU.stats, state, 1)
    await r.hincrby(SKU.stats, "accepted", 1)
    assert await shop.audit() == [f"g100: counters reserved/sold/invalidated {counters['reserved']}/"
                                  f"{counters['sold']}/{counters['invalidated']} != delivery records 1/2/1"]


async def test_a_delivery_record_off_the_counters(shop: Engine, healthy: Shop, r: aioredis.Redis) -> None:
    """The refunded order's record forgets that its code was found invalid."""
    await edit_record(r, SKU.dlv, healthy.refunded, x=None)
    assert await shop.audit() == ["g100: counters reserved/sold/invalidated 1/2/1 != delivery records 1/3/0"]


@pytest.mark.parametrize("field, delta", [("accepted", -1), ("accepted", 1), ("voided", 1)])
async def test_accepted_off_the_sum_of_states(shop: Engine, healthy: Shop, r: aioredis.Redis, field: str,
                                              delta: int) -> None:
    await r.hincrby(SKU.stats, field, delta)
    accepted, total = (14 + delta, 14) if field == "accepted" else (14, 14 + delta)
    assert await shop.audit() == [f"g100: accepted {accepted} != {SUMS} {total}"]


async def test_expired_off_its_batches(shop: Engine, healthy: Shop, r: aioredis.Redis) -> None:
    await r.hincrby(SKU.stats, "expired", 1)
    await r.hincrby(SKU.stats, "accepted", 1)
    assert await shop.audit() == ["g100: expired counter 1 != 0 expired in its batches"]


async def test_codes_left_in_a_retired_batch(shop: Engine, healthy: Shop, r: aioredis.Redis) -> None:
    """Batch b1 counted past its sell-by, its pool still on sale."""
    await r.sadd(SKU.expired, healthy.seq1)
    assert await shop.audit() == [f"g100: the pool of batch {healthy.seq1} holds 6 codes past their sell-by"]


@pytest.mark.parametrize("counter_too", [False, True], ids=["code-only", "code-and-counter"])
async def test_a_code_lost_from_a_pool(shop: Engine, healthy: Shop, r: aioredis.Redis, counter_too: bool) -> None:
    await r.lpop(SKU.pool(healthy.seq1))
    if counter_too:  # counters and pools agree again, but the code is gone from the sum
        await r.hincrby(SKU.stats, "available", -1)
        assert await shop.audit() == [f"g100: accepted 14 != {SUMS} 13"]
    else:
        assert await shop.audit() == ["g100: available counter 6 != 5 codes in its pools"]


# ---- money ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["balance", "ledger-amount", "ledger-held", "held", "ledger-and-balance"])
async def test_a_balance_or_held_off_its_ledger(shop: Engine, healthy: Shop, r: aioredis.Redis,
                                                where: str) -> None:
    if where == "balance":
        await r.hincrby(ACME.acct, "balance", 100)
        expected = ["acme: balance/held 982050/0 != ledger sums 981950/0"]
    elif where == "ledger-amount":  # the top-up's entry says one less than was credited
        await edit_ledger_entry(r, ACME.ledger, 0, amount=999_999)
        expected = ["acme: ledger entry 0 says balance/held 1000000/0, the entries up to it sum to 999999/0",
                    "acme: balance/held 981950/0 != ledger sums 981949/0"]
    elif where == "ledger-held":  # the reservation's hold entry says one more than was held
        await edit_ledger_entry(r, BETA.ledger, 1, held=9501)
        expected = ["beta: ledger entry 1 says balance/held 1000000/9500, the entries up to it sum to 1000000/9501",
                    "beta: balance/held 1000000/9500 != ledger sums 1000000/9501"]
    elif where == "ledger-and-balance":  # both changed alike: the sums hold, the entry's own figures do not
        await edit_ledger_entry(r, ACME.ledger, 0, amount=999_999)
        await r.hincrby(ACME.acct, "balance", -1)
        expected = ["acme: ledger entry 0 says balance/held 1000000/0, the entries up to it sum to 999999/0"]
    else:  # the held field alone: off the ledger and off the open orders' holds
        await r.hincrby(BETA.acct, "held", 1)
        expected = ["beta: balance/held 1000000/9501 != ledger sums 1000000/9500",
                    "beta: held 9501 != holds of open orders 9500"]
    assert await shop.audit() == expected


@pytest.mark.parametrize("dist, balance, held", [("acme", -1, 0), ("beta", 9499, 9500)])
async def test_a_balance_below_the_credit_limit(shop: Engine, healthy: Shop, r: aioredis.Redis, dist: str,
                                                balance: int, held: int) -> None:
    """Both have a credit limit of 0; the money moved has its ledger entry, so only the limit is broken."""
    acct = keys.AcctKeys(dist)
    await add_ledger_entry(r, acct, balance - int(await r.hget(acct.acct, "balance")))
    assert await shop.audit() == [f"{dist}: balance {balance} - held {held} is below -credit_limit"]


async def test_a_refund_above_the_total(shop: Engine, healthy: Shop, r: aioredis.Redis) -> None:
    await edit_record(r, ACME.orders, healthy.refunded, refunded=9026)
    assert await shop.audit() == [f"acme/{healthy.refunded}: refunded 9026 is more than its total 9025"]


async def test_held_off_the_holds_of_open_orders(shop: Engine, healthy: Shop, r: aioredis.Redis) -> None:
    await edit_record(r, BETA.orders, healthy.held, hold=9501)
    assert await shop.audit() == ["beta: held 9500 != holds of open orders 9501"]


@pytest.mark.parametrize("supplier, where, deposit", [("sup", "deposit", 41_001), ("sup2", "deposit", 1),
                                                      ("sup", "ledger", 41_000), ("sup", "ledger-and-deposit", 0)])
async def test_a_supplier_deposit_off_its_ledger(shop: Engine, healthy: Shop, r: aioredis.Redis, supplier: str,
                                                 where: str, deposit: int) -> None:
    k = keys.SupplierKeys(supplier)
    expected = [f"supplier {supplier}: deposit {deposit} != ledger sum"]
    if where == "deposit":
        await r.hincrby(k.acct, "balance", 1)
    elif where == "ledger":  # the opening deposit's entry is lost: the next entry's own figures tell it too
        await r.lpop(k.ledger)
        second = (await r.lindex(k.ledger, 0)).decode().split("\x1f")
        expected.insert(0, f"supplier {supplier}: ledger entry 0 says balance/held {second[4]}/0, the entries up "
                           f"to it sum to {int(second[2])}/0")
    else:  # the opening deposit's entry and the deposit changed alike: only the entry's own figures tell
        first = (await r.lindex(k.ledger, 0)).decode().split("\x1f")
        await r.lset(k.ledger, 0, "\x1f".join([*first[:2], str(int(first[2]) + 1), *first[3:]]))
        await r.hincrby(k.acct, "balance", 1)
        expected = [f"supplier {supplier}: ledger entry 0 says balance/held {first[4]}/0, the entries up to it sum "
                    f"to {int(first[2]) + 1}/0"]
    assert await shop.audit() == expected


# ---- orders --------------------------------------------------------------------------------------

@pytest.mark.parametrize("order, field, value, problem", [
    ("bought", "delivered", 3, "2 codes for 3 delivered"),
    ("bought", "qty", 3, "2 codes for qty 3"),
    ("held", "qty", 2, "1 codes for qty 2"),
    ("bought", "total", 18_051, "total 18051 != 2 x 9025"),
    ("held", "unit_price", 9000, "total 9500 != 1 x 9000"),
], ids=["delivered", "qty", "qty-reserved", "total", "unit-price-reserved"])
async def test_an_order_off_its_codes(shop: Engine, healthy: Shop, r: aioredis.Redis, order: str, field: str,
                                      value: int, problem: str) -> None:
    """An order's record, changed: its counts no longer fit the codes it holds."""
    dist, acct = ("acme", ACME) if order == "bought" else ("beta", BETA)
    order_id = getattr(healthy, order)
    await edit_record(r, acct.orders, order_id, **{field: value})
    assert await shop.audit() == [f"{dist}/{order_id}: {problem}"]


async def test_an_order_that_lost_a_code(shop: Engine, healthy: Shop, r: aioredis.Redis) -> None:
    """Every check of a paid order's codes sees one code fewer."""
    h = healthy
    await set_account_codes(r, ACME, h.bought, (await delivered_codes(r, h.bought))[:1])
    assert await shop.audit() == [f"acme/{h.bought}: 1 codes for 2 delivered", f"acme/{h.bought}: 1 codes for qty 2",
                                  f"acme/{h.bought}: total 18050 != 1 x 9025",
                                  f"acme/{h.bought}: codes differ from the SKU's delivery record"]


@pytest.mark.parametrize("how", ["another-code", "foreign-code", "record-gone"])
async def test_an_orders_codes_differ_from_its_delivery_record(shop: Engine, healthy: Shop, r: aioredis.Redis,
                                                               how: str) -> None:
    h = healthy
    codes = await delivered_codes(r, h.bought)
    if how == "another-code":  # a reservation keeps its codes on both sides: they must agree
        await set_account_codes(r, BETA, h.held, [codes[0]])
        expected = [*two_places(f"order {h.bought}", f"order {h.held}")[0],
                    f"beta/{h.held}: codes differ from the SKU's delivery record"]
    elif how == "foreign-code":  # the buyer holds a code that is still on sale
        await set_account_codes(r, ACME, h.bought, [await r.lindex(SKU.pool(h.seq1), 0), codes[1]])
        expected = two_places(f"pool g100/{h.seq1}", f"order {h.bought}")[0]
        if await r.hexists(SKU.dlv_codes, h.bought):  # sold by a saga (on a cluster): both sides keep its codes
            expected.append(f"acme/{h.bought}: codes differ from the SKU's delivery record")
    else:  # the SKU forgets the reservation: its code is counted reserved by nothing
        await r.hdel(SKU.dlv, h.held)
        await r.hdel(SKU.dlv_codes, h.held)
        expected = ["g100: counters reserved/sold/invalidated 1/2/1 != delivery records 0/2/1",
                    f"beta/{h.held}: codes differ from the SKU's delivery record"]
    assert await shop.audit() == expected


# ---- an order and its delivery record: the two sides of the saga agree ------------------------------

@pytest.mark.parametrize("order", ["bought", "held"])
async def test_an_order_in_another_state_than_its_delivery_record(shop: Engine, healthy: Shop, r: aioredis.Redis,
                                                                  order: str) -> None:
    """Counters and pools agree; the states of the two sides differ."""
    h = healthy
    if order == "bought":  # acme holds its codes, and the SKU sells them again: they are in two places
        codes = await delivered_codes(r, h.bought)
        await edit_record(r, SKU.dlv, h.bought, st="returned")
        await r.lpush(SKU.pool(h.seq1), *codes[::-1])
        await r.hincrby(SKU.stats, "sold", -2)
        await r.hincrby(SKU.stats, "available", 2)
        expected = [*[two_places(f"pool g100/{h.seq1}", f"order {h.bought}")[0][0]] * 2,
                    f"acme/{h.bought}: delivered, but the SKU's delivery record is returned"]
    else:  # beta may still cancel a reservation the SKU counts sold
        await edit_record(r, SKU.dlv, h.held, st="sold")
        await r.hincrby(SKU.stats, "reserved", -1)
        await r.hincrby(SKU.stats, "sold", 1)
        expected = [f"beta/{h.held}: reserved, but the SKU's delivery record is sold"]
    assert await shop.audit() == expected


@pytest.mark.parametrize("how", ["cancelled-by-the-account-only", "forgotten-by-the-account"])
async def test_a_delivery_record_that_no_order_answers_for(shop: Engine, healthy: Shop, r: aioredis.Redis,
                                                           how: str) -> None:
    """Codes counted reserved or sold that no buyer has: lost to sale, with every counter right."""
    h = healthy
    if how == "cancelled-by-the-account-only":  # the hold is released, the code never comes back
        await edit_record(r, BETA.orders, h.held, status="cancelled", hold=0)
        await r.hdel(BETA.codes, h.held)
        await add_ledger_entry(r, BETA, 0, held=-9500)
        expected = [f"g100/{h.held}: delivery record is reserved, but no account has the order reserved or paid"]
    else:
        await r.hdel(ACME.orders, h.bought)
        await r.hdel(ACME.codes, h.bought)
        await r.zrem(ACME.index, h.bought)
        await r.hdel(ACME.refs, "bought")
        expected = [f"g100/{h.bought}: delivery record is sold, but no account has the order reserved or paid"]
    assert await shop.audit() == expected


async def test_a_cancelled_order_that_kept_its_codes(shop: Engine, healthy: Shop, r: aioredis.Redis) -> None:
    """Its code is back on sale: a copy must not stay with the buyer who cancelled."""
    h = healthy
    await set_account_codes(r, BETA, h.cancelled, await delivered_codes(r, h.cancelled))
    assert await shop.audit() == [f"beta/{h.cancelled}: 1 codes kept for a cancelled order"]


# ---- volume tiers: spend by day ------------------------------------------------------------------

@pytest.mark.parametrize("where", ["more", "dropped", "a-day-without-purchases", "a-day-no-window-needs"])
async def test_a_days_spend_off_the_ledger(shop: Engine, healthy: Shop, r: aioredis.Redis, where: str) -> None:
    """acme paid 3 x 9025 today and was refunded 9025: its day counts 18050."""
    today = time.time_ns() // 86_400_000_000_000
    spend = keys.spend_days("acme")
    assert await r.hgetall(spend) == {str(today).encode(): b"18050"}
    if where == "more":
        await r.hincrby(spend, str(today), 1)
        expected = [f"acme: spend of day {today} counted 18051 != 18050 paid in its ledger"]
    elif where == "dropped":
        await r.hdel(spend, str(today))
        expected = [f"acme: spend of day {today} counted 0 != 18050 paid in its ledger"]
    elif where == "a-day-without-purchases":
        await r.hset(spend, str(today - 3), 500)
        expected = [f"acme: spend of day {today - 3} counted 500 != 0 paid in its ledger"]
    else:  # older than any window needs: tier_apply.lua drops it, the audit lets it be
        await r.hset(spend, str(today - 61), 500)
        expected = []
    assert await shop.audit() == expected


# ---- transaction limits: the spend they count -------------------------------------------------

@pytest.mark.parametrize("where", ["day-above-the-ledger", "month-below-zero"])
async def test_a_limits_spend_off_the_ledger(shop: Engine, healthy: Shop, r: aioredis.Redis, where: str) -> None:
    """With limits set, beta buys 2 codes at 9500: its day and month count 19000."""
    await shop.set_limits("beta", daily=100_000, monthly=1_000_000)
    await shop.purchase("beta", "g100", 2, "limited")
    got = await shop.limits("beta")
    assert (got.spent_today, got.spent_this_month) == (19_000, 19_000)
    assert await shop.audit() == []
    # every hold and purchase of the day (on one Redis a purchase is one entry; a saga's is
    # a hold and a purchase)
    most = sum(int(e[3]) if e[0] == "hold" else -int(e[2])
               for e in await shop.store.accounts.ledger("beta") if e[0] in ("hold", "purchase"))
    assert most >= 19_000 + 2 * 9500
    if where == "day-above-the-ledger":
        await r.hset(BETA.acct, "sdv", most + 1)
        expected = [f"beta: the limits count {most + 1} spent this day, its ledger's holds and purchases {most}"]
    else:
        await r.hset(BETA.acct, "smv", -1)
        expected = [f"beta: the limits count -1 spent this month, its ledger's holds and purchases {most}"]
    assert await shop.audit() == expected
