"""Sub-distributors through the HTTP API: a parent manages its subs, many subs buy at once
while a transfer races them, a parent never sees a code, a sub sees nothing above it."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

from .httpkit import Server, make_server, server  # noqa: F401  (fixtures)


async def test_subdistributors_over_http(server: Server) -> None:
    first_month = datetime.now(timezone.utc).strftime("%Y-%m")
    await server.shop(codes=120)
    r = await server.as_("acme", "POST", "/v1/subdistributors",
                         json={"subdistributor": "a", "name": "Agent A", "markup_bps": 500})
    assert r.status == 201 and r.json()["subdistributor"]["subdistributor"] == "acme~a"
    server.keys["acme~a"] = r.json()["api_key"]
    r = await server.as_("acme", "POST", "/v1/subdistributors", json={"subdistributor": "a~b", "name": "Bad"})
    assert (r.status, r.error) == (422, "validation_error")
    r = await server.as_("acme~a", "POST", "/v1/subdistributors",
                         json={"subdistributor": "b", "name": "B", "markups": {"g100": 100}})
    assert r.status == 201
    server.keys["acme~a~b"] = r.json()["api_key"]
    subs = []
    for i in range(8):  # many subs under one parent
        r = await server.as_("acme~a", "POST", "/v1/subdistributors",
                             json={"subdistributor": f"s{i}", "name": f"S{i}", "markup_bps": 50 * i})
        subs.append(r.json()["subdistributor"]["subdistributor"])
        server.keys[subs[-1]] = r.json()["api_key"]
    r = await server.admin("POST", "/admin/distributors/acme~a/topup", json={"amount": 300_000, "reference": "w1"})
    assert r.status == 200
    for s in subs[1:]:
        await server.admin("POST", f"/admin/distributors/{s}/topup", json={"amount": 60_000, "reference": "w"})
    r = await server.as_("acme~a", "POST", f"/v1/subdistributors/{subs[0]}/transfer",
                         json={"amount": 20_000, "reference": "t0"})
    assert r.status == 200 and r.json()["balance"] == 20_000

    async def buy(sub: str) -> list[str]:
        codes = []
        for j in range(8):
            r = await server.as_(sub, "POST", "/v1/orders", json={"sku": "g100", "qty": 1, "external_ref": f"o{j}"})
            assert r.status in (201, 402, 409), r
            if r.status == 201:
                codes += [c["code"] for c in r.json()["codes"]]
        return codes

    async def refill() -> int:
        ok = 0
        for j in range(6):
            r = await server.as_("acme~a", "POST", f"/v1/subdistributors/{subs[0]}/transfer",
                                 json={"amount": 9_600, "reference": f"t{j + 1}"})
            ok += r.status == 200
        return ok

    *bought, refilled = await asyncio.gather(*(buy(s) for s in subs), refill())
    codes = [c for got in bought for c in got]
    assert refilled == 6 and len(codes) == len(set(codes)) > 0
    assert await server.engine.audit() == []

    # what a parent sees of its subs: balances, orders and margins, never a code
    seen = []
    r = await server.as_("acme~a", "GET", "/v1/subdistributors")
    assert r.status == 200 and len(r.json()["subdistributors"]) == 9
    seen.append(r.body)
    margin = 0
    for s in subs:
        r = await server.as_("acme~a", "GET", f"/v1/subdistributors/{s}")
        seen.append(r.body)
        r = await server.as_("acme~a", "GET", f"/v1/subdistributors/{s}/orders?limit=500")
        assert r.status == 200
        seen.append(r.body)
        margin += sum(o["margin"] for o in r.json()["orders"])
    lines: dict[str, int] = {}
    for month in sorted({first_month, datetime.now(timezone.utc).strftime("%Y-%m")}):  # a month may end meanwhile
        r = await server.as_("acme~a", "GET", f"/v1/statements/{month}")
        for x in r.json()["lines"]:
            lines[x["kind"]] = lines.get(x["kind"], 0) + x["amount"]
        assert r.json()["reconciled"] and r.json()["closing_balance"] == r.json()["opening_balance"] + sum(
            x["amount"] for x in r.json()["lines"])
        seen.append(r.body)
    assert lines["margin"] == margin > 0 and lines["transfer"] == -(20_000 + 6 * 9_600)
    assert not any(c.encode() in body for c in codes for body in seen)

    # a sub sees nothing of its parent or siblings
    for path in ("/v1/subdistributors/acme~a", f"/v1/subdistributors/{subs[1]}",
                 f"/v1/subdistributors/{subs[1]}/orders"):
        r = await server.as_(subs[0], "GET", path)
        assert (r.status, r.error) == (404, "not_found")
    r = await server.as_("acme", "GET", f"/v1/subdistributors/{subs[0]}/orders")  # a grandchild: not acme's
    assert r.status == 404

    # suspending a parent stops its subtree
    r = await server.as_("acme", "PATCH", "/v1/subdistributors/acme~a", json={"status": "suspended"})
    assert r.status == 200 and r.json()["status"] == "suspended"
    r = await server.as_("acme~a~b", "POST", "/v1/orders", json={"sku": "g100", "qty": 1, "external_ref": "late"})
    assert (r.status, r.error) == (403, "distributor_suspended")
    r = await server.as_("acme~a", "POST", "/v1/subdistributors/acme~a~b/keys")
    assert r.status == 200 and r.json()["api_key"].startswith("dk_")
    assert await server.engine.audit() == []
