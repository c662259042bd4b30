"""Volume tiers over HTTP: rules from spend to tier, decided by the sweep (a purchase
flags the account that crossed a rule) or at once (rules changed, pin, unpin), each
change one distributor.tier_changed event, visible in the distributor's own reads.

Past days are made by writing an account's spend by day through a raw client (what the
purchase scripts count there), so no test waits for a day to pass. The tests that need
no raw client run on a Redis Cluster too (tests/test_server_cluster.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import date, timedelta
from typing import Any

import pytest_asyncio
import redis.asyncio as aioredis

from dispatch.engine import Engine
from dispatch.store import keys

from .httpkit import Server, make_server  # noqa: F401  (fixture)

RULES = {"window": "rolling_30d", "rules": [{"min_spend": 20_000, "tier": "silver"},
                                            {"min_spend": 50_000, "tier": "gold"}]}
TODAY = time.time_ns() // 86_400_000_000_000


@pytest_asyncio.fixture
async def shop(make_server: Any, flushed_redis_url: str) -> AsyncIterator[Server]:
    """The HTTP shop (g100 at 9500, 60 codes; acme pinned to gold, beta with no tier) with
    tier silver (2% off: 9310) and the RULES."""
    srv: Server = await make_server()
    await srv.shop(codes=60)
    await srv.engine.create_tier("silver", discount_bps=200)
    r = await srv.admin("PUT", "/admin/distributors/acme/tier-pin", json={"tier": "gold"})
    assert r.status == 200 and (r.json()["tier"], r.json()["pinned"]) == ("gold", True)
    r = await srv.admin("PUT", "/admin/tier-rules", json=RULES)
    assert r.status == 200 and r.json() == {**RULES, "version": 1}
    # a raw client, for the tests that write past days (on one Redis only)
    raw = None if "cluster" in flushed_redis_url else aioredis.Redis.from_url(flushed_redis_url)
    srv.redis = raw  # type: ignore[attr-defined]
    yield srv
    if raw is not None:
        await raw.aclose()


async def buy(srv: Server, dist: str, qty: int, ref: str) -> dict[str, Any]:
    r = await srv.as_(dist, "POST", "/v1/orders", json={"sku": "g100", "qty": qty, "external_ref": ref})
    assert r.status == 201, r
    return r.json()


async def tier_events(srv: Server, dist: str) -> list[dict[str, Any]]:
    r = await srv.admin("GET", f"/admin/events?stream=dist:{dist}&limit=1000")
    assert r.status == 200
    return [e for e in r.json()["events"] if e["type"] == "distributor.tier_changed"]


async def spend_on(srv: Server, dist: str, day: int, amount: int | None) -> None:
    """Set (None: drop) what *dist* paid on *day*, as the purchase scripts count it."""
    r: aioredis.Redis = srv.redis  # type: ignore[attr-defined]
    if amount is None:
        await r.hdel(keys.spend_days(dist), str(day))
    else:
        await r.hset(keys.spend_days(dist), str(day), amount)


async def test_buying_across_a_rule_moves_up_once_and_then_pays_the_tier_price(shop: Server) -> None:
    r = await shop.as_("beta", "GET", "/v1/tier")
    assert r.status == 200 and r.json() == {
        "distributor": "beta", "tier": None, "pinned": False, "window": "rolling_30d",
        "window_from": str(date.today() - timedelta(days=29)), "window_to": str(date.today()), "spend": 0,
        "accruing": 0, "next_tier": "silver", "next_min_spend": 20_000}
    await buy(shop, "beta", 2, "b1")  # 19000: below silver
    await shop.engine.sweep()
    assert (await shop.as_("beta", "GET", "/v1/tier")).json()["tier"] is None
    assert await tier_events(shop, "beta") == []

    await buy(shop, "beta", 1, "b2")  # 28500: silver, told by the sweep
    await shop.engine.sweep()
    await shop.engine.sweep()  # nothing more to tell
    [event] = await tier_events(shop, "beta")
    assert (event["entity"], event["version"], event["data"]) == ("distributor:beta", 1, {
        "distributor": "beta", "from": None, "to": "silver", "spend": 28_500, "window": "rolling_30d",
        "pinned": False})
    r = await shop.as_("beta", "GET", "/v1/tier")
    assert {k: r.json()[k] for k in ("tier", "spend", "next_tier", "next_min_spend")} == {
        "tier": "silver", "spend": 28_500, "next_tier": "gold", "next_min_spend": 50_000}
    assert (await shop.admin("GET", "/admin/distributors/beta/tier")).json() == r.json()
    assert (await shop.admin("GET", "/admin/distributors/beta")).json()["tier"] == "silver"
    assert [s["price"] for s in (await shop.as_("beta", "GET", "/v1/skus")).json()["skus"]] == [9310]
    assert (await buy(shop, "beta", 1, "b3"))["unit_price"] == 9310
    assert await shop.engine.audit() == []


async def test_a_refund_counts_against_the_spend(shop: Server) -> None:
    order = await buy(shop, "beta", 3, "r1")  # 28500
    await shop.engine.sweep()
    assert (await shop.as_("beta", "GET", "/v1/tier")).json()["tier"] == "silver"
    for n in range(2):  # two codes refunded: 9500 left, below silver; the refunds flag the account
        r = await shop.as_("beta", "POST", "/v1/tickets", json={"order_id": order["order_id"],
                                                                "code": order["codes"][n]["code"],
                                                                "reason": "already used"})
        assert r.status == 201, r
        r = await shop.admin("POST", f"/admin/tickets/{r.json()['ticket_id']}/resolve", json={"decision": "approve"})
        assert r.status == 200, r
    await shop.engine.sweep()
    assert [(e["data"]["from"], e["data"]["to"], e["data"]["spend"]) for e in await tier_events(shop, "beta")] == [
        (None, "silver", 28_500), ("silver", None, 9500)]
    assert await shop.engine.audit() == []


async def test_spend_leaving_the_rolling_window_moves_down(shop: Server) -> None:
    await spend_on(shop, "beta", TODAY - 29, 60_000)  # the window's first day
    await shop.engine.apply_tiers("beta")
    r = await shop.as_("beta", "GET", "/v1/tier")
    assert (r.json()["tier"], r.json()["spend"], r.json()["next_tier"]) == ("gold", 60_000, None)
    await spend_on(shop, "beta", TODAY - 29, None)  # a day later: it left the window
    await spend_on(shop, "beta", TODAY - 30, 60_000)
    await shop.engine.apply_tiers("beta")
    await shop.engine.apply_tiers("beta")
    assert [(e["data"]["from"], e["data"]["to"], e["data"]["spend"]) for e in await tier_events(shop, "beta")] == [
        (None, "gold", 60_000), ("gold", None, 0)]
    assert (await shop.as_("beta", "GET", "/v1/tier")).json()["tier"] is None
    assert [s["price"] for s in (await shop.as_("beta", "GET", "/v1/skus")).json()["skus"]] == [9500]


async def test_a_new_day_makes_the_sweep_decide_again_and_drops_days_no_window_needs(shop: Server) -> None:
    await spend_on(shop, "beta", TODAY - 62, 500)  # older than any window needs
    await spend_on(shop, "beta", TODAY - 5, 30_000)
    await shop.engine.sweep()  # decided today already (when the rules were set): nothing to do
    assert (await shop.as_("beta", "GET", "/v1/tier")).json()["tier"] is None
    r: aioredis.Redis = shop.redis  # type: ignore[attr-defined]
    await r.hset(keys.AcctKeys("beta").acct, "tday", TODAY - 1)  # as if it were decided yesterday
    await shop.engine.sweep()
    assert (await shop.as_("beta", "GET", "/v1/tier")).json()["tier"] == "silver"
    assert await r.hgetall(keys.spend_days("beta")) == {str(TODAY - 5).encode(): b"30000"}


async def test_calendar_month_counts_last_months_spend(shop: Server) -> None:
    r = await shop.admin("PUT", "/admin/tier-rules", json={**RULES, "window": "calendar_month"})
    assert r.status == 200 and r.json()["version"] == 2
    today = date(1970, 1, 1) + timedelta(days=TODAY)
    last_month_end = today.replace(day=1) - timedelta(days=1)
    await spend_on(shop, "beta", (last_month_end - date(1970, 1, 1)).days, 25_000)
    await buy(shop, "beta", 6, "m1")  # 57000 this month: next month's tier, not this one's
    await shop.engine.sweep()
    assert await tier_events(shop, "beta") == []  # the sweep had nothing due: this month's spend does not count
    await shop.engine.apply_tiers()
    r = await shop.as_("beta", "GET", "/v1/tier")
    assert r.json() == {
        "distributor": "beta", "tier": "silver", "pinned": False, "window": "calendar_month",
        "window_from": str(last_month_end.replace(day=1)), "window_to": str(last_month_end), "spend": 25_000,
        "accruing": 57_000, "next_tier": None, "next_min_spend": None}
    [event] = await tier_events(shop, "beta")
    assert event["data"] == {"distributor": "beta", "from": None, "to": "silver", "spend": 25_000,
                             "window": "calendar_month", "pinned": False}


async def test_a_pinned_distributor_is_not_moved(shop: Server) -> None:
    assert await tier_events(shop, "acme") == []  # pinned to the tier it had: no change, no event
    await buy(shop, "acme", 1, "a1")
    await shop.engine.sweep()
    await shop.engine.apply_tiers()
    r = await shop.admin("GET", "/admin/distributors/acme/tier")
    assert (r.json()["tier"], r.json()["pinned"], r.json()["spend"]) == ("gold", True, 9025)
    r = await shop.admin("PUT", "/admin/distributors/beta/tier-pin", json={"tier": "gold"})
    assert (r.json()["tier"], r.json()["pinned"]) == ("gold", True)
    r = await shop.admin("DELETE", "/admin/distributors/acme/tier-pin")  # the rules decide: 9025 reaches none
    assert r.status == 200 and (r.json()["tier"], r.json()["pinned"]) == (None, False)
    assert [e["data"] for e in await tier_events(shop, "acme")] == [
        {"distributor": "acme", "from": "gold", "to": None, "spend": 9025, "window": "rolling_30d",
         "pinned": False}]
    assert [(e["data"]["to"], e["data"]["pinned"]) for e in await tier_events(shop, "beta")] == [("gold", True)]
    assert (await shop.admin("PUT", "/admin/distributors/ghost/tier-pin", json={"tier": None})).error == "not_found"


async def test_racing_buyers_and_deciders_tell_one_change(shop: Server) -> None:
    """Orders from many tasks cross silver while three more engines (other workers or
    daemons) and this one sweep and decide beta's tier over and over: one event."""
    r = await shop.admin("PUT", "/admin/tier-rules", json={"rules": [{"min_spend": 50_000, "tier": "silver"}]})
    assert r.status == 200
    others = [await Engine(shop.engine.config, sweep=False).start() for _ in range(3)]
    stop = asyncio.Event()

    async def decide(e: Engine) -> None:
        while not stop.is_set():
            await asyncio.gather(e.sweep(), e.apply_tiers("beta"), e.apply_tiers("beta"))

    deciders = [asyncio.create_task(decide(e)) for e in (*others, shop.engine)]
    try:
        orders = await asyncio.gather(*(buy(shop, "beta", 1, f"race-{i}") for i in range(12)))
        stop.set()
        await asyncio.gather(*deciders)
        await asyncio.gather(*(e.sweep() for e in others))
    finally:
        stop.set()
        for e in others:
            await e.close()
    assert [(e["version"], e["data"]["from"], e["data"]["to"]) for e in await tier_events(shop, "beta")] == [
        (1, None, "silver")]
    assert (await shop.as_("beta", "GET", "/v1/tier")).json()["spend"] == sum(o["total"] for o in orders)
    assert await shop.engine.audit() == []


