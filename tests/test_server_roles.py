"""Admin roles and the audit trail, through real sockets against a real redis-server:
named tokens and what each role may write, revocation seen at once by another daemon,
before -> after in the trail, no secret in it, and its pages and filters."""

from __future__ import annotations

import getpass
from typing import Any

import redis

from dispatch.store import keys

from .httpkit import ADMIN, Server, make_server, server  # noqa: F401  (fixtures)


async def _tokens(server: Server, *roles: str) -> dict[str, str]:
    """A named token per role (named after it), made by the owner over HTTP."""
    made = {}
    for role in roles:
        r = await server.admin("POST", "/admin/tokens", json={"name": f"{role}-1", "role": role})
        assert r.status == 201, r
        assert r.json()["token"] == {"name": f"{role}-1", "role": role, "created_at": r.json()["token"]["created_at"],
                                     "created_by": "owner"}
        made[role] = r.json()["secret"]
    return made


def _trail(server: Server) -> list[dict[bytes, bytes]]:
    """Every entry of the trail as Redis holds it, oldest first."""
    url = server.engine.config.redis_url
    with redis.Redis.from_url(url) as r:
        return [f for _, f in r.xrange(keys.TRAIL)]


async def _entries(server: Server, query: str = "", token: str = ADMIN) -> dict[str, Any]:
    r = await server.request("GET", "/admin/audit" + query, token=token)
    assert r.status == 200, r
    return r.json()


async def test_each_role_writes_what_it_may_and_is_refused_the_rest(server: Server) -> None:
    await server.shop(codes=2)
    t = await _tokens(server, "viewer", "operator", "finance", "owner")

    async def call(role: str, method: str, path: str, **kw: Any) -> Any:
        return await server.request(method, path, token=t[role], **kw)

    sku_patch = ("PATCH", "/admin/skus/g100", {"price": 9900})
    topup = ("POST", "/admin/distributors/acme/topup", {"amount": 500, "reference": "pay-1"})
    suspend = ("PATCH", "/admin/distributors/beta", {"status": "suspended"})
    credit = ("PATCH", "/admin/distributors/beta", {"credit_limit": 7000})
    limits = ("PUT", "/admin/distributors/acme/limits", {"daily": 50_000})
    token = ("POST", "/admin/tokens", {"name": "late", "role": "viewer"})
    allowed = {"viewer": set(), "operator": {"sku", "suspend"}, "finance": {"topup", "credit", "limits"},
               "owner": {"sku", "topup", "suspend", "credit", "limits", "token"}}
    needs = {"sku": "operator", "topup": "finance", "suspend": "operator", "credit": "finance", "limits": "finance",
             "token": "owner"}
    for role in ("viewer", "operator", "finance", "owner"):
        for what, (method, path, body) in dict(sku=sku_patch, topup=topup, suspend=suspend, credit=credit,
                                                limits=limits, token=token).items():
            read = path.removesuffix("/topup")  # each write's target has a read
            before = (await server.admin("GET", read)).body
            r = await call(role, method, path, json=body)
            if what in allowed[role]:
                assert r.status in (200, 201), (role, what, r)
                if what == "token":  # made once: the next role would conflict
                    await server.admin("DELETE", "/admin/tokens/late")
                continue
            assert (r.status, r.error) == (403, "forbidden"), (role, what, r)
            message = r.json()["error"]["message"]
            assert needs[what] in message.partition(" needs ")[2] and f"is {role}" in message, message
            after = (await server.admin("GET", read)).body
            assert after == before, (role, what)  # a refused write changed nothing
        assert (await call(role, "GET", "/admin/skus/g100")).status == 200  # every role reads
    # the refusals are in the trail, each with its actor, nothing read
    refused = (await _entries(server, "?actor=viewer-1"))["entries"]
    assert len(refused) == 6 and {e["outcome"] for e in refused} == {"forbidden"}
    assert {e["action"] for e in refused} == {"update_sku", "topup", "update_distributor", "set_limits",
                                              "create_token"}
    assert all(e["before"] is None and e["after"] is None for e in refused)
    assert {e["target"] for e in refused} == {"sku:g100", "distributor:acme", "distributor:beta", "-"}
    # what money needs within an operator's write, and the parts only the owner has
    r = await call("operator", "POST", "/admin/suppliers", json={"supplier": "s2", "name": "S", "deposit": 100})
    assert (r.status, r.error) == (403, "forbidden") and "finance" in r.json()["error"]["message"]
    assert (await call("operator", "POST", "/admin/suppliers", json={"supplier": "s2", "name": "S"})).status == 201
    r = await call("operator", "PATCH", "/admin/distributors/acme", json={"status": "active", "credit_limit": 1})
    assert r.status == 403 and "credit limit" in r.json()["error"]["message"]
    for role, status in (("viewer", 403), ("finance", 403), ("owner", 200)):
        assert (await call(role, "GET", "/admin/orders/export?codes=plain")).status == status
    assert (await call("viewer", "GET", "/admin/orders/export")).status == 200  # codes masked
    assert (await call("operator", "GET", "/admin/tokens")).status == 403
    # no token, an unknown one: 401 as before
    assert (await server.request("GET", "/admin/skus")).status == 401
    r = await server.request("POST", "/admin/skus", token="adm_nobody")
    assert (r.status, r.error) == (401, "unauthorized")


