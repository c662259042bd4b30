"""Transaction limits and the real-name gate: enforced by the purchase scripts, atomically
with the purchase, on one Redis (one script) and in the saga steps a cluster uses."""

from __future__ import annotations

import asyncio
from collections import Counter

import msgspec
import pytest

from dispatch import Config, errors
from dispatch.engine import Engine
from dispatch.models import Order

from .conftest import codes_text, dump, make_config


async def stock_up(engine: Engine, n: int) -> None:
    await engine.import_codes(codes_text("LIM", n), sku="g100", supplier="sup", unit_cost=9000)


async def test_each_limit_refuses_with_its_name_and_what_is_left(shop: Engine) -> None:
    await stock_up(shop, 40)
    assert await shop.limits("acme") == msgspec.convert({}, type(await shop.limits("beta")))  # none set
    await shop.set_limits("acme", max_order_qty=3, max_order_amount=3 * 9025, daily=5 * 9025, monthly=6 * 9025)
    with pytest.raises(errors.LimitExceededError, match="max_order_qty limit of acme: 3 left"):
        await shop.purchase("acme", "g100", 4, "q")
    await shop.set_limits("acme", max_order_amount=2 * 9025, daily=5 * 9025, monthly=6 * 9025)
    with pytest.raises(errors.LimitExceededError, match=f"max_order_amount limit of acme: {2 * 9025} left"):
        await shop.purchase("acme", "g100", 3, "a")
    await shop.purchase("acme", "g100", 2, "d1")
    await shop.purchase("acme", "g100", 2, "d2", mode="reserve")
    with pytest.raises(errors.LimitExceededError, match=f"daily limit of acme: {9025} left"):
        await shop.purchase("acme", "g100", 2, "d3")
    got = await shop.limits("acme")
    assert (got.spent_today, got.spent_this_month) == (4 * 9025, 4 * 9025)
    await shop.purchase("acme", "g100", 1, "d4")  # exactly up to the daily limit
    await shop.set_limits("acme", daily=0, monthly=6 * 9025)
    with pytest.raises(errors.LimitExceededError, match=f"monthly limit of acme: {9025} left"):
        await shop.purchase("acme", "g100", 2, "m1")
    # a refused order took nothing: no code, no money, no spend
    assert (await shop.stock("g100")).available == 40 - 5
    assert (await shop.limits("acme")).spent_this_month == 5 * 9025
    # beta has no limits
    assert (await shop.purchase("beta", "g100", 4, "b")).status == "delivered"
    assert await shop.audit() == []


async def test_a_reservation_that_ends_unpaid_gives_its_spend_back(shop: Engine) -> None:
    await stock_up(shop, 10)
    await shop.set_limits("acme", daily=3 * 9025)
    held = await shop.purchase("acme", "g100", 3, "r1", mode="reserve")
    with pytest.raises(errors.LimitExceededError):
        await shop.purchase("acme", "g100", 1, "r2")
    await shop.cancel("acme", held.order_id)
    assert (await shop.limits("acme")).spent_today == 0
    kept = await shop.purchase("acme", "g100", 3, "r3", mode="reserve")
    await shop.confirm("acme", kept.order_id)
    assert (await shop.limits("acme")).spent_today == 3 * 9025  # paid: it stays spent
    assert await shop.audit() == []


async def test_concurrent_orders_cannot_overshoot_a_daily_limit(shop: Engine) -> None:
    await stock_up(shop, 400)
    await shop.set_limits("acme", daily=50 * 9025)
    outcomes = await asyncio.gather(*(shop.purchase("acme", "g100", 1 + i % 3, f"c{i}",
                                                    mode="reserve" if i % 5 == 0 else "deliver")
                                      for i in range(150)), return_exceptions=True)
    paid = [o for o in outcomes if isinstance(o, Order)]
    refused = Counter(type(o).__name__ for o in outcomes if not isinstance(o, Order))
    assert refused.keys() == {"LimitExceededError"} and refused["LimitExceededError"] > 0
    spent = sum(o.total for o in paid)
    assert 50 * 9025 - 3 * 9025 < spent <= 50 * 9025  # up to the limit, and no further
    assert (await shop.limits("acme")).spent_today == spent
    balance = await shop.balance("acme")
    assert balance.balance == 1_000_000 - sum(o.total for o in paid if o.status == "delivered")
    assert balance.held == sum(o.total for o in paid if o.status == "reserved")
    assert await shop.audit() == []