async def test_bad_rules_are_refused_precisely_and_change_nothing(shop: Server) -> None:
    cases = [
        ({"rules": [{"min_spend": 100, "tier": "silver"}, {"min_spend": 900, "tier": "platinum"}]},
         "rules[1].tier: unknown tier platinum"),
        ({"rules": [{"min_spend": 500, "tier": "silver"}, {"min_spend": 500, "tier": "gold"}]},
         "rules[1].min_spend 500 must be above rules[0].min_spend 500: rules ascend"),
        ({"rules": [{"min_spend": 900, "tier": "silver"}, {"min_spend": 100, "tier": "gold"}]},
         "rules[1].min_spend 100 must be above rules[0].min_spend 900: rules ascend"),
        ({"rules": [{"min_spend": 100, "tier": "silver"}, {"min_spend": 900, "tier": "silver"}]},
         "rules[1].tier: silver is rules[0]'s tier already"),
        ({"rules": [{"min_spend": -1, "tier": "silver"}]}, "$.rules[0].min_spend"),
        ({"window": "weekly", "rules": []}, "$.window"),
        ({"rules": [{"min_spend": 1, "tier": "silver", "extra": 1}]}, "extra"),
    ]
    for body, says in cases:
        r = await shop.admin("PUT", "/admin/tier-rules", json=body)
        assert (r.status, r.error) == (422, "validation_error"), (body, r)
        assert says in r.json()["error"]["message"], (says, r.json())
    assert (await shop.admin("GET", "/admin/tier-rules")).json() == {**RULES, "version": 1}
    r = await shop.admin("PUT", "/admin/distributors/beta/tier-pin", json={"tier": "platinum"})
    assert (r.status, r.error, r.json()["error"]["message"]) == (422, "validation_error", "tier: unknown tier platinum")
    assert (await shop.request("GET", "/v1/tier")).status == 401
    assert (await shop.as_("beta", "GET", "/v1/tier")).json()["pinned"] is False