async def test_tickets_reject_by_operator_approve_by_finance(server: Server) -> None:
    await server.shop(codes=5)
    t = await _tokens(server, "operator", "finance")
    order = (await server.as_("acme", "POST", "/v1/orders", json={"sku": "g100", "qty": 2,
                                                                   "external_ref": "po-1"})).json()
    ids = [(await server.as_("acme", "POST", "/v1/tickets", json={"order_id": order["order_id"], "code": c["code"],
                                                                  "reason": "used"})).json()["ticket_id"]
           for c in order["codes"]]
    path = "/admin/tickets/{}/resolve"
    r = await server.request("POST", path.format(ids[0]), token=t["operator"], json={"decision": "approve"})
    assert (r.status, r.error) == (403, "forbidden") and "finance" in r.json()["error"]["message"]
    assert (await server.admin("GET", f"/admin/tickets/{ids[0]}")).json()["status"] == "open"
    r = await server.request("POST", path.format(ids[0]), token=t["operator"], json={"decision": "reject"})
    assert (r.status, r.json()["status"]) == (200, "rejected")
    r = await server.request("POST", path.format(ids[1]), token=t["finance"],
                             json={"decision": "approve", "replace": True})
    assert (r.status, r.json()["outcome"]) == (200, "replaced")
    replacement = r.json()["replacement"]["code"]
    [approved] = (await _entries(server, f"?target=ticket:{ids[1]}"))["entries"]
    assert (approved["actor"], approved["action"], approved["outcome"]) == ("finance-1", "resolve_ticket", "ok")
    assert (approved["before"]["status"], approved["after"]["status"]) == ("open", "approved")
    assert "code" not in approved["after"]["replacement"]  # the new code is its buyer's only
    blob = b"".join(v for f in _trail(server) for v in f.values())
    assert all(c["code"].encode() not in blob for c in order["codes"]) and replacement.encode() not in blob


async def test_a_revoked_token_is_refused_at_once_by_another_daemon(make_server: Any) -> None:
    a = await make_server()
    # a second daemon on the same Redis, its API keys cached for a minute: admin tokens never are
    b = await make_server(auth_cache_ttl_s=60.0, master_key=a.engine.config.master_key)
    [secret] = (await _tokens(a, "operator")).values()
    assert (await b.request("GET", "/admin/tokens", token=secret)).status == 403
    assert (await b.request("GET", "/admin/skus", token=secret)).status == 200
    listed = (await a.admin("GET", "/admin/tokens")).json()["tokens"]
    assert [x["name"] for x in listed] == ["operator-1"] and secret not in str(listed)
    r = await a.admin("DELETE", "/admin/tokens/operator-1")
    assert (r.status, r.json()["name"]) == (200, "operator-1")
    r = await b.request("GET", "/admin/skus", token=secret)
    assert (r.status, r.error) == (401, "unauthorized")
    assert (await a.admin("DELETE", "/admin/tokens/operator-1")).status == 404
    for bad in ({"name": "owner", "role": "viewer"}, {"name": "x", "role": "root"}, {"name": "a b", "role": "viewer"}):
        assert (await a.admin("POST", "/admin/tokens", json=bad)).status == 422, bad
    assert (await a.admin("POST", "/admin/tokens", json={"name": "v", "role": "viewer"})).status == 201
    assert (await a.admin("POST", "/admin/tokens", json={"name": "v", "role": "owner"})).status == 409