async def test_unverified_distributors_cannot_buy_when_verification_is_required(flushed_redis_url: str,
                                                                                 tmp_path) -> None:
    await gate_holds(flushed_redis_url, tmp_path)
    dumped = dump(flushed_redis_url)
    assert b"110101199003077777" not in dumped and b"Zhang San" not in dumped


@pytest.mark.cluster
async def test_the_gate_holds_on_a_cluster(flushed_cluster_url: str, tmp_path) -> None:
    await gate_holds(flushed_cluster_url, tmp_path)


async def gate_holds(url: str, tmp_path) -> None:
    """With require_verification, an unverified distributor buys nothing (either mode),
    a verified one buys, and one whose verification is withdrawn is refused again."""
    cfg = msgspec.structs.replace(make_config(tmp_path, redis_url=url), require_verification=True)
    async with Engine(cfg, sweep=False) as e:
        await e.create_sku("g100", "Game card 100", 10000, "CNY", 9500)
        await e.create_supplier("sup", "Supplier")
        await e.create_distributor("acme", "Acme")
        await e.topup("acme", 100_000, "seed")
        await stock_up(e, 5)
        for mode in ("deliver", "reserve"):
            with pytest.raises(errors.VerificationRequiredError, match="acme's real name is not verified"):
                await e.purchase("acme", "g100", 1, f"u-{mode}", mode=mode)
        assert (await e.stock("g100")).available == 5
        v = await e.verify("acme", "Zhang San", "national_id", "110101199003077777", "ops-alice")
        assert (v.status, v.legal_name, v.id_number_last4, v.verified_by) == ("verified", "Zhang San", "7777",
                                                                               "ops-alice")
        assert (await e.purchase("acme", "g100", 1, "v1")).status == "delivered"
        assert (await e.verification("acme")).status == "verified"
        assert await e.unverify("acme") == msgspec.convert({"status": "unverified"}, type(v))
        with pytest.raises(errors.VerificationRequiredError):
            await e.purchase("acme", "g100", 1, "v2")
        assert await e.audit() == []


async def test_verification_is_stored_encrypted_and_checked(shop: Engine, flushed_redis_url: str) -> None:
    v = await shop.verify("beta", "Li Si", "passport", "E12345678", "ops-bob")
    assert v.status == "verified" and v.id_number_last4 == "5678"
    assert b"E12345678" not in dump(flushed_redis_url) and b"Li Si" not in dump(flushed_redis_url)
    for bad, match in ((dict(id_type="selfie"), "id_type must be one of"), (dict(legal_name=""), "legal_name"),
                       (dict(id_number="x" * 65), "id_number"), (dict(verified_by="a\nb"), "verified_by")):
        args = dict(legal_name="Li Si", id_type="passport", id_number="E1", verified_by="ops") | bad
        with pytest.raises(errors.ValidationError, match=match):
            await shop.verify("beta", **args)
    with pytest.raises(errors.NotFoundError):
        await shop.verify("nobody", "A", "passport", "1", "ops")
    with pytest.raises(errors.ValidationError, match="limits"):
        await shop.set_limits("beta", daily=-1)
    with pytest.raises(errors.NotFoundError):
        await shop.set_limits("nobody", daily=1)
    # without require_verification, an unverified distributor still buys (its limits apply)
    assert Config().require_verification is False
