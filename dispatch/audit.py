"""The invariants of the design (docs/design.md), checked over the whole store.

Reads everything: meant for tests, load-test verification and operators, not for the
hot path. Each check names what it found wrong; tests/test_audit.py breaks the store
in each of these ways and expects the check to say so.
"""

from __future__ import annotations

import time
from datetime import date, timedelta
from typing import Any

import msgspec

from .records import PAID, OrderRec, running
from .store import Store
from .store.catalog import COUNTERS
from .store.keys import SUB
from .subs import ancestors

__all__ = ["audit"]

#: Days of spend checked against the ledger: those tier_apply.lua keeps (61 back), less
#: one for a day that ends while the audit reads.
_SPEND_DAYS_CHECKED = 60


async def _check_shard(store: Store, shard: str, records: dict[str, Any], place: Any, problems: list[str]) -> None:
    """A SKU's shard (or one bucket's): codes placed, counters against its pools and
    delivery records, expired against its batches, conservation; its records added to *records* (a record of an
    order that took codes wins over the refusals other buckets recorded for it)."""
    stats = await store.catalog.counters(shard)
    batch_stats, parked_seqs = await store.inventory.shard_batch_counts(shard)
    retired = await store.inventory.retired(shard)
    pooled = {"available": 0, "parked": 0}
    for seq, codes in (await store.inventory.pools(shard)).items():
        if codes and seq in retired:
            problems.append(f"{shard}: the pool of batch {seq} holds {len(codes)} codes past their sell-by")
        for c in codes:
            place(c, f"pool {shard}/{seq}")
            pooled["parked" if seq in parked_seqs else "available"] += 1
    reserved = sold = invalidated = 0
    recs = await store.inventory.deliveries(shard)
    for oid, (r, codes) in recs.items():
        if oid not in records or records[oid][0]["st"] == "failed":
            records[oid] = (r, codes)
        if r["st"] in ("reserved", "sold"):
            n = sum(r["b"][1::2])  # its runs: {seq, count, ...}
            if codes is not None and len(codes) != n:  # the codes are placed where their buyer has them
                problems.append(f"{shard}/{oid}: {len(codes)} codes in a delivery record of {n}")
            if r["st"] == "reserved":
                reserved += n
            else:  # codes found invalid by an approved ticket are no longer counted sold
                sold += n - len(r.get("x", ()))
                invalidated += len(r.get("x", ()))
    g = {f: stats.get(f, 0) for f in COUNTERS}
    per_batch = sum(n for f, n in batch_stats.items() if f.endswith(":e"))
    if g["expired"] != per_batch:
        problems.append(f"{shard}: expired counter {g['expired']} != {per_batch} expired in its batches")
    for st, n in pooled.items():
        if g[st] != n:
            problems.append(f"{shard}: {st} counter {g[st]} != {n} codes in its pools")
    if (g["reserved"], g["sold"], g["invalidated"]) != (reserved, sold, invalidated):
        problems.append(f"{shard}: counters reserved/sold/invalidated {g['reserved']}/{g['sold']}/"
                        f"{g['invalidated']} != delivery records {reserved}/{sold}/{invalidated}")
    total = sum(g[f] for f in g if f != "accepted")
    if g["accepted"] != total:
        problems.append(f"{shard}: accepted {g['accepted']} != available+reserved+sold+voided+invalidated"
                        f"+parked+expired {total}")


