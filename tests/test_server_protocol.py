"""The HTTP protocol layer: keep-alive, pipelining, limits, timeouts and hostile clients.

Most tests go through a real socket; a few feed raw bytes to the protocol object,
built from its limits, a shared state and a small handler.
Timeouts are configured small and only bound how long a test waits."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

from dispatch.config import Config
from dispatch.errors import NotFoundError
from dispatch.server.protocol import HttpProtocol, Limits, ServerState
from dispatch.server.request import Request
from dispatch.server.responses import Reply, json_reply

from .httpkit import ADMIN, Conn, Server, build, make_server, server  # noqa: F401  (fixtures)

HEALTH = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"


async def test_keep_alive_and_pipelined_requests_answered_in_order(server: Server) -> None:
    await server.shop()
    key = server.keys["acme"]
    order = {"sku": "g100", "qty": 1, "external_ref": "p-1"}
    conn = await Conn.open(server.port)
    conn.send(build("POST", "/v1/orders", json=order, token=key)
              + build("GET", "/v1/orders?external_ref=p-1", token=key)
              + HEALTH
              + build("POST", "/v1/orders", json={**order, "external_ref": "p-2"}, token=key)
              + build("GET", "/nope")
              + build("POST", "/v1/orders", json=order, token=key))
    got = await conn.responses(6)
    assert [r.status for r in got] == [201, 200, 200, 201, 404, 200]
    assert got[1].json()["order_id"] == got[0].json()["order_id"] == got[5].json()["order_id"]
    assert got[3].json()["external_ref"] == "p-2"
    # the connection is still good afterwards
    assert (await conn.request("GET", "/healthz")).status == 200
    assert not conn.eof
    await conn.close()


async def test_a_deep_pipeline_is_answered_whole(server: Server) -> None:
    conn = await Conn.open(server.port)
    conn.send(HEALTH * 300 + b"BROKEN\r\n\r\n")
    got = await conn.responses(302)
    assert [r.status for r in got] == [200] * 300 + [400]
    assert await conn.closed_by_server()


async def test_malformed_http_is_a_400_and_the_connection_closes(server: Server) -> None:
    for raw in (b"GET /healthz HTTP/1.1\r\nHost t\r\n\r\n",         # header without a colon
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",    # a TLS hello
                b"GET /healthz HTTP/9.9\r\n\r\n",
                b"POST /v1/orders HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
                b"POST /v1/orders HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"):
        conn = await Conn.open(server.port)
        conn.send(raw)
        got = await conn.responses(1)
        assert [(r.status, r.error) for r in got] == [(400, "bad_request")], raw
        assert got[0].headers["connection"] == "close"
        assert await conn.closed_by_server()


async def test_limits_are_413(make_server: Any) -> None:
    s = await make_server(max_header_bytes=1024, max_body_bytes=1024, max_import_bytes=4096)
    await s.shop(codes=0)
    cases = [
        build("GET", "/healthz", headers={"X-Big": "a" * 2000}),
        build("GET", "/" + "a" * 2000),
        build("POST", "/v1/orders", body=b"x" * 2000, token=s.keys["acme"]),
        b"POST /v1/orders HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + b"400\r\n" + b"x" * 1024 + b"\r\n"
        + b"10\r\n" + b"x" * 16 + b"\r\n0\r\n\r\n",
        build("POST", "/admin/batches?sku=g100&supplier=sup&unit_cost=1", body=b"CODE1234\n" * 1000, token=ADMIN,
              headers={"Content-Type": "text/plain"}),
    ]
    for raw in cases:
        conn = await Conn.open(s.port)
        conn.send(raw)
        got = await conn.responses(1)
        assert [(r.status, r.error) for r in got] == [(413, "payload_too_large")], raw[:80]
        assert await conn.closed_by_server()
    # an upload without a length is cut at the limit as it streams
    conn = await Conn.open(s.port)
    conn.send(b"POST /admin/batches?sku=g100&supplier=sup&unit_cost=1 HTTP/1.1\r\nAuthorization: Bearer "
              + ADMIN.encode() + b"\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n")
    for i in range(8):
        block = b"".join(b"LONGCODE%08d\n" % (i * 100 + j) for j in range(40))
        conn.send(b"%x\r\n%b\r\n" % (len(block), block))
    got = await conn.responses(1)
    assert [(r.status, r.error) for r in got] == [(413, "payload_too_large")]
    assert await conn.closed_by_server()
    # below the limits all is well
    conn = await Conn.open(s.port)
    r = await conn.request("POST", "/admin/batches?sku=g100&supplier=sup&unit_cost=1&batch_id=ok",
                           body=b"CODE1234\n" * 100, token=ADMIN, headers={"Content-Type": "text/plain"})
    assert r.status == 201 and r.json()["accepted"] == 1 and r.json()["duplicate"] == 99


async def dribbled_until_closed(conn: Conn, byte: bytes = b"a", sends: int = 30) -> bool:
    """Send *byte* every 0.1 s until the server closes (True), at most *sends* times."""
    for _ in range(sends):
        conn.send(byte)
        try:
            return await conn.closed_by_server(timeout=0.1)
        except asyncio.TimeoutError:
            pass
    return False


async def test_slow_clients_are_dropped(make_server: Any) -> None:
    s = await make_server(header_timeout_s=0.3, body_timeout_s=0.3, keepalive_timeout_s=0.3)
    await s.shop()
    # headers dribbled: the first byte starts the clock, a byte every 0.1 s does not move it
    conn = await Conn.open(s.port)
    conn.send(b"GET /healthz HTTP/1.1\r\nX-Pad: ")
    assert await dribbled_until_closed(conn)
    assert await conn.responses(1) == []
    # a body that never completes, dribbled too: nothing reaches the engine
    conn = await Conn.open(s.port)
    body = json.dumps({"sku": "g100", "qty": 1, "external_ref": "slow"}).encode()
    conn.send(build("POST", "/v1/orders", body=body + b" " * 100, token=s.keys["acme"])[:-100])
    assert await dribbled_until_closed(conn, b" ")
    assert (await s.engine.list_orders("acme")).orders == []
    # an idle keep-alive connection
    conn = await Conn.open(s.port)
    assert (await conn.request("GET", "/healthz")).status == 200
    assert await conn.closed_by_server(timeout=5)
    text = (await s.request("GET", "/metrics")).body.decode()
    for phase in ("header", "body", "idle"):
        assert f'dispatch_http_timeouts_total{{phase="{phase}"}}' in text


async def test_a_trickling_upload_is_closed_at_its_deadline(make_server: Any) -> None:
    s = await make_server(body_timeout_s=5, upload_timeout_s=0.5)
    await s.shop(codes=0)
    conn = await Conn.open(s.port)
    conn.send(b"POST /admin/batches?sku=g100&supplier=sup&unit_cost=1&batch_id=slow HTTP/1.1\r\nHost: t\r\n"
              b"Authorization: Bearer " + ADMIN.encode() + b"\r\nContent-Type: text/plain\r\n"
              b"Content-Length: 1000000\r\n\r\n")
    closed = False
    for i in range(300):  # a line every 0.1 s: never idle for body_timeout_s, closed by the deadline
        conn.send(b"TRICKLE%05d\n" % i)
        try:
            closed = await conn.closed_by_server(timeout=0.1)
            break
        except asyncio.TimeoutError:
            pass
    assert closed
    assert 'dispatch_http_timeouts_total{phase="upload"} 1.0' in (await s.request("GET", "/metrics")).body.decode()
    assert (await s.engine.stock("g100")).accepted == 0


async def test_a_client_that_never_reads_is_cut_off(make_server: Any) -> None:
    s = await make_server(body_timeout_s=0.3)
    conn = await Conn.open(s.port)
    conn.send(b"GET /openapi.json HTTP/1.1\r\n\r\n" * 3000)  # ~100 MB of answers, none read
    for _ in range(200):
        text = (await s.request("GET", "/metrics")).body.decode()
        if 'dispatch_http_timeouts_total{phase="write"} 1.0' in text:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the connection was not cut off")
    conn.writer.transport.abort()


async def test_connections_beyond_the_limit_are_closed(make_server: Any) -> None:
    s = await make_server(max_connections=2)
    held = [await Conn.open(s.port) for _ in range(2)]
    for c in held:
        assert (await c.request("GET", "/healthz")).status == 200
    extra = await Conn.open(s.port)
    extra.send(HEALTH)
    assert await extra.responses(1) == [] and extra.eof
    await held[0].close()
    for _ in range(100):  # the server hears of the close a moment later
        again = await Conn.open(s.port)
        again.send(HEALTH)
        if await again.responses(1):
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("a connection slot was not freed")
    assert (await held[1].request("GET", "/healthz")).status == 200


async def test_connection_close_and_http10(server: Server) -> None:
    conn = await Conn.open(server.port)
    r = await conn.request("GET", "/healthz", headers={"Connection": "close"})
    assert r.status == 200 and r.headers["connection"] == "close"
    assert await conn.closed_by_server()
    conn = await Conn.open(server.port)
    conn.send(b"GET /healthz HTTP/1.0\r\n\r\n")
    assert (await conn.responses(1))[0].status == 200
    assert await conn.closed_by_server()
    conn = await Conn.open(server.port)
    conn.send(b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    r = (await conn.responses(1))[0]
    assert r.headers["connection"] == "keep-alive"
    conn.send(b"GET /admin/orders/export HTTP/1.0\r\nConnection: keep-alive\r\nAuthorization: Bearer "
              + ADMIN.encode() + b"\r\n\r\n")
    assert await conn.closed_by_server()  # a stream to an HTTP/1.0 client ends with the connection


async def test_expect_100_continue(server: Server) -> None:
    await server.shop(codes=0)
    head = (b"POST /admin/batches?sku=g100&supplier=sup&unit_cost=1 HTTP/1.1\r\nContent-Type: text/plain\r\n"
            b"Content-Length: 18\r\nExpect: 100-continue\r\n")
    conn = await Conn.open(server.port)
    conn.send(head + b"Authorization: Bearer " + ADMIN.encode() + b"\r\n\r\n")
    interim = await asyncio.wait_for(conn.reader.readuntil(b"\r\n\r\n"), 5)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    conn.send(b"EXPECT01\nEXPECT02\n")
    r = (await conn.responses(1))[0]
    assert r.status == 201 and r.json()["accepted"] == 2
    # refused before the body is sent: no 100, the final answer, and the connection closes
    conn = await Conn.open(server.port)
    conn.send(head + b"\r\n")
    r = (await conn.responses(1))[0]
    assert (r.status, r.headers["connection"]) == (401, "close")
    assert await conn.closed_by_server()


async def test_chunked_request_body(server: Server) -> None:
    await server.shop()
    body = json.dumps({"sku": "g100", "qty": 1, "external_ref": "chunked"}).encode()
    conn = await Conn.open(server.port)
    conn.send(b"POST /v1/orders HTTP/1.1\r\nAuthorization: Bearer " + server.keys["acme"].encode()
              + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
              + b"".join(b"%x\r\n%b\r\n" % (len(body[i:i + 7]), body[i:i + 7]) for i in range(0, len(body), 7))
              + b"0\r\n\r\n")
    assert (await conn.responses(1))[0].status == 201


# ---- raw bytes into the protocol object -------------------------------------------------------

class FakeTransport:
    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False
        self.reading = True

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.out += data

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


async def _answered(t: FakeTransport, n: int) -> list[bytes]:
    for _ in range(500):
        if t.out.count(b"HTTP/1.1 ") >= n:
            break
        await asyncio.sleep(0.01)
    return [b"HTTP/1.1 " + part for part in bytes(t.out).split(b"HTTP/1.1 ")[1:]]


class Health:
    """The smallest handler: GET /healthz is ok, any other path a 404 (no engine, no App)."""

    route = SimpleNamespace(stream=False)

    def match(self, method: str, path: str) -> tuple[Any, dict[str, str]]:
        if path != "/healthz":
            raise NotFoundError(f"no such endpoint: {method} {path}")
        return self.route, {}

    async def __call__(self, req: Request) -> Reply:
        return json_reply(200, {"status": "ok"})


async def test_protocol_byte_by_byte() -> None:
    state = ServerState()
    proto = HttpProtocol(Limits.from_config(Config()), state, Health())
    t = FakeTransport()
    proto.connection_made(t)  # type: ignore[arg-type]
    for b in HEALTH * 3 + build("GET", "/nope"):
        proto.data_received(bytes([b]))
    got = await _answered(t, 4)
    assert [g.split(b"\r\n", 1)[0] for g in got] == [b"HTTP/1.1 200 OK"] * 3 + [b"HTTP/1.1 404 Not Found"]
    assert got[0].endswith(b'\r\n\r\n{"status":"ok"}') and b"content-length: 15\r\n" in got[0]
    assert not t.closed
    proto.data_received(b"\x00\x01\x02 junk\r\n\r\n")
    got = await _answered(t, 5)
    assert got[4].startswith(b"HTTP/1.1 400 Bad Request") and b'"code":"bad_request"' in got[4]
    assert t.closed
    proto.connection_lost(None)
    assert proto not in state.connections


async def test_protocol_pauses_reading_for_a_deep_pipeline() -> None:
    proto = HttpProtocol(Limits.from_config(Config()), ServerState(), Health())
    t = FakeTransport()
    proto.connection_made(t)  # type: ignore[arg-type]
    proto.data_received(HEALTH * 100)  # all at once: more than the pipeline holds
    assert not t.reading
    got = await _answered(t, 100)
    assert len(got) == 100 and t.reading
    proto.connection_lost(None)


async def test_an_upgrade_request_is_answered_as_http_then_closed(server: Server) -> None:
    conn = await Conn.open(server.port)
    conn.send(b"GET /healthz HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x85junk" + HEALTH)
    got = await conn.responses(2)
    assert [(r.status, r.headers.get("connection")) for r in got] == [(200, "close")]
    assert await conn.closed_by_server()
