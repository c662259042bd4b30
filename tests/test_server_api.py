"""HTTP API v1 end to end: real sockets, the daemon in-process (on uvloop), a real redis-server.

Every endpoint, every error code of the contract, auth isolation, replays,
signatures, rate limits, metrics, OpenAPI and the access log."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

import pytest

from dispatch.server import sign

from .conftest import RedisProcess
from .httpkit import ADMIN, Conn, Server, make_server, server  # noqa: F401  (fixtures)

ORDER = {"sku": "g100", "qty": 2, "external_ref": "po-1"}


# ---- admin endpoints ------------------------------------------------------------------------

async def test_admin_catalog_endpoints(server: Server) -> None:
    r = await server.admin("POST", "/admin/skus", json={"sku": "steam-100", "name": "Steam 100", "face_value": 10000,
                                                        "currency": "USD", "price": 9800})
    assert r.status == 201 and r.json()["price"] == 9800 and r.json().get("status", "active") == "active"
    r = await server.admin("POST", "/admin/skus", json={"sku": "steam-100", "name": "again", "face_value": 1,
                                                        "currency": "USD", "price": 1})
    assert (r.status, r.error) == (409, "conflict")
    r = await server.admin("PATCH", "/admin/skus/steam-100", json={"price": 9700, "low_stock_threshold": 5})
    assert r.status == 200 and (r.json()["price"], r.json()["low_stock_threshold"], r.json()["name"]) == (
        9700, 5, "Steam 100")
    r = await server.admin("PATCH", "/admin/skus/nope", json={"price": 1})
    assert (r.status, r.error) == (404, "unknown_sku")
    r = await server.admin("GET", "/admin/skus/steam-100/stock")
    assert r.status == 200 and r.json()["stock_status"] == "out_of_stock" and r.json()["available"] == 0

    r = await server.admin("POST", "/admin/suppliers", json={"supplier": "acme-cards", "name": "ACME", "deposit": 500})
    assert r.status == 201 and r.json()["deposit"] == 500 and r.json()["supplier"] == "acme-cards"
    r = await server.admin("POST", "/admin/tiers", json={"tier": "vip", "discount_bps": 1000,
                                                         "prices": {"steam-100": 9000}})
    assert r.status == 201 and r.json()["prices"] == {"steam-100": 9000}

    r = await server.admin("POST", "/admin/distributors", json={"distributor": "shop-1", "name": "Shop One",
                                                                "tier": "vip", "credit_limit": 100,
                                                                "allowed_skus": ["steam-100"], "rate_limit": 50})
    assert r.status == 201
    body = r.json()
    key = body["api_key"]
    assert key.startswith("dk_") and body["distributor"]["rate_limit"] == 50
    assert body["distributor"]["allowed_skus"] == ["steam-100"] and body["distributor"]["tier"] == "vip"
    r = await server.admin("PATCH", "/admin/distributors/shop-1", json={"credit_limit": 200, "tier": None,
                                                                        "rate_limit": 0})
    assert r.status == 200 and (r.json()["credit_limit"], r.json().get("tier"), r.json()["rate_limit"]) == (
        200, None, 0)
    r = await server.admin("PATCH", "/admin/distributors/ghost", json={"credit_limit": 1})
    assert (r.status, r.error) == (404, "not_found")

    r = await server.admin("POST", "/admin/distributors/shop-1/topup", json={"amount": 5000, "reference": "w-1"})
    assert r.status == 200 and r.json()["balance"] == 5000
    r = await server.admin("POST", "/admin/distributors/shop-1/topup", json={"amount": 5000, "reference": "w-1"})
    assert r.json()["balance"] == 5000  # idempotent by reference
    r = await server.admin("POST", "/admin/distributors/shop-1/topup", json={"amount": 6000, "reference": "w-1"})
    assert (r.status, r.error) == (409, "idempotency_conflict")

    assert (await server.request("GET", "/v1/balance", token=key)).status == 200
    r = await server.admin("POST", "/admin/distributors/shop-1/keys")
    assert r.status == 200
    new_key = r.json()["api_key"]
    assert (await server.request("GET", "/v1/balance", token=key)).error == "unauthorized"
    assert (await server.request("GET", "/v1/balance", token=new_key)).status == 200
    r = await server.admin("POST", "/admin/distributors/ghost/keys")
    assert (r.status, r.error) == (404, "not_found")


async def test_import_void_and_export(server: Server) -> None:
    await server.shop(codes=0)
    path = "/admin/batches?sku=g100&supplier=sup&unit_cost=9000&batch_id=up-1"
    r = await server.admin("POST", path, body=b"AAAA0001\nAAAA0002\n\nAAAA0001\nbad\x01line\n",
                           headers={"Content-Type": "text/plain"})
    assert r.status == 201, r
    rep = r.json()
    assert (rep["batch_id"], rep["accepted"], rep["duplicate"], rep["malformed"]) == ("up-1", 2, 1, 1)
    assert rep["malformed_lines"] == [{"line": 5, "reason": "control character"}]
    assert rep["replayed"] is False
    # resending the same batch adds nothing twice, and says it is a replay
    r = await server.admin("POST", path, body=b"AAAA0001\nAAAA0002\n\nAAAA0001\nbad\x01line\n",
                           headers={"Content-Type": "text/plain"})
    assert r.status == 200 and r.json() == {**rep, "replayed": True}
    assert (await server.engine.stock("g100")).available == 2
    # other content under the same batch id is refused, not replayed
    r = await server.admin("POST", path, body=b"AAAA0001\nAAAA0003\n", headers={"Content-Type": "text/plain"})
    assert (r.status, r.error) == (409, "conflict")
    r = await server.admin("POST", "/admin/batches?sku=g100&supplier=sup&unit_cost=9000",
                           body=b"code,pin\nCSV00001,1234\nCSV00002,\n", headers={"Content-Type": "text/csv"})
    assert r.status == 201 and r.json()["accepted"] == 2
    r = await server.admin("POST", "/admin/batches?sku=g100&supplier=sup&unit_cost=9000",
                           body=b"X", headers={"Content-Type": "application/json"})
    assert (r.status, r.error) == (422, "validation_error")
    r = await server.admin("POST", "/admin/batches?sku=g100&supplier=sup", body=b"X",
                           headers={"Content-Type": "text/plain"})
    assert (r.status, r.error) == (422, "validation_error") and "unit_cost" in r.json()["error"]["message"]
    r = await server.admin("POST", "/admin/batches?sku=nope&supplier=sup&unit_cost=1", body=b"X1234567\n",
                           headers={"Content-Type": "text/plain"})
    assert (r.status, r.error) == (404, "unknown_sku")

    r = await server.as_("acme", "POST", "/v1/orders", json={"sku": "g100", "qty": 1, "external_ref": "=HYPERLINK(1)"})
    assert r.status == 201
    r = await server.admin("POST", "/admin/batches/up-1/void")
    assert r.status == 200 and r.json() == {"batch_id": "up-1", "voided": 1}
    r = await server.admin("POST", "/admin/batches/nope/void")
    assert (r.status, r.error) == (404, "not_found")
    stock = (await server.admin("GET", "/admin/skus/g100/stock")).json()
    assert (stock["available"], stock["sold"], stock["voided"]) == (2, 1, 1)

    r = await server.admin("GET", "/admin/orders/export?from=2000-01-01T00:00:00Z")
    assert r.status == 200 and r.headers["content-type"].startswith("text/csv")
    assert r.headers["transfer-encoding"] == "chunked"
    lines = r.body.decode().splitlines()
    assert lines[0].startswith("order_id,distributor,external_ref,sku,qty,delivered")
    assert len(lines) == 2 and ",acme,'=HYPERLINK(1),g100,1,1,9025," in lines[1]
    code = (await server.engine.get_order_by_ref("acme", "=HYPERLINK(1)")).codes[0].code
    assert code.encode() not in r.body
    r = await server.admin("GET", "/admin/orders/export?from=2000-01-01T00:00:00Z&to=2000-01-02T00:00:00Z")
    assert r.body.decode().count("\n") == 1  # the header alone
    r = await server.admin("GET", "/admin/orders/export?from=yesterday")
    assert (r.status, r.error) == (422, "validation_error")


# ---- distributor endpoints ------------------------------------------------------------------

async def test_order_replay_and_reads(server: Server) -> None:
    await server.shop()
    r = await server.as_("acme", "POST", "/v1/orders", json=ORDER)
    assert r.status == 201, r
    first = r.json()
    assert first["status"] == "delivered" and len(first["codes"]) == 2 and first["total"] == 2 * 9025
    assert (first["replayed"], first["refunded"], first["reserve_expires_at"], first["mode"]) == (
        False, 0, None, "deliver")
    r = await server.as_("acme", "POST", "/v1/orders", json=ORDER)
    assert r.status == 200 and r.json()["replayed"] is True
    assert (r.json()["order_id"], r.json()["codes"]) == (first["order_id"], first["codes"])
    r = await server.as_("acme", "POST", "/v1/orders", json={**ORDER, "qty": 3})
    assert (r.status, r.error) == (409, "idempotency_conflict")
    assert r.json()["error"]["retryable"] is False

    oid = first["order_id"]
    assert (await server.as_("acme", "GET", f"/v1/orders/{oid}")).json()["codes"] == first["codes"]
    assert (await server.as_("acme", "GET", "/v1/orders?external_ref=po-1")).json()["order_id"] == oid
    r = await server.as_("acme", "GET", "/v1/orders?external_ref=po-1&status=delivered")
    assert (r.status, r.error) == (422, "validation_error")
    for i in range(2, 5):
        assert (await server.as_("acme", "POST", "/v1/orders", json={**ORDER, "qty": 1,
                                                                     "external_ref": f"po-{i}"})).status == 201
    page = (await server.as_("acme", "GET", "/v1/orders?limit=3")).json()
    assert len(page["orders"]) == 3 and page["next_cursor"]
    rest = (await server.as_("acme", "GET", f"/v1/orders?limit=3&cursor={page['next_cursor']}")).json()
    assert [o["external_ref"] for o in page["orders"] + rest["orders"]] == ["po-1", "po-2", "po-3", "po-4"]
    assert (await server.as_("acme", "GET", "/v1/orders?status=cancelled")).json()["orders"] == []
    r = await server.as_("acme", "GET", "/v1/orders?since=2000-01-01T00:00:00")
    assert (r.status, r.error) == (422, "validation_error")  # a time without a zone is ambiguous
    r = await server.as_("acme", "GET", "/v1/orders?limit=0")
    assert (r.status, r.error) == (422, "validation_error") and "limit" in r.json()["error"]["message"]

    bal = (await server.as_("acme", "GET", "/v1/balance")).json()
    assert bal == {"balance": 1_000_000 - 5 * 9025, "held": 0, "credit_limit": 0, "available": 1_000_000 - 5 * 9025}
    skus = (await server.as_("acme", "GET", "/v1/skus")).json()["skus"]
    assert skus == [{"sku": "g100", "name": "Game card 100", "face_value": 10000, "currency": "CNY", "price": 9025,
                     "stock_status": "in_stock"}]
    assert (await server.as_("beta", "GET", "/v1/skus")).json()["skus"][0]["price"] == 9500


async def test_reserve_confirm_cancel(server: Server) -> None:
    await server.shop()
    r = await server.as_("acme", "POST", "/v1/orders", json={**ORDER, "mode": "reserve", "reserve_ttl_s": 60})
    assert r.status == 201 and r.json()["status"] == "reserved" and r.json()["codes"] == []
    held = r.json()["order_id"]
    assert (await server.as_("acme", "GET", "/v1/balance")).json()["held"] == 2 * 9025
    r = await server.as_("acme", "POST", f"/v1/orders/{held}/confirm")
    assert r.status == 200 and r.json()["status"] == "delivered" and len(r.json()["codes"]) == 2
    r = await server.as_("acme", "POST", f"/v1/orders/{held}/cancel")
    assert (r.status, r.error) == (409, "conflict")

    r = await server.as_("acme", "POST", "/v1/orders", json={**ORDER, "external_ref": "po-2", "mode": "reserve"})
    other = r.json()["order_id"]
    r = await server.as_("acme", "POST", f"/v1/orders/{other}/cancel", json={})
    assert r.status == 200 and r.json()["status"] == "cancelled"
    r = await server.as_("acme", "POST", f"/v1/orders/{other}/confirm", json={"x": 1})
    assert (r.status, r.error) == (422, "validation_error")  # the body must be empty or {}
    assert (await server.engine.stock("g100")).available == 8
    assert await server.engine.audit() == []


async def test_distributors_see_only_their_own(server: Server) -> None:
    await server.shop()
    mine = (await server.as_("acme", "POST", "/v1/orders", json=ORDER)).json()
    held = (await server.as_("acme", "POST", "/v1/orders", json={**ORDER, "external_ref": "po-2",
                                                                 "mode": "reserve"})).json()
    for method, path in (("GET", f"/v1/orders/{mine['order_id']}"), ("GET", "/v1/orders?external_ref=po-1"),
                         ("POST", f"/v1/orders/{held['order_id']}/confirm"),
                         ("POST", f"/v1/orders/{held['order_id']}/cancel")):
        r = await server.as_("beta", method, path)
        assert (r.status, r.error) == (404, "not_found"), (method, path)
    assert (await server.as_("beta", "GET", "/v1/orders")).json()["orders"] == []
    assert (await server.as_("beta", "GET", "/v1/balance")).json()["balance"] == 1_000_000
    # the same external_ref is each distributor's own business
    assert (await server.as_("beta", "POST", "/v1/orders", json=ORDER)).status == 201
    # admin endpoints refuse a distributor key, distributor endpoints the admin token
    assert (await server.as_("acme", "GET", "/admin/skus/g100/stock")).error == "unauthorized"
    assert (await server.admin("GET", "/v1/balance")).error == "unauthorized"


async def test_statements_over_http(server: Server) -> None:
    await server.shop()
    assert (await server.as_("acme", "POST", "/v1/orders", json=ORDER)).status == 201
    t = time.gmtime()
    month = f"{t.tm_year:04d}-{t.tm_mon:02d}"
    mine = await server.as_("acme", "GET", f"/v1/statements/{month}")
    assert mine.status == 200
    s = mine.json()
    assert (s["distributor"], s["month"], s["opening_balance"], s["reconciled"]) == ("acme", month, 0, True)
    assert s["closing_balance"] == (await server.engine.balance("acme")).balance
    assert {x["kind"]: x["amount"] for x in s["lines"]} == {"topup": 1_000_000, "purchase": -2 * 9025}
    assert (await server.admin("GET", f"/admin/distributors/acme/statements/{month}")).json() == s
    theirs = await server.as_("beta", "GET", f"/v1/statements/{month}")
    assert {x["kind"] for x in theirs.json()["lines"]} == {"topup"}  # beta reads its own month only
    r = await server.as_("acme", "GET", f"/v1/statements/{month}?format=csv")
    assert r.status == 200 and r.headers["content-type"].startswith("text/csv")
    lines = r.body.decode().splitlines()
    assert lines[0] == "distributor,month,line,count,amount,held_delta,balance,held"
    assert lines[-1] == f"acme,{month},closing,,,,{s['closing_balance']},0"
    for path in ("/v1/statements/2026-13", "/v1/statements/last-month"):
        r = await server.as_("acme", "GET", path)
        assert (r.status, r.error) == (422, "validation_error") and "YYYY-MM" in r.json()["error"]["message"]
    r = await server.as_("acme", "GET", f"/v1/statements/{month}?format=pdf")
    assert (r.status, r.error) == (422, "validation_error")
    r = await server.admin("GET", f"/admin/distributors/nobody/statements/{month}")
    assert (r.status, r.error) == (404, "not_found")
    assert (await server.as_("acme", "GET", f"/admin/distributors/acme/statements/{month}")).error == "unauthorized"


async def test_limits_and_verification_over_http(server: Server) -> None:
    await server.shop()
    r = await server.admin("PUT", "/admin/distributors/acme/limits", json={"max_order_qty": 2, "daily": 3 * 9025})
    assert r.status == 200 and r.json() == {"max_order_qty": 2, "max_order_amount": 0, "daily": 3 * 9025,
                                            "monthly": 0, "spent_today": 0, "spent_this_month": 0}
    r = await server.as_("acme", "POST", "/v1/orders", json={**ORDER, "qty": 3})
    assert (r.status, r.error) == (403, "limit_exceeded")
    assert r.json()["error"]["message"] == "the order goes past the max_order_qty limit of acme: 2 left"
    assert (await server.as_("acme", "POST", "/v1/orders", json=ORDER)).status == 201
    r = await server.as_("acme", "POST", "/v1/orders", json={**ORDER, "external_ref": "po-2"})
    assert (r.status, r.error) == (403, "limit_exceeded") and "daily limit of acme: 9025 left" in r.text
    mine = (await server.as_("acme", "GET", "/v1/limits")).json()
    assert (mine["daily"], mine["spent_today"]) == (3 * 9025, 2 * 9025)
    r = await server.admin("PUT", "/admin/distributors/acme/limits", json={"daily": -1})
    assert (r.status, r.error) == (422, "validation_error") and "daily" in r.text
    assert (await server.admin("GET", "/admin/distributors/nobody/limits")).status == 404

    body = {"legal_name": "Wang Wu", "id_type": "passport", "id_number": "G98765432", "verified_by": "ops"}
    r = await server.admin("PUT", "/admin/distributors/beta/verification", json=body)
    assert r.status == 200 and r.json()["status"] == "verified" and r.json()["id_number_last4"] == "5432"
    assert "G98765432" not in r.text
    r = await server.admin("PUT", "/admin/distributors/beta/verification", json={**body, "id_type": "selfie"})
    assert (r.status, r.error) == (422, "validation_error") and "id_type" in r.text
    assert (await server.admin("GET", "/admin/distributors/beta/verification")).json()["legal_name"] == "Wang Wu"
    r = await server.admin("DELETE", "/admin/distributors/beta/verification")
    assert r.json() == {"status": "unverified", "legal_name": None, "id_type": None, "id_number_last4": None,
                        "verified_at": None, "verified_by": None}
    assert (await server.as_("beta", "GET", "/admin/distributors/beta/limits")).error == "unauthorized"


# ---- every error code of the contract --------------------------------------------------------

async def test_order_refusals(server: Server) -> None:
    await server.shop(codes=3)
    e = server.engine

    async def order(dist: str = "acme", **body: Any) -> Any:
        return await server.as_(dist, "POST", "/v1/orders", json={**ORDER, **body})

    r = await order(qty=4, external_ref="big")
    assert (r.status, r.error, r.json()["error"]["retryable"]) == (409, "out_of_stock", False)
    r = await order(sku="nope")
    assert (r.status, r.error) == (404, "unknown_sku")
    r = await order(max_unit_price=9000)
    assert (r.status, r.error) == (409, "price_changed")
    await e.create_distributor("poor", "Poor")
    server.keys["poor"] = await e.rotate_api_key("poor")
    r = await order("poor")
    assert (r.status, r.error) == (402, "insufficient_balance")
    await e.create_sku("other", "Other", 100, "CNY", 100)
    await e.update_distributor("beta", allowed_skus=["other"])
    r = await order("beta")
    assert (r.status, r.error) == (403, "sku_not_allowed")
    await e.update_distributor("beta", status="suspended")
    r = await order("beta", sku="other")
    assert (r.status, r.error) == (403, "distributor_suspended")
    r = await server.as_("acme", "GET", "/v1/orders/01M803FH5TSPEPDEGPXWW32DKT")
    assert (r.status, r.error) == (404, "not_found")
    assert (await e.balance("acme")).held == 0 and await e.audit() == []


async def test_validation_errors_name_the_field(server: Server) -> None:
    await server.shop()
    cases = [
        ({**ORDER, "color": "red"}, "color"),
        ({**ORDER, "qty": "2"}, "qty"),
        ({**ORDER, "qty": 0}, "qty"),
        ({**ORDER, "qty": True}, "qty"),
        ({**ORDER, "sku": "bad sku!"}, "sku"),
        ({"sku": "g100", "qty": 1}, "external_ref"),
        ({**ORDER, "external_ref": "x" * 129}, "external_ref"),
        ({**ORDER, "mode": "later"}, "mode"),
        ({**ORDER, "max_unit_price": 1.5}, "max_unit_price"),
        ([1, 2], "object"),
    ]
    for body, field in cases:
        r = await server.as_("acme", "POST", "/v1/orders", json=body)
        assert (r.status, r.error) == (422, "validation_error"), body
        assert field in r.json()["error"]["message"], (field, r.json())
    for raw in (b"{", b"not json", b"", b"\xff\xfe"):
        r = await server.as_("acme", "POST", "/v1/orders", body=raw, headers={"Content-Type": "application/json"})
        assert r.status == 422 and r.error == "validation_error", raw
    r = await server.as_("acme", "POST", "/v1/orders", json={**ORDER, "qty": 5000})
    assert (r.status, r.error) == (422, "validation_error")  # the engine's own limit, same shape
    r = await server.as_("acme", "GET", "/v1/balance?verbose=1")
    assert (r.status, r.error) == (422, "validation_error")
    r = await server.as_("acme", "GET", "/v1/orders?limit=1&limit=2")
    assert (r.status, r.error) == (422, "validation_error")
    r = await server.admin("POST", "/admin/skus", json={"sku": "x", "name": "", "face_value": 1, "currency": "USD",
                                                        "price": -1})
    assert (r.status, r.error) == (422, "validation_error")
    assert (await server.engine.balance("acme")).balance == 1_000_000


async def test_unauthorized(server: Server) -> None:
    await server.shop()
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic YTpi"},
                    {"Authorization": "Bearer"}, {"Authorization": f"Bearer {ADMIN}"}):
        r = await server.request("GET", "/v1/balance", headers=headers)
        assert (r.status, r.error) == (401, "unauthorized"), headers
        assert r.headers["www-authenticate"].startswith("Bearer")
    for token in (None, "wrong", server.keys["acme"], ADMIN + "x"):
        r = await server.request("GET", "/admin/skus/g100/stock", token=token)
        assert (r.status, r.error) == (401, "unauthorized"), token
    # unknown routes and ids that cannot be ids are 404 whoever asks
    for method, path in (("GET", "/nope"), ("GET", "/v1/tickets/t1"), ("POST", "/admin/tickets/t1/resolve"),
                         ("GET", "/v1/orders/not-an-order-id")):
        r = await server.request(method, path, token=server.keys["acme"])
        assert (r.status, r.error) == (404, "not_found"), path
    r = await server.request("DELETE", "/v1/orders/01M803FH5TSPEPDEGPXWW32DKT")
    assert (r.status, r.error, r.headers["allow"]) == (405, "method_not_allowed", "GET")
    r = await server.request("PUT", "/admin/skus")
    assert (r.status, r.headers["allow"]) == (405, "GET, POST")


async def test_admin_refused_without_a_token(make_server: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "dispatch.server"):
        s = await make_server(admin_token=None)
    assert "no admin_token is configured" in caplog.text
    for token in (None, "", "anything"):
        r = await s.request("GET", "/admin/skus/g100/stock", token=token)
        assert (r.status, r.error) == (401, "unauthorized")


async def test_rate_limit(make_server: Any) -> None:
    s = await make_server()
    await s.shop()
    await s.engine.set_rate_limit("acme", 3)
    conn = await Conn.open(s.port)
    statuses = [(await conn.request("GET", "/v1/balance", token=s.keys["acme"])) for _ in range(6)]
    limited = [r for r in statuses if r.status == 429]
    assert limited, "six requests at once got through a limit of 3 a second"
    assert all(r.error == "rate_limited" and r.json()["error"]["retryable"] for r in limited)
    assert all(1 <= int(r.headers["retry-after"]) <= 2 for r in limited)
    # other distributors are not affected; 0 lifts the limit (within auth_cache_ttl_s: 0 here)
    assert [(await conn.request("GET", "/v1/balance", token=s.keys["beta"])).status for _ in range(6)] == [200] * 6
    await s.engine.set_rate_limit("acme", 0)
    assert [(await conn.request("GET", "/v1/balance", token=s.keys["acme"])).status for _ in range(6)] == [200] * 6
    await conn.close()
    r = await s.admin("PATCH", "/admin/distributors/acme", json={"rate_limit": -1})
    assert (r.status, r.error) == (422, "validation_error")


async def test_store_unavailable(redis_factory: Any, tmp_path: Any) -> None:
    from .httpkit import start_server
    redis: RedisProcess = redis_factory()
    s = await start_server(redis.tcp_url, tmp_path, redis_timeout_s=0.5)
    try:
        await s.shop()
        assert (await s.request("GET", "/readyz")).status == 200
        redis.stop()
        r = await s.as_("acme", "POST", "/v1/orders", json=ORDER)
        assert (r.status, r.error) == (503, "store_unavailable")
        assert r.json()["error"]["retryable"] is True
        assert "127.0.0.1" not in r.json()["error"]["message"]  # nothing about the inside
        assert (await s.request("GET", "/readyz")).status == 503
        assert (await s.request("GET", "/healthz")).status == 200
    finally:
        await s.app.shutdown(2.0)


# ---- auth: key cache, signatures --------------------------------------------------------------

async def test_rotated_key_stops_working_within_the_cache_ttl(make_server: Any) -> None:
    s = await make_server(auth_cache_ttl_s=0.3)
    await s.shop(codes=0)
    old = s.keys["acme"]
    assert (await s.request("GET", "/v1/balance", token=old)).status == 200
    new = (await s.admin("POST", "/admin/distributors/acme/keys")).json()["api_key"]
    assert (await s.request("GET", "/v1/balance", token=new)).status == 200
    await asyncio.sleep(0.4)
    assert (await s.request("GET", "/v1/balance", token=old)).status == 401


async def test_signed_requests(make_server: Any) -> None:
    s = await make_server(require_signatures=True)
    await s.shop()
    key = s.keys["acme"]

    def signed(method: str, target: str, body: bytes, *, stamp: int | None = None, secret: str = key) -> dict[str, str]:
        ts = str(int(time.time()) if stamp is None else stamp)
        return {"X-Dispatch-Timestamp": ts, "X-Dispatch-Signature": sign(secret, ts, method, target, body)}

    body = b'{"sku": "g100", "qty": 1, "external_ref": "s-1"}'
    ctype = {"Content-Type": "application/json"}
    r = await s.request("POST", "/v1/orders", body=body, token=key, headers=ctype)
    assert (r.status, r.error) == (401, "unauthorized") and "signed" in r.json()["error"]["message"]
    headers = signed("POST", "/v1/orders", body)
    r = await s.request("POST", "/v1/orders", body=body, token=key, headers={**ctype, **headers})
    assert r.status == 201
    r = await s.request("POST", "/v1/orders", body=body, token=key, headers={**ctype, **headers})
    assert (r.status, r.error) == (401, "unauthorized") and "used before" in r.json()["error"]["message"]
    tampered = b'{"sku": "g100", "qty": 2, "external_ref": "s-2"}'
    r = await s.request("POST", "/v1/orders", body=tampered, token=key,
                        headers={**ctype, **signed("POST", "/v1/orders", body)})
    assert r.status == 401
    r = await s.request("POST", "/v1/orders", body=tampered, token=key,
                        headers={**ctype, **signed("POST", "/v1/orders", tampered, stamp=int(time.time()) - 120)})
    assert r.status == 401 and "within 60 s" in r.json()["error"]["message"]
    r = await s.request("POST", "/v1/orders", body=tampered, token=key,
                        headers={**ctype, **signed("POST", "/v1/orders", tampered, secret=s.keys["beta"])})
    assert r.status == 401
    target = "/v1/orders?external_ref=s-1"
    r = await s.request("GET", target, token=key, headers=signed("GET", target, b""))
    assert r.status == 200 and r.json()["external_ref"] == "s-1"
    r = await s.request("GET", "/v1/orders?external_ref=s-2", token=key, headers=signed("GET", target, b""))
    assert r.status == 401  # the query is signed too
    assert (await s.admin("GET", "/admin/skus/g100/stock")).status == 200  # admin requests are not signed


# ---- operations --------------------------------------------------------------------------------

async def test_health_openapi_and_metrics(server: Server) -> None:
    assert (await server.request("GET", "/healthz")).json() == {"status": "ok"}
    assert (await server.request("GET", "/readyz")).json() == {"status": "ready"}
    await server.shop()
    await server.as_("acme", "POST", "/v1/orders", json=ORDER)
    await server.as_("acme", "POST", "/v1/orders", json=ORDER)
    await server.as_("acme", "POST", "/v1/orders", json={**ORDER, "qty": 50, "external_ref": "big"})

    doc = (await server.request("GET", "/openapi.json")).json()
    assert doc["openapi"].startswith("3.")
    paths = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert paths == {(r.method, r.template) for r in server.app.router.routes}
    assert {"OrderRequest", "Order", "ErrorBody", "DistributorCreate", "BatchReport"} <= set(doc["components"]["schemas"])
    order_req = doc["components"]["schemas"]["OrderRequest"]
    assert order_req["required"] == ["sku", "qty", "external_ref"] and order_req["additionalProperties"] is False
    assert doc["paths"]["/v1/orders"]["post"]["responses"]["201"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Order"}

    r = await server.request("GET", "/metrics")
    assert r.status == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.body.decode()
    for line in ('dispatch_http_requests_total{method="POST",route="/v1/orders",status="201"} 1.0',
                 'dispatch_http_requests_total{method="POST",route="/v1/orders",status="200"} 1.0',
                 'dispatch_http_requests_total{method="POST",route="/v1/orders",status="409"} 1.0',
                 'dispatch_orders_total{outcome="delivered"} 1.0', 'dispatch_orders_total{outcome="replayed"} 1.0',
                 'dispatch_orders_total{outcome="out_of_stock"} 1.0', "dispatch_codes_delivered_total 2.0",
                 'dispatch_stock_codes{sku="g100",state="available"} 8.0',
                 'dispatch_stock_codes{sku="g100",state="sold"} 2.0',
                 'dispatch_stock_codes{sku="g100",state="parked"} 0.0',
                 'dispatch_webhook_deliveries{state="due"} 0.0', 'dispatch_webhook_deliveries{state="failed"} 0.0',
                 'dispatch_coalescer_batches_total{step="deliver"}', 'dispatch_coalescer_items_total{step="take"}'):
        assert line in text, line
    assert 'dispatch_http_request_duration_seconds_bucket{le="0.5",method="POST",route="/v1/orders",status="201"}' \
        in text
    assert 'dispatch_http_request_duration_seconds_bucket{le="+Inf",method="POST",route="/v1/orders",status="201"} 1.0' \
        in text
    assert 'dispatch_http_request_duration_seconds_count{method="POST",route="/v1/orders",status="201"} 1.0' in text


async def test_access_log_has_no_code_and_no_key(server: Server, caplog: pytest.LogCaptureFixture) -> None:
    await server.shop()
    with caplog.at_level(logging.INFO, "dispatch.access"):
        order = (await server.as_("acme", "POST", "/v1/orders", json=ORDER)).json()
        await server.as_("acme", "GET", f"/v1/orders/{order['order_id']}")
        await server.as_("acme", "POST", "/v1/orders", json={"bad": 1})
        await server.request("GET", "/nope")
        await server.admin("GET", "/admin/skus")
    lines = [rec.access for rec in caplog.records if rec.name == "dispatch.access"]
    assert len(lines) == 5
    first = lines[0]
    assert (first["method"], first["route"], first["status"], first["distributor"], first["admin"]) == (
        "POST", "/v1/orders", 201, "acme", None)
    assert (lines[4]["route"], lines[4]["status"], lines[4]["admin"], lines[4]["distributor"]) == (
        "/admin/skus", 200, "owner", None)  # the admin token's name: who did it
    assert lines[1]["route"] == "/v1/orders/{order_id}"
    assert lines[3]["route"] == "-"
    text = caplog.text
    for code in order["codes"]:
        assert code["code"] not in text
    assert server.keys["acme"] not in text and ADMIN not in text


async def test_replies_carry_every_field(server: Server) -> None:
    r = await server.admin("POST", "/admin/suppliers", json={"supplier": "bare", "name": "Bare"})
    assert r.status == 201 and r.json() == {"supplier": "bare", "name": "Bare", "deposit": 0, "status": "active"}
    r = await server.admin("POST", "/admin/skus", json={"sku": "s1", "name": "S", "face_value": 1, "currency": "USD",
                                                        "price": 1})
    r = await server.admin("PATCH", "/admin/skus/s1", json={"price": 2})
    assert r.json() == {"sku": "s1", "name": "S", "face_value": 1, "currency": "USD", "price": 2,
                        "low_stock_threshold": 0, "status": "active", "sale_order": "oldest_first",
                        "after_sales": "refund", "buckets": 1, "code_rule": None,
                        "pin_rule": None, "free": False, "min_shelf_life_s": 0}
    r = await server.admin("POST", "/admin/distributors", json={"distributor": "d1", "name": "D"})
    assert r.json()["distributor"] == {"distributor": "d1", "name": "D", "tier": None, "credit_limit": 0,
                                       "allowed_skus": None, "status": "active", "balance": 0, "held": 0,
                                       "rate_limit": 0}
    stock = (await server.admin("GET", "/admin/skus/s1/stock")).json()
    assert stock["parked"] == 0 and stock["forecast"]["days_of_cover"] is None


def test_one_json_log_stream(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from dispatch.server.supervisor import setup_logging

    from .conftest import make_config

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        setup_logging(make_config(tmp_path))
        logging.getLogger("httpx").info('HTTP Request: %s %s "%s"', "POST", "http://127.0.0.1:9/hooks", "HTTP/1.1 500")
        logging.getLogger("dispatch.access").info("GET / 404", extra={"access": {"route": "-", "status": 404}})
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logging.getLogger("dispatch.server").exception("internal error")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(x["logger"], x["level"]) for x in lines] == [("httpx", "info"), ("dispatch.access", "info"),
                                                          ("dispatch.server", "error")]
    assert lines[0]["msg"] == 'HTTP Request: POST http://127.0.0.1:9/hooks "HTTP/1.1 500"'
    assert (lines[1]["route"], lines[1]["status"]) == ("-", 404) and "msg" not in lines[1]
    assert "RuntimeError: boom" in lines[2]["exc"]


async def test_console_files_are_served_with_a_strict_policy(server: Server) -> None:
    r = await server.request("GET", "/console")
    assert r.status == 200 and r.headers["content-type"] == "text/html; charset=utf-8"
    assert b'<script type="module" src="/console/app.js">' in r.body
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe" not in csp
    assert (r.headers["x-content-type-options"], r.headers["x-frame-options"]) == ("nosniff", "DENY")
    slash = await server.request("GET", "/console/")  # as typed with a trailing slash
    assert (slash.status, slash.body, slash.headers["content-security-policy"]) == (200, r.body, csp)
    for name, kind in (("app.js", "text/javascript"), ("pages.js", "text/javascript"), ("console.css", "text/css")):
        r = await server.request("GET", f"/console/{name}")
        assert r.status == 200 and r.headers["content-type"].startswith(kind), name
        assert r.headers["content-security-policy"] == csp
    for path in ("/console/nope.js", "/console/..%2Fapp.py", "/console/__init__.py", "/console/app.js/x"):
        r = await server.request("GET", path)
        assert (r.status, r.error) == (404, "not_found"), path
    assert (await server.request("POST", "/console")).status == 405


async def test_an_import_that_is_not_text_is_refused_whole(server: Server) -> None:
    await server.shop(codes=0)
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 40
    noise = random.Random(7).randbytes(200_000).replace(b"\0", b"\1")
    controls = b"".join(b"AB\x01\x02\x03CD%04d\n" % i for i in range(100))
    for body, why in ((png, "NUL byte"), (noise, "not UTF-8"), (controls, "control or non-printable"),
                      (b"", "no codes"), (b"\n \n", "no codes")):
        r = await server.admin("POST", "/admin/batches?sku=g100&supplier=sup&unit_cost=9000&batch_id=junk",
                               body=body, headers={"Content-Type": "text/plain"})
        assert (r.status, r.error) == (422, "validation_error"), (why, r)
        assert why in r.json()["error"]["message"]
    assert (await server.engine.stock("g100")).accepted == 0
    report = (await server.admin("GET", "/admin/suppliers/sup/report")).json()
    assert report["batches"] == []
    # a body that is text is taken, its odd lines malformed one by one
    r = await server.admin("POST", "/admin/batches?sku=g100&supplier=sup&unit_cost=9000&batch_id=junk",
                           body=b"".join(b"GOOD%08d\n" % i for i in range(40)) + b"BAD\x01\n",
                           headers={"Content-Type": "text/plain"})
    assert r.status == 201 and (r.json()["accepted"], r.json()["malformed"]) == (40, 1)
    assert await server.engine.audit() == []


async def test_a_code_rule_set_over_http_makes_lines_malformed(server: Server) -> None:
    await server.shop(codes=0)
    r = await server.admin("PATCH", "/admin/skus/g100", json={"code_rule": {"charset": "hex", "min_length": 8}})
    assert r.status == 200 and r.json()["code_rule"] == {"min_length": 8, "max_length": None,
                                                          "charset": "hex", "pattern": None}
    r = await server.admin("PATCH", "/admin/skus/g100", json={"code_rule": {"charset": "emoji"}})
    assert (r.status, r.error) == (422, "validation_error") and "code_rule.charset" in r.json()["error"]["message"]
    r = await server.admin("POST", "/admin/batches?sku=g100&supplier=sup&unit_cost=9000",
                           body=b"DEADBEEF\nNOTHEX00\nABC\n", headers={"Content-Type": "text/plain"})
    assert r.status == 201, r
    assert r.json()["malformed_lines"] == [{"line": 2, "reason": "code has characters outside hex"},
                                           {"line": 3, "reason": "code shorter than 8 characters"}]
    r = await server.as_("acme", "GET", "/v1/skus")  # the catalog reads the rule back
    assert r.status == 200 and "g100" in [s["sku"] for s in r.json()["skus"]]


async def test_money_catalog_and_query_values_are_checked_by_field(server: Server) -> None:
    await server.shop(codes=0)
    sku = {"sku": "s1", "name": "S1", "face_value": 1000, "currency": "USD", "price": 900}
    for bad, field in (({"currency": "usd"}, "currency"), ({"currency": "XXY"}, "currency"),
                       ({"currency": "dollars!"}, "currency"), ({"price": 0}, "price"), ({"price": 652.5}, "price")):
        r = await server.admin("POST", "/admin/skus", json=sku | bad)
        assert (r.status, r.error) == (422, "validation_error"), bad
        assert field in r.json()["error"]["message"], (bad, r.json())
    # a whole number written as a float is the integer the schema asks for
    r = await server.admin("POST", "/admin/skus", json=sku | {"price": 652.0, "face_value": 1000.0})
    assert r.status == 201 and r.json()["price"] == 652
    r = await server.admin("POST", "/admin/skus", json=sku | {"sku": "gift", "price": 0, "free": True})
    assert r.status == 201 and r.json()["free"] is True
    r = await server.admin("PATCH", "/admin/skus/s1", json={"price": 0})  # the SKU is not free: a conflict
    assert (r.status, r.error) == (409, "conflict") and "price" in r.json()["error"]["message"]
    r = await server.admin("PATCH", "/admin/skus/s1", json={"price": 0, "free": True})
    assert r.status == 200 and (r.json()["price"], r.json()["free"]) == (0, True)
    for path, field in (("/admin/orders/export?to=0.5", "to"), ("/admin/ledger/export?from=1700000000", "from"),
                        ("/admin/events?stream=sku:g100&after=1-99999999999999999999", "after")):
        r = await server.admin("GET", path)
        assert (r.status, r.error) == (422, "validation_error"), path
        assert field in r.json()["error"]["message"]
    r = await server.admin("GET", "/admin/events?stream=sku:g100&after=18446744073709551615-0")
    assert r.status == 200
    assert (await server.admin("GET", "/admin/orders/export?to=2030-01-01T00:00:00Z")).status == 200