def _check_margins(sub_orders: list[tuple[str, OrderRec]], credited: dict[tuple[str, str], int],
                   problems: list[str]) -> None:
    """Every sub-distributor's order keeps margins that make its price from its root's,
    and each ancestor was credited its margin on every code paid and kept (net of
    clawbacks); no margin entry is left that no such order answers for."""
    for dist, r in sub_orders:
        chain = ancestors(dist)
        if r.mg is msgspec.UNSET or r.bp is msgspec.UNSET or len(r.mg) != len(chain):
            problems.append(f"{dist}/{r.id}: a sub-distributor's order without a margin for each ancestor")
            continue
        if sum(r.mg) != r.unit_price - r.bp:
            problems.append(f"{dist}/{r.id}: margins {r.mg} do not sum to its price {r.unit_price} less its "
                            f"root's {r.bp}")
        kept = (r.delivered if r.status in PAID else 0) - (r.refunded // r.unit_price if r.unit_price else 0)
        for anc, m in zip(chain, r.mg):
            got = credited.pop((anc, r.id), 0)
            if got != kept * m:
                problems.append(f"{anc}: credited {got} in margins on {dist}/{r.id}, not {kept} codes x {m}")
    for (anc, oid), amount in credited.items():
        if amount:
            problems.append(f"{anc}: margins of {amount} on order {oid}, which no order of its subs answers for")


async def _check_spend(store: Store, dist: str, entries: list[list[str]], problems: list[str]) -> None:
    """The account's spend by day (volume tiers) against its ledger: each day's count is
    what that day's purchase and refund entries moved, for every day a window may still
    need (the older ones are dropped as the days pass)."""
    since = time.time_ns() // 86_400_000_000_000 - _SPEND_DAYS_CHECKED
    paid: dict[int, int] = {}
    for e in entries:
        if e[0] in ("purchase", "refund"):
            day = int(e[-1]) // 86_400_000
            paid[day] = paid.get(day, 0) - int(e[2])
    counted = await store.tiers.spend_days(dist)
    for day in sorted(set(paid) | set(counted)):
        if day >= since and paid.get(day, 0) != counted.get(day, 0):
            problems.append(f"{dist}: spend of day {day} counted {counted.get(day, 0)} != {paid.get(day, 0)} "
                            f"paid in its ledger")


def _ledger_sums(who: str, entries: list[list[str]], problems: list[str]) -> tuple[int, int]:
    """A ledger's sums (balance, held). The first entry that carries running figures (the
    last of a script call's does) which are not the sums of the entries up to it is a
    problem of *who*."""
    bal = held = 0
    told = False
    for n, (*_, bal, held, _, off) in enumerate(running(entries)):
        if off and not told:
            told = True
            problems.append(f"{who}: ledger entry {n} says balance/held {entries[n][4]}/{entries[n][5]}, "
                            f"the entries up to it sum to {bal}/{held}")
    return bal, held


def _month_of_day(day: int) -> int:
    """Months since 1970-01 of a day since 1970-01-01, as _limits.lua counts them."""
    d = date(1970, 1, 1) + timedelta(days=day)
    return (d.year - 1970) * 12 + d.month - 1


async def _check_limits(store: Store, dist: str, entries: list[list[str]], problems: list[str]) -> None:
    """The spend the account's daily and monthly limits count (_limits.lua) against its
    ledger: never below 0, nor above what that day's (month's) holds and purchases moved,
    all a spend can come from (it is counted only while a limit is set, and a hold that
    becomes a purchase counts once, so it may be less)."""
    sd, sdv, sm, smv = (int(v) if v else 0 for v in await store.accounts.fields(dist, ["sd", "sdv", "sm", "smv"]))
    if not (sdv or smv):
        return
    by_day: dict[int, int] = {}
    for e in entries:
        if e[0] in ("hold", "purchase"):
            day = int(e[-1]) // 86_400_000
            by_day[day] = by_day.get(day, 0) + (int(e[3]) if e[0] == "hold" else -int(e[2]))
    by_month: dict[int, int] = {}
    for day, amount in by_day.items():
        by_month[_month_of_day(day)] = by_month.get(_month_of_day(day), 0) + amount
    for what, counted, most in (("day", sdv, by_day.get(sd, 0)), ("month", smv, by_month.get(sm, 0))):
        if not 0 <= counted <= most:
            problems.append(f"{dist}: the limits count {counted} spent this {what}, its ledger's holds and "
                            f"purchases {most}")


async def audit(store: Store) -> list[str]:
    """What is wrong in the store; an empty list when every invariant holds."""
    problems: list[str] = []
    owner: dict[bytes, str] = {}  # ciphertext -> where it is

    def place(c: bytes, where: str) -> None:
        if c in owner:
            problems.append(f"a code is in two places: {owner[c]} and {where}")
        owner[c] = where

    sku_records: dict[str, dict[str, Any]] = {}
    answered: set[tuple[str, str]] = set()  # (sku, order id) of every order reserved or paid
    ids = await store.catalog.sku_ids()
    for sku, state in zip(ids, await store.catalog.skus(ids)):
        if not state.meta:
            continue
        sku_records[sku] = {}
        for shard in await store.catalog.shards(sku):  # the SKU's own, and its other buckets
            await _check_shard(store, shard, sku_records[sku], place, problems)

    margins: dict[tuple[str, str], int] = {}  # (ancestor, order id) -> margins it was credited, net
    transfers: dict[str, list[tuple[str, int]]] = {}  # "<child>/<reference>" -> (account, amount) entries
    sub_orders: list[tuple[str, OrderRec]] = []
    for dist in await store.accounts.ids():
        a = await store.accounts.get(dist)
        if a is None:
            continue
        entries = await store.accounts.ledger(dist)
        bal, held = _ledger_sums(dist, entries, problems)
        if (bal, held) != (a.balance, a.held):
            problems.append(f"{dist}: balance/held {a.balance}/{a.held} != ledger sums {bal}/{held}")
        clawed = 0  # margins taken back may leave an ancestor owing: below its floor by as much
        for e in entries:
            if e[0] in ("margin", "clawback"):
                margins[dist, e[1]] = margins.get((dist, e[1]), 0) + int(e[2])
                clawed -= min(0, int(e[2]))
            elif e[0] == "transfer":
                transfers.setdefault(e[1], []).append((dist, int(e[2])))
        if a.balance - a.held < -a.credit_limit - clawed:
            problems.append(f"{dist}: balance {a.balance} - held {a.held} is below -credit_limit")
        await _check_spend(store, dist, entries, problems)
        await _check_limits(store, dist, entries, problems)
        holds = 0
        after = ""
        while rows := await store.orders.order_records(dist, after, "~", 1000):
            for r, got in rows:
                after = r.id
                holds += r.hold
                if SUB in dist:
                    sub_orders.append((dist, r))
                if r.refunded > r.total:
                    problems.append(f"{dist}/{r.id}: refunded {r.refunded} is more than its total {r.total}")
                if r.status in ("reserved", *PAID):
                    if r.status != "reserved" and len(got) != r.delivered:
                        problems.append(f"{dist}/{r.id}: {len(got)} codes for {r.delivered} delivered")
                    if not r.partial and len(got) != r.qty:
                        problems.append(f"{dist}/{r.id}: {len(got)} codes for qty {r.qty}")
                    if r.total != r.unit_price * len(got):
                        problems.append(f"{dist}/{r.id}: total {r.total} != {len(got)} x {r.unit_price}")
                    for c in got:
                        place(c, f"order {r.id}")
                    rec = sku_records.get(r.sku, {}).get(r.id)
                    if rec is None:
                        agree = False
                    elif rec[1] is None:  # sold by one script: the SKU keeps its batches, the account its codes
                        agree = len(got) == sum(rec[0]["b"][1::2])
                    else:  # a saga's: both sides keep the codes
                        agree = rec[1] == got
                    if not agree:
                        problems.append(f"{dist}/{r.id}: codes differ from the SKU's delivery record")
                    # a paid order whose record was returned has its codes back on sale
                    state = "reserved" if r.status == "reserved" else "sold"
                    if rec is not None and rec[0]["st"] != state:
                        problems.append(f"{dist}/{r.id}: {r.status}, but the SKU's delivery record is "
                                        f"{rec[0]['st']}")
                    answered.add((r.sku, r.id))
                elif got:  # cancelled or expired: its codes went back on sale, the account keeps none
                    problems.append(f"{dist}/{r.id}: {len(got)} codes kept for a {r.status} order")
        if holds != a.held:
            problems.append(f"{dist}: held {a.held} != holds of open orders {holds}")

    # Codes counted reserved or sold that no buyer holds are lost to sale. A ticket's
    # replacement (``of``: the batch of the code it replaces) is keyed by the ticket, and
    # its code is kept on the SKU's side only.
    for sku, recs in sku_records.items():
        for oid, (rec, codes) in recs.items():
            if rec["st"] not in ("reserved", "sold") or (sku, oid) in answered:
                continue
            for c in codes or ():
                place(c, f"order {oid}")
            if "of" not in rec:
                problems.append(f"{sku}/{oid}: delivery record is {rec['st']}, but no account has the order "
                                f"reserved or paid")

    _check_margins(sub_orders, margins, problems)
    for ref, moved in transfers.items():  # each: one debit of the parent, one equal credit of the child
        child = ref.rpartition("/")[0]
        amount = max(x for _, x in moved)
        if sorted(moved) != sorted([(child.rpartition(SUB)[0], -amount), (child, amount)]):
            problems.append(f"transfer {ref}: entries {sorted(moved)} are not one debit of the parent and one "
                            f"equal credit of {child}")

    for supplier in await store.aftersales.supplier_ids():
        s = await store.aftersales.supplier(supplier)
        deposit = s.balance if s is not None else 0
        entries = await store.aftersales.supplier_ledger(supplier)
        if deposit != _ledger_sums(f"supplier {supplier}", entries, problems)[0]:
            problems.append(f"supplier {supplier}: deposit {deposit} != ledger sum")
    return problems
