"""Verification after a run, through the API only: what the store says (every order of
the run's distributors, each SKU's stock, each balance) against what was seeded and
what the clients were answered."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import msgspec

from .client import Pool
from .target import LoadtestError, Seeded

__all__ = ["SeenOrder", "Check", "Observed", "verify", "decode_order"]


class SeenCode(msgspec.Struct, gc=False):
    code: str


class SeenOrder(msgspec.Struct, gc=False):
    order_id: str
    external_ref: str
    sku: str
    qty: int
    unit_price: int
    total: int
    status: str
    codes: list[SeenCode] = []


class _Page(msgspec.Struct):
    orders: list[SeenOrder]
    next_cursor: str | None = None


class _Stock(msgspec.Struct):
    accepted: int
    available: int
    reserved: int
    sold: int
    voided: int
    invalidated: int


class _Balance(msgspec.Struct):
    balance: int
    held: int


_order_decoder = msgspec.json.Decoder(SeenOrder)
_page_decoder = msgspec.json.Decoder(_Page)


def decode_order(body: bytes) -> SeenOrder:
    return _order_decoder.decode(body)


@dataclass
class Observed:
    """What the clients were answered: per (distributor index, external_ref), every
    2xx answer as (kind, HTTP status, order)."""

    answers: dict[tuple[int, str], list[tuple[str, int, SeenOrder]]] = field(default_factory=lambda: defaultdict(list))

    def add(self, dist: int, ref: str, kind: str, status: int, order: SeenOrder) -> None:
        self.answers[(dist, ref)].append((kind, status, order))


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    examples: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail, "examples": self.examples}


class _Api:
    def __init__(self, pool: Pool, admin_token: str, seeded: Seeded) -> None:
        self.pool, self.admin, self.seeded = pool, {"Authorization": f"Bearer {admin_token}"}, seeded

    async def get(self, target: str, headers: dict[str, str]) -> bytes:
        for attempt in range(5):
            try:
                status, body = await self.pool.request("GET", target, None, headers)
            except ConnectionError:
                await asyncio.sleep(0.2)
                continue
            if status == 200:
                return body
            if status < 500 and status != 429:
                raise LoadtestError(f"GET {target}: {status} {body[:300].decode(errors='replace')}")
            await asyncio.sleep(0.2)
        raise LoadtestError(f"GET {target}: no answer")

    async def orders(self, dist: int) -> list[SeenOrder]:
        key = {"Authorization": f"Bearer {self.seeded.keys[dist]}"}
        out: list[SeenOrder] = []
        cursor = None
        while True:
            target = "/v1/orders?limit=500" + (f"&cursor={quote(cursor)}" if cursor else "")
            page = _page_decoder.decode(await self.get(target, key))
            out += page.orders
            if not page.next_cursor:
                return out
            cursor = page.next_cursor

    async def stocks(self) -> dict[str, _Stock]:
        async def one(sku: str) -> tuple[str, _Stock]:
            body = await self.get(f"/admin/skus/{quote(sku)}/stock", self.admin)
            return sku, msgspec.json.decode(body, type=_Stock)
        return dict(await asyncio.gather(*(one(s.sku) for s in self.seeded.skus)))

    async def balances(self) -> list[_Balance]:
        return [msgspec.json.decode(await self.get("/v1/balance", {"Authorization": f"Bearer {k}"}), type=_Balance)
                for k in self.seeded.keys]


def _check(name: str, problems: list[str], what: str) -> Check:
    if problems:
        return Check(name, False, f"{len(problems)} {what}", problems[:10])
    return Check(name, True, "ok")


async def verify(pool: Pool, admin_token: str, seeded: Seeded, observed: Observed,
                 settle_timeout_s: float = 30.0) -> tuple[list[Check], dict[str, Any]]:
    """Every check, and a few totals. Waits (up to *settle_timeout_s*) for the store to be
    quiescent: no order mid-saga and the same stock counts twice in a row."""
    api = _Api(pool, admin_token, seeded)
    deadline = time.monotonic() + settle_timeout_s
    while True:
        before = await api.stocks()
        orders = [await api.orders(i) for i in range(len(seeded.keys))]
        stocks = await api.stocks()
        pending = sum(o.status == "pending" for per in orders for o in per)
        if (before == stocks and not pending) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    balances = await api.balances()
    checks: list[Check] = []
    if pending:
        checks.append(Check("settled", False, f"{pending} orders still pending after {settle_timeout_s:.0f} s"))

    delivered = [(d, o) for d, per in enumerate(orders) for o in per if o.status == "delivered"]
    statuses = Counter(o.status for per in orders for o in per)

    # 1. every delivered code in exactly one order
    where: dict[str, list[str]] = defaultdict(list)
    for _, o in delivered:
        for c in o.codes:
            where[c.code].append(o.order_id)
    checks.append(_check("unique_delivery", [f"a code of SKU {_sku_of(seeded, ids, orders)} is in {len(ids)} orders: "
                                             f"{', '.join(ids)}" for ids in where.values() if len(ids) > 1],
                         "codes delivered more than once"))

    # 2. every delivered code is one this run loaded into that SKU
    problems = []
    for _, o in delivered:
        sku = seeded.by_id.get(o.sku)
        if sku is None:
            problems.append(f"order {o.order_id} is for SKU {o.sku}, not one of this run's")
            continue
        problems += [f"order {o.order_id} holds a code not loaded into {o.sku}" for c in o.codes
                     if not seeded.owns(sku, c.code)]
    checks.append(_check("codes_from_stock", problems, "delivered codes not from the SKU's stock"))

    # 3. no order with more or fewer codes than it paid for
    problems = []
    for per in orders:
        for o in per:
            if o.status == "delivered":
                if len(o.codes) != o.qty:
                    problems.append(f"order {o.order_id}: qty {o.qty}, {len(o.codes)} codes")
                if o.total != o.qty * o.unit_price:
                    problems.append(f"order {o.order_id}: total {o.total} != {o.qty} x {o.unit_price}")
            elif o.codes:
                problems.append(f"order {o.order_id} is {o.status} but shows {len(o.codes)} codes")
    checks.append(_check("order_qty", problems, "orders with the wrong number of codes or total"))

    # 4. per-SKU conservation
    sold: Counter[str] = Counter()
    held: Counter[str] = Counter()
    for per in orders:
        for o in per:
            if o.status == "delivered":
                sold[o.sku] += o.qty
            elif o.status == "reserved":
                held[o.sku] += o.qty
    problems = []
    for s in seeded.skus:
        st = stocks[s.sku]
        parts = st.available + st.reserved + st.sold + st.voided + st.invalidated
        if st.accepted != s.stock:
            problems.append(f"{s.sku}: accepted {st.accepted}, seeded {s.stock}")
        if parts != st.accepted:
            problems.append(f"{s.sku}: available {st.available} + reserved {st.reserved} + sold {st.sold} + voided "
                            f"{st.voided} + invalidated {st.invalidated} = {parts} != accepted {st.accepted}")
        if st.sold != sold[s.sku]:
            problems.append(f"{s.sku}: sold {st.sold}, delivered orders hold {sold[s.sku]} codes")
        if st.reserved != held[s.sku]:
            problems.append(f"{s.sku}: reserved {st.reserved}, reserved orders hold {held[s.sku]}")
    checks.append(_check("stock_conservation", problems, "stock discrepancies"))

    # 5. balance = start - what delivered orders cost; held = open reservations
    problems = []
    for i, b in enumerate(balances):
        spent = sum(o.total for o in orders[i] if o.status == "delivered")
        hold = sum(o.total for o in orders[i] if o.status == "reserved")
        if b.balance != seeded.balance - spent:
            problems.append(f"{seeded.distributors[i]}: balance {b.balance} != {seeded.balance} - {spent}")
        if b.held != hold:
            problems.append(f"{seeded.distributors[i]}: held {b.held}, open reservations {hold}")
    checks.append(_check("balances", problems, "balance discrepancies"))

    # 6. every replay got its original order; 7. what the clients were told is what the store holds
    by_ref = {(d, o.external_ref): o for d, per in enumerate(orders) for o in per}
    replay_problems, ack_problems = [], []
    replays = 0
    for (d, ref), answers in observed.answers.items():
        ids = {o.order_id for _, _, o in answers}
        orders_answers = [(kind, st, o) for kind, st, o in answers if kind in ("order", "replay")]
        replays += sum(kind == "replay" for kind, _, _ in answers)
        if len(ids) > 1:
            replay_problems.append(f"{ref}: answered with orders {', '.join(sorted(ids))}")
        if sum(st == 201 for _, st, _ in orders_answers) > 1:
            replay_problems.append(f"{ref}: created twice (two 201 answers)")
        codes = {tuple(sorted(c.code for c in o.codes)) for _, _, o in answers if o.status == "delivered"}
        if len(codes) > 1:
            replay_problems.append(f"{ref}: answered with different codes")
        server = by_ref.get((d, ref))
        if server is None:
            ack_problems.append(f"{ref}: answered 2xx, but the store has no such order")
            continue
        if server.order_id not in ids or len(ids) > 1:
            ack_problems.append(f"{ref}: answered {', '.join(sorted(ids))}, the store has {server.order_id}")
        if codes and (server.status != "delivered" or codes != {tuple(sorted(c.code for c in server.codes))}):
            ack_problems.append(f"{ref}: codes answered differ from the store's ({server.status})")
    checks.append(_check("replays", replay_problems, "refs answered inconsistently"))
    checks.append(_check("acknowledged_orders", ack_problems, "answers the store does not match"))

    totals = {"orders": sum(statuses.values()), "orders_by_status": dict(statuses),
              "codes_delivered": sum(len(o.codes) for _, o in delivered), "replays_answered": replays,
              "stock": {k: msgspec.structs.asdict(v) for k, v in stocks.items()}}
    return checks, totals


def _sku_of(seeded: Seeded, ids: list[str], orders: list[list[SeenOrder]]) -> str:
    for per in orders:
        for o in per:
            if o.order_id == ids[0]:
                return o.sku
    return "?"
