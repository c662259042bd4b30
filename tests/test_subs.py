"""Sub-distributors: a tree under a distributor, prices marked up level by level, margins
credited to every ancestor atomically with the sub's purchase (one script on one node, the
saga's commit on a cluster), transfers, suspension of a subtree, limits as a ceiling,
refunds taking margins back, and the audit's margin checks."""

from __future__ import annotations

import asyncio

import pytest

from dispatch import errors
from dispatch.engine import Engine

from .conftest import codes_text


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