async def test_no_rules_leave_tiers_to_the_admin(shop: Server) -> None:
    r = await shop.admin("PUT", "/admin/tier-rules", json={"rules": []})
    assert r.json() == {"window": "rolling_30d", "rules": [], "version": 2}
    await buy(shop, "beta", 6, "n1")
    await shop.engine.apply_tiers()
    r = await shop.as_("beta", "GET", "/v1/tier")
    assert (r.json()["tier"], r.json()["window"], r.json()["spend"], r.json()["next_tier"]) == (None, None, 57_000,
                                                                                             None)
    assert await tier_events(shop, "beta") == []


async def test_rules_and_pins_are_operator_writes_in_the_audit_trail(shop: Server) -> None:
    made = {}
    for role in ("viewer", "operator"):
        r = await shop.admin("POST", "/admin/tokens", json={"name": f"{role}-1", "role": role})
        made[role] = r.json()["secret"]
    r = await shop.request("PUT", "/admin/tier-rules", token=made["viewer"], json={"rules": []})
    assert (r.status, r.error) == (403, "forbidden")
    r = await shop.request("PUT", "/admin/distributors/beta/tier-pin", token=made["viewer"], json={"tier": "gold"})
    assert (r.status, r.error) == (403, "forbidden")
    assert (await shop.request("GET", "/admin/tier-rules", token=made["viewer"])).json()["version"] == 1
    r = await shop.request("PUT", "/admin/distributors/beta/tier-pin", token=made["operator"], json={"tier": "gold"})
    assert r.status == 200
    r = await shop.request("PUT", "/admin/tier-rules", token=made["operator"], json={"rules": []})
    assert r.status == 200
    latest = reversed((await shop.admin("GET", "/admin/audit")).json()["entries"])
    entries = {(e["action"], e["target"]): e for e in latest}
    pin = entries[("pin_tier", "distributor_tier:beta")]
    assert (pin["actor"], pin["before"]["tier"], pin["after"]["tier"], pin["after"]["pinned"]) == (
        "operator-1", None, "gold", True)
    rules = entries[("set_tier_rules", "tier_rules")]
    assert (rules["actor"], rules["before"]["version"], rules["after"]) == (
        "operator-1", 1, {"window": "rolling_30d", "rules": [], "version": 2})
