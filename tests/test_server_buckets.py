"""A SKU's buckets through the admin API: set at creation, changed by PATCH, refused
with a 422 naming the field when out of range."""

from __future__ import annotations

from .httpkit import Server, make_server, server  # noqa: F401  (fixtures)


async def test_buckets_through_the_admin_api(server: Server) -> None:
    r = await server.admin("POST", "/admin/skus", json={"sku": "hot", "name": "Hot", "face_value": 100,
                                                        "currency": "CNY", "price": 90, "buckets": 2})
    assert r.status == 201 and r.json()["buckets"] == 2
    for bad in (0, 17, "4"):
        r = await server.admin("PATCH", "/admin/skus/hot", json={"buckets": bad})
        assert (r.status, r.error) == (422, "validation_error") and "buckets" in r.json()["error"]["message"]
    r = await server.admin("PATCH", "/admin/skus/hot", json={"buckets": 4})
    assert r.status == 200 and r.json()["buckets"] == 4
    r = await server.admin("GET", "/admin/skus/hot/stock")
    assert r.status == 200 and (r.json()["available"], r.json()["stock_status"]) == (0, "out_of_stock")
