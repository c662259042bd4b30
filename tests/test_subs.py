"""Sub-distributors: a tree under a distributor, prices marked up level by level, margins
credited to every ancestor atomically with the sub's purchase (one script on one node, the
saga's commit on a cluster), transfers, suspension of a subtree, limits as a ceiling,
refunds taking margins back, and the audit's margin checks."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from dispatch import errors
from dispatch.engine import Engine
from dispatch.store import keys

from .conftest import codes_text
from .test_audit import r  # noqa: F401  (the raw client fixture)


async def tree(shop: Engine) -> dict[str, str]:
    """acme (gold: 9025 a g100) -> acme~a (+500 bps) -> acme~a~b (+100 a code on g100);
    API keys by id; both subs funded by the platform."""
    keys = {}
    a = await shop.create_subdistributor("acme", "a", "Agent A", markup_bps=500)
    keys[a.subdistributor.subdistributor] = a.api_key
    b = await shop.create_subdistributor("acme~a", "b", "Retail B", markups={"g100": 100})
    keys[b.subdistributor.subdistributor] = b.api_key
    await shop.topup("acme~a", 500_000, "seed-a")
    await shop.topup("acme~a~b", 500_000, "seed-b")
    await shop.import_codes(codes_text("SUB", 200), sku="g100", supplier="sup", unit_cost=9000)
    return keys


# acme pays 9025; a pays 9025 + round(9025 * 5%) = 9025 + 451 = 9476; b pays 9476 + 100 = 9576
P0, P1, P2 = 9025, 9476, 9576


async def test_a_sub_purchase_credits_every_ancestor_its_margin(shop: Engine) -> None:
    await tree(shop)
    assert (await shop._parts["subs"].price("acme~a~b", "g100")) == (P2, "CNY", [P1 - P0, P2 - P1])
    o = await shop.purchase("acme~a~b", "g100", 3, "po-1")
    assert (o.status, o.unit_price, o.total, len(o.codes)) == ("delivered", P2, 3 * P2, 3)
    assert (await shop.balance("acme~a~b")).balance == 500_000 - 3 * P2
    assert (await shop.balance("acme~a")).balance == 500_000 + 3 * (P2 - P1)
    assert (await shop.balance("acme")).balance == 1_000_000 + 3 * (P1 - P0)
    kinds = [e.kind for e in await shop.ledger("acme")]
    assert kinds == ["topup", "margin"]
    assert await shop.audit() == []


async def test_management_and_what_each_side_sees(shop: Engine) -> None:
    keys = await tree(shop)
    assert [s.subdistributor for s in await shop.list_subdistributors("acme")] == ["acme~a"]
    assert (await shop.get_subdistributor("acme~a", "acme~a~b")).depth == 2
    with pytest.raises(errors.NotFoundError):  # a grandchild is its parent's to manage, not acme's
        await shop.get_subdistributor("acme", "acme~a~b")
    with pytest.raises(errors.NotFoundError):  # a sub sees nothing of its parent
        await shop.get_subdistributor("acme~a~b", "acme~a")
    with pytest.raises(errors.NotFoundError):  # nor of a sibling
        await shop.create_subdistributor("acme~a", "c", "Sibling C")
        await shop.get_subdistributor("acme~a~b", "acme~a~c")
    await shop.create_subdistributor("acme~a~b", "d", "Level 3")
    with pytest.raises(errors.ValidationError, match="at most 3 levels"):
        await shop.create_subdistributor("acme~a~b~d", "e", "Level 4")
    with pytest.raises(errors.ConflictError):
        await shop.create_subdistributor("acme", "a", "Again")
    with pytest.raises(errors.ValidationError):
        await shop.create_distributor("x~y", "No")
    assert await shop.authenticate(keys["acme~a~b"]) == "acme~a~b"
    new = await shop.rotate_subdistributor_key("acme~a", "acme~a~b")
    assert await shop.authenticate(new) == "acme~a~b"
    with pytest.raises(errors.UnauthorizedError):
        await shop.authenticate(keys["acme~a~b"])
    s = await shop.update_subdistributor("acme", "acme~a", markup_bps=1000)
    assert s.markup_bps == 1000
    assert (await shop.purchase("acme~a", "g100", 1, "m")).unit_price == P0 + 903  # 9025 * 10 % = 902.5, half up


async def test_suspending_a_parent_stops_its_subtree_and_allowed_is_a_ceiling(shop: Engine) -> None:
    await tree(shop)
    await shop.update_subdistributor("acme", "acme~a", status="suspended")
    with pytest.raises(errors.DistributorSuspendedError):
        await shop.purchase("acme~a~b", "g100", 1, "s1")
    await shop.update_subdistributor("acme", "acme~a", status="active")
    await shop.update_distributor("acme", status="suspended")  # the root: the whole tree stops
    with pytest.raises(errors.DistributorSuspendedError):
        await shop.purchase("acme~a~b", "g100", 1, "s2")
    await shop.update_distributor("acme", status="active")
    await shop.update_subdistributor("acme", "acme~a", allowed_skus=["other"])
    with pytest.raises(errors.SkuNotAllowedError):  # b may buy every SKU its parent may: not g100 now
        await shop.purchase("acme~a~b", "g100", 1, "s3")
    await shop.update_subdistributor("acme", "acme~a", allowed_skus=None)
    assert (await shop.purchase("acme~a~b", "g100", 1, "s4")).status == "delivered"
    assert (await shop.stock("g100")).available == 199
    assert await shop.audit() == []


async def test_a_parents_limits_are_a_ceiling_for_its_subs(shop: Engine) -> None:
    await tree(shop)
    await shop.set_limits("acme~a", max_order_qty=2, daily=3 * P2)
    with pytest.raises(errors.LimitExceededError, match="max_order_qty"):
        await shop.purchase("acme~a~b", "g100", 3, "l1")
    await shop.purchase("acme~a~b", "g100", 2, "l2")
    await shop.purchase("acme~a~b", "g100", 1, "l3")
    with pytest.raises(errors.LimitExceededError, match="daily"):  # the sub's own spend, under a's daily limit
        await shop.purchase("acme~a~b", "g100", 1, "l4")
    await shop.set_limits("acme~a~b", max_order_qty=5)  # its own looser limit does not lift the ceiling
    with pytest.raises(errors.LimitExceededError, match="max_order_qty"):
        await shop.purchase("acme~a~b", "g100", 3, "l5")
    assert await shop.audit() == []


async def test_reservations_pay_margins_when_confirmed_and_refunds_take_them_back(shop: Engine) -> None:
    await tree(shop)
    held = await shop.purchase("acme~a~b", "g100", 2, "r1", mode="reserve")
    assert (await shop.balance("acme")).balance == 1_000_000  # nothing earned while reserved
    cancelled = await shop.purchase("acme~a~b", "g100", 1, "r2", mode="reserve")
    await shop.cancel("acme~a~b", cancelled.order_id)
    done = await shop.confirm("acme~a~b", held.order_id)
    assert (await shop.balance("acme")).balance == 1_000_000 + 2 * (P1 - P0)
    assert (await shop.balance("acme~a")).balance == 500_000 + 2 * (P2 - P1)
    ticket = await shop.open_ticket("acme~a~b", done.order_id, done.codes[0].code, "used")
    await shop.resolve_ticket(ticket.ticket_id, "approve")
    assert (await shop.balance("acme~a~b")).balance == 500_000 - 2 * P2 + P2
    assert (await shop.balance("acme")).balance == 1_000_000 + 1 * (P1 - P0)
    assert (await shop.balance("acme~a")).balance == 500_000 + 1 * (P2 - P1)
    assert [e.kind for e in await shop.ledger("acme~a")][-1] == "clawback"
    assert await shop.audit() == []


async def test_reservations_of_a_tree_end_in_one_call_each_account_as_if_alone(shop: Engine) -> None:
    """On one node a round's endings go in one settle call across accounts: a sub's
    confirm credits ancestors whose own reservations end in the same call, before or
    after theirs, and every ledger still runs through the account's balance."""
    await tree(shop)
    price = {"acme": P0, "acme~a": P1, "acme~a~b": P2}
    start = {d: (await shop.balance(d)).balance for d in price}
    held = {d: [await shop.purchase(d, "g100", 1, f"{d}-r{i}", mode="reserve") for i in range(6)] for d in price}
    confirmed = {d: 0 for d in price}
    for order in (["acme~a~b", "acme~a", "acme"], ["acme", "acme~a", "acme~a~b"]):  # a sub before its ancestors, then after
        calls0, items0 = shop.coalescer_stats()["settle"]
        ends, wanted = [], []
        for k in range(3):  # the accounts' endings interleaved: each answer must reach its own caller
            for d in order:
                o, confirm = held[d].pop(), (k + len(d)) % 3 != 0
                confirmed[d] += confirm
                ends.append(shop.confirm(d, o.order_id) if confirm else shop.cancel(d, o.order_id))
                wanted.append((o.order_id, "delivered" if confirm else "cancelled"))
        assert [(o.order_id, o.status) for o in await asyncio.gather(*ends)] == wanted
        calls, items = shop.coalescer_stats()["settle"]
        assert (calls - calls0, items - items0) == (1, 9)  # three accounts' endings, one call
    margins = {"acme": confirmed["acme~a"] * (P1 - P0) + confirmed["acme~a~b"] * (P1 - P0),
               "acme~a": confirmed["acme~a~b"] * (P2 - P1), "acme~a~b": 0}
    for d in price:
        bal = await shop.balance(d)
        assert (bal.balance, bal.held) == (start[d] - confirmed[d] * price[d] + margins[d], 0), d
        last = (await shop.ledger(d))[-1]
        assert (last.balance, last.held) == (bal.balance, 0), d
    stock = await shop.stock("g100")
    assert (stock.sold, stock.reserved) == (sum(confirmed.values()), 0)
    assert await shop.audit() == []


