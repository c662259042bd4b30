"""After-sales through the daemon: real sockets, a real redis-server. Tickets with
isolation between distributors, supplier endpoints, events, CSV exports."""

from __future__ import annotations

import csv
import io
from typing import Any

from dispatch.webhooks import verify_signature

from .httpkit import Server, make_server, server  # noqa: F401  (fixtures)
from .test_webhooks import receivers, status  # noqa: F401  (fixtures)


async def _bought(server: Server, dist: str = "acme", qty: int = 2, ref: str = "po-1") -> dict[str, Any]:
    r = await server.as_(dist, "POST", "/v1/orders", json={"sku": "g100", "qty": qty, "external_ref": ref})
    assert r.status == 201
    return r.json()


async def test_ticket_endpoints_and_isolation(server: Server) -> None:
    await server.shop()
    order = await _bought(server)
    claim = {"order_id": order["order_id"], "code": order["codes"][0]["code"], "reason": "already redeemed"}
    r = await server.as_("acme", "POST", "/v1/tickets", json=claim)
    assert r.status == 201 and r.json()["status"] == "open" and r.json()["code_index"] == 0
    tid = r.json()["ticket_id"]
    assert r.json()["distributor"] is None  # a distributor sees its own tickets: the field is there, empty

    r = await server.as_("acme", "POST", "/v1/tickets", json=claim)
    assert (r.status, r.error) == (409, "already_claimed")
    assert tid in r.json()["error"]["message"]
    r = await server.as_("beta", "POST", "/v1/tickets", json=claim)  # not beta's order
    assert (r.status, r.error) == (404, "not_found")
    r = await server.as_("beta", "GET", f"/v1/tickets/{tid}")
    assert (r.status, r.error) == (404, "not_found")
    r = await server.as_("beta", "GET", "/v1/tickets")
    assert r.status == 200 and r.json()["tickets"] == []
    r = await server.as_("acme", "GET", "/v1/tickets?status=open")
    assert [t["ticket_id"] for t in r.json()["tickets"]] == [tid]

    for body, error in (({**claim, "code": "NOPE"}, "validation_error"),
                        ({**claim, "reason": ""}, "validation_error"),
                        ({**claim, "extra": 1}, "validation_error"),
                        ({"order_id": "not-an-id", "code": "x", "reason": "y"}, "validation_error")):
        r = await server.as_("acme", "POST", "/v1/tickets", json=body)
        assert (r.status, r.error) == (422, error), body

    r = await server.admin("GET", "/admin/tickets?status=open")
    assert [(t["ticket_id"], t["distributor"]) for t in r.json()["tickets"]] == [(tid, "acme")]
    r = await server.admin("POST", f"/admin/tickets/{tid}/resolve", json={"decision": "maybe"})
    assert (r.status, r.error) == (422, "validation_error")
    r = await server.admin("POST", f"/admin/tickets/{tid}/resolve", json={"decision": "approve", "note": "ok"})
    assert r.status == 200 and (r.json()["status"], r.json()["outcome"], r.json()["refund"]) == (
        "approved", "refund", 9025)
    r = await server.admin("POST", f"/admin/tickets/{tid}/resolve", json={"decision": "reject"})
    assert (r.status, r.error) == (409, "conflict")
    r = await server.as_("acme", "GET", f"/v1/tickets/{tid}")
    assert r.json()["status"] == "approved"
    r = await server.as_("acme", "GET", f"/v1/orders/{order['order_id']}")
    assert (r.json()["status"], r.json()["refunded"]) == ("partially_refunded", 9025)
    r = await server.admin("POST", "/admin/tickets/tk_01M803FH5TSPEPDEGPXWW32DKT/resolve", json={"decision": "reject"})
    assert (r.status, r.error) == (404, "not_found")
    r = await server.request("POST", "/v1/tickets", json=claim)
    assert (r.status, r.error) == (401, "unauthorized")