async def test_the_trail_holds_before_and_after_and_never_a_secret(server: Server) -> None:
    await server.shop(codes=3)
    t = await _tokens(server, "finance", "operator")
    ops, fin = t["operator"], t["finance"]
    r = await server.request("POST", "/admin/distributors/acme/topup", token=fin,
                             json={"amount": 2500, "reference": "pay-7"})
    assert r.status == 200
    r = await server.request("PATCH", "/admin/skus/g100", token=ops, json={"price": 9900, "name": "G100"})
    assert r.status == 200
    r = await server.request("PATCH", "/admin/distributors/beta", token=ops, json={"status": "suspended"})
    assert r.status == 200
    r = await server.request("POST", "/admin/distributors", token=ops, json={"distributor": "new", "name": "New"})
    api_key = r.json()["api_key"]
    rotated = (await server.request("POST", "/admin/distributors/new/keys", token=ops)).json()["api_key"]
    r = await server.request("PUT", "/admin/distributors/new/verification", token=ops,
                             json={"legal_name": "Li Lei", "id_type": "national_id", "id_number": "110101199003077777",
                                   "verified_by": "desk"})
    assert r.status == 200
    hook = (await server.request("PUT", "/admin/distributors/new/webhook", token=ops,
                                 json={"url": "http://127.0.0.1:9/h"})).json()["secret"]
    r = await server.request("POST", "/admin/distributors/ghost/topup", token=fin,
                             json={"amount": 1, "reference": "x"})
    assert (r.status, r.error) == (404, "not_found")

    entries = {(e["action"], e["target"]): e for e in reversed((await _entries(server))["entries"])}  # latest
    top = entries[("topup", "distributor:acme")]
    assert (top["actor"], top["via"], top["outcome"]) == ("finance-1", "POST /admin/distributors/{distributor}/topup",
                                                         "ok")
    assert (top["before"]["balance"], top["after"]["balance"]) == (1_000_000, 1_002_500)
    sku = entries[("update_sku", "sku:g100")]
    assert (sku["before"]["price"], sku["after"]["price"], sku["after"]["name"]) == (9500, 9900, "G100")
    beta = entries[("update_distributor", "distributor:beta")]
    assert (beta["before"]["status"], beta["after"]["status"], beta["actor"]) == ("active", "suspended", "operator-1")
    made = entries[("create_admin_token", "admin_token:operator-1")]
    assert made["before"] is None and made["after"]["role"] == "operator" and made["actor"] == "owner"
    created = entries[("create_distributor", "distributor:new")]
    assert created["before"] is None and created["after"]["balance"] == 0
    kyc = entries[("verify", "verification:new")]
    assert (kyc["before"]["status"], kyc["after"]["status"], kyc["after"]["id_number_last4"]) == (
        "unverified", "verified", "7777")
    failed = entries[("topup", "distributor:ghost")]
    assert (failed["outcome"], failed["before"], failed["after"]) == ("not_found", None, None)
    assert entries[("set_webhook", "webhook:new")]["after"]["url"] == "http://127.0.0.1:9/h"

    blob = b"".join(v for f in _trail(server) for v in f.values())
    for secret in (api_key, rotated, hook, ADMIN, ops, fin, "110101199003077777", "Li Lei", *server.keys.values()):
        assert secret.encode() not in blob, secret
    # the trail is a stream appended to: nothing in it changes afterwards
    before = _trail(server)
    await server.request("PATCH", "/admin/skus/g100", token=ops, json={"price": 9800})
    assert _trail(server)[:len(before)] == before


async def test_pages_and_filters(server: Server) -> None:
    await server.engine.create_sku("g1", "G", 100, "CNY", 90)  # by the engine: actor engine:<user>
    for i in range(6):
        assert (await server.admin("PATCH", "/admin/skus/g1", json={"price": 100 + i})).status == 200
    pages, cursor = [], None
    while True:
        page = await _entries(server, "?actor=owner&limit=4" + (f"&cursor={cursor}" if cursor else ""))
        pages.append([e["after"]["price"] for e in page["entries"]])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == [[105, 104, 103, 102], [101, 100]]  # the most recent first
    everything = (await _entries(server, "?target=g1"))["entries"]
    assert len(everything) == 7 and everything[-1]["actor"] == f"engine:{getpass.getuser()}"
    assert everything[-1]["via"] == "engine" and everything[-1]["action"] == "create_sku"
    assert (await _entries(server, "?target=sku:nope"))["entries"] == []
    middle = everything[3]["at"].replace("+00:00", "Z")
    older = (await _entries(server, f"?to={middle}"))["entries"]
    assert all(e["at"] < everything[3]["at"] for e in older) and len(older) < 7
    newer = (await _entries(server, f"?from={middle}"))["entries"]
    assert len(newer) + len(older) == 7
    assert (await server.request("GET", "/admin/audit?cursor=nope", token=ADMIN)).status == 422
    assert (await _entries(server, "?cursor=0-0"))["entries"] == []
    assert (await _entries(server, "?to=1970-01-01T00:00:00Z"))["entries"] == []
    [viewer] = (await _tokens(server, "viewer")).values()
    assert len((await _entries(server, "?limit=2", token=viewer))["entries"]) == 2  # a viewer reads the trail


async def test_the_document_names_each_route_s_roles(server: Server) -> None:
    doc = (await server.request("GET", "/openapi.json")).json()
    topup = doc["paths"]["/admin/distributors/{distributor}/topup"]["post"]
    assert topup["x-roles"] == ["finance", "owner"] and "403" in topup["responses"]
    assert doc["paths"]["/admin/skus"]["get"]["x-roles"] == ["owner", "viewer"]
    assert {"post", "get"} <= set(doc["paths"]["/admin/tokens"]) and "get" in doc["paths"]["/admin/audit"]
    assert "forbidden (403)" in topup["responses"]["default"]["description"]