async def test_transfers_are_once_per_reference_and_only_of_what_the_parent_has(shop: Engine) -> None:
    await tree(shop)
    s = await shop.transfer("acme", "acme~a", 20_000, "t1")
    assert s.balance == 520_000 and (await shop.balance("acme")).balance == 980_000
    assert (await shop.transfer("acme", "acme~a", 20_000, "t1")).balance == 520_000  # a replay
    with pytest.raises(errors.IdempotencyConflictError):
        await shop.transfer("acme", "acme~a", 1, "t1")
    with pytest.raises(errors.InsufficientBalanceError):
        await shop.transfer("acme", "acme~a", 980_001, "t2")
    with pytest.raises(errors.NotFoundError):  # only to one's own subs
        await shop.transfer("beta", "acme~a", 1, "t3")
    assert [(e.kind, e.ref, e.amount) for e in await shop.ledger("acme~a")][-1] == ("transfer", "acme~a/t1", 20_000)
    assert await shop.audit() == []


async def test_many_subs_buy_at_once_while_a_transfer_races_them(shop: Engine) -> None:
    await tree(shop)
    subs = []
    for i in range(6):
        s = (await shop.create_subdistributor("acme~a", f"s{i}", f"Shop {i}", markup_bps=100 * i)).subdistributor
        subs.append(s.subdistributor)
    await shop.transfer("acme~a", subs[0], 30_000, "seed")  # s0 lives on transfers only

    async def buy(sub: str, n: int) -> int:
        got = 0
        for j in range(n):
            try:
                got += len((await shop.purchase(sub, "g100", 1, f"{sub}-{j}")).codes)
            except errors.InsufficientBalanceError:
                pass
        return got

    async def refill() -> None:
        for j in range(5):
            await shop.transfer("acme~a", subs[0], 10_000, f"refill-{j}")
            await asyncio.sleep(0)

    for i in range(1, 6):
        await shop.topup(subs[i], 200_000, f"seed-{i}")
    got = await asyncio.gather(*(buy(s, 12) for s in subs), refill())
    sold = sum(g for g in got if g)
    assert (await shop.stock("g100")).sold == sold
    margins_a = sum(e.amount for e in await shop.ledger("acme~a") if e.kind == "margin")
    margins_root = sum(e.amount for e in await shop.ledger("acme") if e.kind == "margin")
    assert margins_root == sold * (P1 - P0)
    assert margins_a == sum(g * ((P1 * 100 * i + 5_000) // 10_000) for i, g in enumerate(got[:6]))
    assert await shop.audit() == []


async def test_audit_finds_margins_and_transfers_off(shop: Engine, r) -> None:  # noqa: F811
    await tree(shop)
    o = await shop.purchase("acme~a~b", "g100", 2, "x")
    await shop.transfer("acme", "acme~a", 5_000, "t")
    assert await shop.audit() == []
    root, child = keys.AcctKeys("acme"), keys.AcctKeys("acme~a")
    # The entries below are moved and removed: none carries running figures (the last of a
    # call's does), which would tell every such change before the margins' checks could.
    for k in (root.ledger, child.ledger):
        rows = [e.split(b"\x1f") for e in await r.lrange(k, 0, -1)]
        await r.delete(k)
        await r.rpush(k, *[b"\x1f".join(x[:4] + x[-1:]) for x in rows])
    assert await shop.audit() == []
    # a margin entry gone (and the balance made to agree with the ledger): the root was not paid
    entry = next(e for e in await r.lrange(root.ledger, 0, -1) if e.startswith(b"margin\x1f"))
    await r.lrem(root.ledger, 1, entry)
    await r.hincrby(root.acct, "balance", -2 * (P1 - P0))
    assert await shop.audit() == [f"acme: credited 0 in margins on acme~a~b/{o.order_id}, not 2 codes x {P1 - P0}"]
    # margins credited for an order no sub has
    await r.rpush(root.ledger, entry.replace(o.order_id.encode(), b"01J00000000000000000000000"))
    await r.hincrby(root.acct, "balance", 2 * (P1 - P0))
    assert any("which no order of its subs answers for" in p for p in await shop.audit())
    await r.lrem(root.ledger, 1, entry.replace(o.order_id.encode(), b"01J00000000000000000000000"))
    await r.rpush(root.ledger, entry)
    assert await shop.audit() == []
    # an order whose margins do not make its price from the root's
    sub = keys.AcctKeys("acme~a~b")
    rec = msgspec.msgpack.decode(await r.hget(sub.orders, o.order_id))
    await r.hset(sub.orders, o.order_id, msgspec.msgpack.encode(rec | {"bp": rec["bp"] - 1}))
    assert await shop.audit() == [f"acme~a~b/{o.order_id}: margins {rec['mg']} do not sum to its price {P2} "
                                  f"less its root's {rec['bp'] - 1}"]
    await r.hset(sub.orders, o.order_id, msgspec.msgpack.encode(rec))
    # one side of a transfer gone
    entry = next(e for e in await r.lrange(child.ledger, 0, -1) if e.startswith(b"transfer\x1f"))
    await r.lrem(child.ledger, 1, entry)
    await r.hincrby(child.acct, "balance", -5_000)
    assert await shop.audit() == ["transfer acme~a/t: entries [('acme', -5000)] are not one debit of the parent "
                                  "and one equal credit of acme~a"]