async def test_replacement_code_is_shown_only_to_its_buyer(server: Server) -> None:
    await server.shop()
    r = await server.admin("PATCH", "/admin/skus/g100", json={"after_sales": "replace", "sale_order": "best_rated"})
    assert r.status == 200 and (r.json()["after_sales"], r.json()["sale_order"]) == ("replace", "best_rated")
    order = await _bought(server, qty=1)
    r = await server.as_("acme", "POST", "/v1/tickets", json={"order_id": order["order_id"],
                                                               "code": order["codes"][0]["code"], "reason": "bad"})
    tid = r.json()["ticket_id"]
    r = await server.admin("POST", f"/admin/tickets/{tid}/resolve", json={"decision": "approve"})
    replacement = r.json()["replacement"]["code"]
    assert r.json()["outcome"] == "replaced" and replacement != order["codes"][0]["code"]
    assert (await server.as_("acme", "GET", f"/v1/tickets/{tid}")).json()["replacement"]["code"] == replacement
    events = (await server.admin("GET", "/admin/events?stream=dist:acme")).json()["events"]
    assert [e["type"] for e in events] == ["order.delivered", "ticket.opened", "ticket.approved"]
    assert all(replacement not in str(e) and order["codes"][0]["code"] not in str(e) for e in events)
    page = (await server.admin("GET", "/admin/events?stream=dist:acme&limit=2")).json()
    assert len(page["events"]) == 2 and page["next_after"] == page["events"][1]["event_id"]
    rest = (await server.admin("GET", f"/admin/events?stream=dist:acme&after={page['next_after']}")).json()
    assert [e["type"] for e in rest["events"]] == ["ticket.approved"]
    r = await server.admin("GET", "/admin/events?stream=nobody")
    assert (r.status, r.error) == (422, "validation_error")


async def test_supplier_endpoints(server: Server) -> None:
    await server.shop()
    r = await server.admin("POST", "/admin/suppliers/sup/deposit", json={"amount": 5000, "reference": "w1"})
    assert r.status == 200 and r.json()["deposit"] == 5000
    r = await server.admin("POST", "/admin/suppliers/sup/deposit", json={"amount": 6000, "reference": "w1"})
    assert (r.status, r.error) == (409, "idempotency_conflict")
    r = await server.admin("POST", "/admin/suppliers/ghost/deposit", json={"amount": 1, "reference": "w"})
    assert (r.status, r.error) == (404, "not_found")
    await _bought(server, qty=3)
    r = await server.admin("GET", "/admin/suppliers/sup/report")
    report = r.json()
    assert (report["delivered"], report["invalidated"], report["rating"], report["status"]) == (3, 0, 100.0, "active")
    assert report["batches"][0]["batch_id"] == "b1" and report["batches"][0]["delivered"] == 3

    r = await server.admin("PATCH", "/admin/suppliers/sup", json={"status": "blacklisted", "reason": "fraud"})
    assert r.status == 200 and r.json()["status"] == "blacklisted"
    r = await server.admin("GET", "/admin/skus/g100/stock")
    assert (r.json()["available"], r.json()["parked"], r.json()["stock_status"]) == (0, 7, "out_of_stock")
    assert r.json()["forecast"]["daily_velocity"] == 3.0
    r = await server.as_("acme", "POST", "/v1/orders", json={"sku": "g100", "qty": 1, "external_ref": "po-2"})
    assert (r.status, r.error) == (409, "out_of_stock")
    r = await server.admin("POST", "/admin/batches?sku=g100&supplier=sup&unit_cost=1", body=b"NEWCODE000000001\n",
                           headers={"Content-Type": "text/plain"})
    assert (r.status, r.error) == (409, "supplier_blacklisted")
    r = await server.admin("PATCH", "/admin/suppliers/sup", json={"status": "nope"})
    assert (r.status, r.error) == (422, "validation_error")
    r = await server.admin("PATCH", "/admin/suppliers/sup", json={"status": "active"})
    assert r.json()["status"] == "active"
    assert (await server.admin("GET", "/admin/skus/g100/stock")).json()["available"] == 7
    r = await server.admin("GET", "/admin/suppliers")
    assert [s["supplier"] for s in r.json()["suppliers"]] == ["sup"]
    events = (await server.admin("GET", "/admin/events?stream=supplier:sup")).json()["events"]
    assert [(e["type"], e["version"]) for e in events] == [("supplier.blacklisted", 1), ("supplier.reinstated", 2)]


