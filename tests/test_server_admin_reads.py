"""The admin reads the console is built on, through real sockets against a real
redis-server: lists by cursor, single reads, the live overview, and who may ask."""

from __future__ import annotations

from typing import Any

from .httpkit import Server, make_server, server  # noqa: F401  (fixtures)


async def _pages(server: Server, path: str, key: str, limit: int) -> list[list[Any]]:
    """Every page of a list, following next_cursor."""
    pages, cursor = [], None
    while True:
        sep = "&" if "?" in path else "?"
        r = await server.admin("GET", f"{path}{sep}limit={limit}" + (f"&cursor={cursor}" if cursor else ""))
        assert r.status == 200, r
        pages.append(r.json()[key])
        cursor = r.json()["next_cursor"]
        if cursor is None:
            return pages


async def test_skus_and_batches(server: Server) -> None:
    await server.shop()
    await server.engine.create_sku("a50", "Card 50", 5000, "CNY", 4800)
    await server.engine.create_sku("z10", "Card 10", 1000, "CNY", 950)
    pages = await _pages(server, "/admin/skus", "skus", 2)
    assert [[s["sku"] for s in p] for p in pages] == [["a50", "g100"], ["z10"]]
    g100 = pages[0][1]
    assert (g100["stock"]["available"], g100["stock"]["stock_status"], g100["low_stock_threshold"]) == (
        10, "in_stock", 3)
    assert set(g100["stock"]["forecast"]) == {"daily_velocity", "daily_stddev", "days_of_cover", "reorder_qty",
                                              "history_days"}
    assert pages[0][0]["stock"]["stock_status"] == "out_of_stock"

    r = await server.as_("acme", "POST", "/v1/orders", json={"sku": "g100", "qty": 8, "external_ref": "po-1"})
    assert r.status == 201
    r = await server.admin("GET", "/admin/skus/g100")
    assert r.status == 200
    sku = r.json()
    assert (sku["name"], sku["stock"]["available"], sku["stock"]["sold"], sku["stock"]["stock_status"]) == (
        "Game card 100", 2, 8, "low_stock")
    assert sku["stock"]["forecast"]["daily_velocity"] > 0
    r = await server.admin("GET", "/admin/skus/nope")
    assert (r.status, r.error) == (404, "unknown_sku")

    r = await server.admin("GET", "/admin/skus/g100/batches")
    assert r.status == 200
    [batch] = r.json()["batches"]
    assert (batch["batch_id"], batch["supplier"], batch["accepted"], batch["delivered"], batch["status"]) == (
        "b1", "sup", 10, 8, "imported")
    assert (batch["voided"], batch["invalidated"], batch["duplicate"]) == (0, 0, 0)  # zeros are sent
    assert (await server.admin("GET", "/admin/skus/a50/batches")).json() == {"batches": []}
    r = await server.admin("GET", "/admin/skus/nope/batches")
    assert (r.status, r.error) == (404, "unknown_sku")


async def test_suppliers_distributors_and_tiers(server: Server) -> None:
    await server.shop()
    await server.engine.create_supplier("alt", "Alternative")
    await server.engine.deposit("alt", 700, "w-1")
    pages = await _pages(server, "/admin/suppliers", "suppliers", 1)
    assert [[s["supplier"] for s in p] for p in pages] == [["alt"], ["sup"]]
    sup = pages[1][0]
    assert (sup["deposit"], sup["status"], sup["delivered"], sup["invalid_rate"], sup["rating"]) == (
        0, "active", 0, 0.0, 100.0)
    r = await server.admin("GET", "/admin/suppliers/alt")
    assert r.status == 200 and (r.json()["deposit"], r.json()["name"], r.json()["blacklist_reason"]) == (
        700, "Alternative", None)
    r = await server.admin("GET", "/admin/suppliers/ghost")
    assert (r.status, r.error) == (404, "not_found")

    await server.engine.set_rate_limit("beta", 25)
    pages = await _pages(server, "/admin/distributors", "distributors", 1)
    assert [[d["distributor"] for d in p] for p in pages] == [["acme"], ["beta"]]
    r = await server.admin("GET", "/admin/distributors/beta")
    assert r.status == 200
    assert {k: r.json()[k] for k in ("balance", "held", "credit_limit", "tier", "status", "rate_limit")} == {
        "balance": 1_000_000, "held": 0, "credit_limit": 0, "tier": None, "status": "active", "rate_limit": 25}
    r = await server.admin("GET", "/admin/distributors/ghost")
    assert (r.status, r.error) == (404, "not_found")

    await server.engine.create_tier("basic")
    r = await server.admin("GET", "/admin/tiers")
    assert r.json() == {"tiers": [{"tier": "basic", "discount_bps": 0, "prices": {}},
                                  {"tier": "gold", "discount_bps": 500, "prices": {}}], "next_cursor": None}
    assert (await server.admin("GET", "/admin/tiers?cursor=basic")).json()["tiers"][0]["tier"] == "gold"
    assert (await server.admin("GET", "/admin/tiers/gold")).json()["discount_bps"] == 500
    assert (await server.admin("GET", "/admin/tiers/ghost")).error == "not_found"