async def test_exports_mask_codes_unless_asked(server: Server) -> None:
    await server.shop()
    order = await _bought(server, qty=2)
    codes = [c["code"] for c in order["codes"]]
    r = await server.admin("GET", "/admin/orders/export")
    assert r.status == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.body.decode())))
    assert rows[0]["codes"].split() == ["*" * 12 + c[-4:] for c in codes]
    r = await server.admin("GET", "/admin/orders/export?codes=plain")
    assert list(csv.DictReader(io.StringIO(r.body.decode())))[0]["codes"].split() == codes
    r = await server.admin("GET", "/admin/orders/export?codes=all")
    assert (r.status, r.error) == (422, "validation_error")
    r = await server.as_("acme", "GET", "/admin/orders/export?codes=plain")
    assert (r.status, r.error) == (401, "unauthorized")
    r = await server.admin("GET", "/admin/ledger/export")
    ledger = list(csv.DictReader(io.StringIO(r.body.decode())))
    balance = (await server.as_("acme", "GET", "/v1/balance")).json()["balance"]
    assert sum(int(e["amount"]) for e in ledger if e["party"] == "acme") == balance
    r = await server.admin("GET", "/admin/ledger/export?from=2100-01-01T00:00:00Z")
    assert r.body.decode().strip().splitlines() == ["party_type,party,entry,kind,ref,amount,held_delta,balance,held,at"]


async def test_webhooks_through_the_daemon(make_server: Any, receivers: Any) -> None:
    server = await make_server(webhook_max_attempts=1)
    await server.shop()
    everything, own = await receivers(), await receivers(status(500))
    r = await server.admin("PUT", "/admin/webhook", json={"url": everything.url})
    admin_secret = r.json()["secret"]
    r = await server.admin("PUT", "/admin/distributors/acme/webhook", json={"url": own.url})
    assert r.status == 200 and r.json()["secret"].startswith("whsec_")
    acme_secret = r.json()["secret"]
    for path, body, want in (("/admin/distributors/acme/webhook", {"url": "ftp://x"}, (422, "validation_error")),
                             ("/admin/distributors/ghost/webhook", {"url": own.url}, (404, "not_found")),
                             ("/admin/webhook", {"url": own.url, "x": 1}, (422, "validation_error"))):
        r = await server.admin("PUT", path, json=body)
        assert (r.status, r.error) == want, path
    r = await server.admin("GET", "/admin/distributors/acme/webhook")
    assert r.json()["url"] == own.url and "secret" not in r.body.decode()

    order = await _bought(server)
    hooks = server.engine.webhooks
    await hooks.pump()
    await hooks.deliver_due()
    delivered = [q for q in everything.ok() if q.json["type"] == "order.delivered"]
    assert len(delivered) == 1 and verify_signature(admin_secret, delivered[0].headers["x-dispatch-signature"],
                                                    delivered[0].body)
    assert delivered[0].json["data"]["order_id"] == order["order_id"]
    assert order["codes"][0]["code"] not in delivered[0].body.decode()

    r = await server.admin("GET", "/admin/webhooks/failed")
    [failed] = r.json()["deliveries"]
    assert (failed["target"], failed["type"], failed["last_error"]) == ("dist:acme", "order.delivered", "HTTP 500")
    own.respond = status()  # the receiver is fixed
    r = await server.admin("POST", f"/admin/webhooks/failed/{failed['job_id']}/replay")
    assert r.status == 200 and r.json() == {"replayed": 1}
    await hooks.deliver_due()
    [got] = own.ok()
    assert verify_signature(acme_secret, got.headers["x-dispatch-signature"], got.body)
    assert (got.json["type"], got.json["version"]) == ("order.delivered", 1)
    assert (await server.admin("GET", "/admin/webhooks/failed")).json()["deliveries"] == []
    r = await server.admin("POST", f"/admin/webhooks/failed/{failed['job_id']}/replay")
    assert (r.status, r.error) == (404, "not_found")
    assert (await server.admin("DELETE", "/admin/distributors/acme/webhook")).status == 200
    r = await server.admin("DELETE", "/admin/distributors/acme/webhook")
    assert (r.status, r.error) == (404, "not_found")