async def test_open_tickets_by_page(server: Server) -> None:
    await server.shop()
    order = (await server.as_("acme", "POST", "/v1/orders", json={"sku": "g100", "qty": 3,
                                                                   "external_ref": "po-1"})).json()
    ids = []
    for c in order["codes"]:
        r = await server.as_("acme", "POST", "/v1/tickets", json={"order_id": order["order_id"], "code": c["code"],
                                                                  "reason": "used"})
        ids.append(r.json()["ticket_id"])
    await server.engine.resolve_ticket(ids[1], "reject")
    pages = await _pages(server, "/admin/tickets?status=open", "tickets", 1)
    assert [[t["ticket_id"] for t in p] for p in pages] == [[ids[0]], [ids[2]]]
    r = await server.admin("GET", "/admin/tickets?cursor=tk_nope")
    assert (r.status, r.error) == (422, "validation_error") and "cursor" in r.json()["error"]["message"]


async def test_overview(server: Server) -> None:
    r = await server.admin("GET", "/admin/overview")
    assert r.status == 200
    live, store = r.json()["live"], r.json()["store"]
    assert (live["orders"], live["codes"], live["p50_ms"], live["refusals"]) == (0, 0, None, {})
    assert (store["status"], store["webhooks_due"], store["webhooks_failed"]) == ("ready", 0, 0)
    await server.shop()
    assert (await server.as_("acme", "POST", "/v1/orders", json={"sku": "g100", "qty": 2,
                                                                  "external_ref": "a"})).status == 201
    assert (await server.as_("acme", "POST", "/v1/orders", json={"sku": "g100", "qty": 50,
                                                                  "external_ref": "b"})).status == 409
    live = (await server.admin("GET", "/admin/overview")).json()["live"]
    assert (live["orders"], live["codes"], live["refusals"]) == (2, 2, {"out_of_stock": 1})
    assert live["p50_ms"] > 0 and live["p99_ms"] >= live["p50_ms"] and live["window_s"] == 60


async def test_bad_queries_and_auth(server: Server) -> None:
    for path in ("/admin/skus?limit=0", "/admin/skus?limit=501", "/admin/skus?cursor=a%20b",
                 "/admin/distributors?page=2", "/admin/suppliers?limit=x"):
        r = await server.admin("GET", path)
        assert (r.status, r.error) == (422, "validation_error"), path
    for path in ("/admin/skus", "/admin/skus/g100", "/admin/skus/g100/batches", "/admin/suppliers",
                 "/admin/suppliers/sup", "/admin/distributors", "/admin/distributors/acme", "/admin/tiers",
                 "/admin/tiers/gold", "/admin/tickets", "/admin/overview", "/admin/webhooks/failed"):
        r = await server.request("GET", path)
        assert (r.status, r.error) == (401, "unauthorized"), path
        r = await server.request("GET", path, token="wrong")
        assert (r.status, r.error) == (401, "unauthorized"), path
    doc = (await server.request("GET", "/openapi.json")).json()
    for path in ("/admin/skus", "/admin/skus/{sku}", "/admin/skus/{sku}/batches", "/admin/suppliers/{supplier}",
                 "/admin/distributors", "/admin/distributors/{distributor}", "/admin/tiers", "/admin/tiers/{tier}",
                 "/admin/overview"):
        assert doc["paths"][path]["get"]["security"] == [{"admin": []}], path
    assert {"SkuList", "SkuDetail", "DistributorList", "Overview", "Live"} <= set(doc["components"]["schemas"])
