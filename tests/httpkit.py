"""A small HTTP/1.1 client over real sockets for the server tests, and a fixture that
runs the daemon in-process (App on port 0) against a real redis-server."""

from __future__ import annotations

import asyncio
import json as jsonlib
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import httptools
import pytest_asyncio

from dispatch.engine import Engine
from dispatch.server import App

from .conftest import make_config

ADMIN = "admin-secret-token"


class Response:
    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.raw_headers: list[tuple[str, str]] = []
        self.body = b""
        self.complete = False

    def json(self) -> Any:
        return jsonlib.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode()

    @property
    def error(self) -> str | None:
        try:
            return self.json()["error"]["code"]
        except (ValueError, KeyError, TypeError):
            return None

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.body[:300]!r}>"


class _Collector:
    """httptools callbacks collecting every response on a connection, in order."""

    def __init__(self) -> None:
        self.done: list[Response] = []
        self.current: Response | None = None
        self._parts: list[bytes] = []
        self.parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        self.current = Response()
        self._parts = []

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.current is not None
        n, v = name.decode().lower(), value.decode()
        self.current.headers[n] = v
        self.current.raw_headers.append((n, v))

    def on_headers_complete(self) -> None:
        assert self.current is not None
        self.current.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self._parts.append(body)

    def on_message_complete(self) -> None:
        assert self.current is not None
        if self.current.status == 100:  # interim
            self.current = None
            return
        self.current.body = b"".join(self._parts)
        self.current.complete = True
        self.done.append(self.current)
        self.current = None


class Conn:
    """One client connection; requests may be pipelined with send() then responses()."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self._c = _Collector()
        self._taken = 0
        self.eof = False

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1") -> Conn:
        r, w = await asyncio.open_connection(host, port)
        return cls(r, w)

    @classmethod
    async def once(cls, port: int, method: str, path: str, **kw: Any) -> Response:
        """One request on a connection of its own."""
        conn = await cls.open(port)
        try:
            return await conn.request(method, path, **kw)
        finally:
            await conn.close()

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def responses(self, n: int, timeout: float = 10.0) -> list[Response]:
        """The next *n* responses (fewer if the server closes first)."""
        async def read() -> None:
            while len(self._c.done) - self._taken < n:
                data = await self.reader.read(65536)
                if not data:
                    self.eof = True
                    try:
                        self._c.parser.feed_data(b"")
                    except httptools.HttpParserError:
                        pass
                    return
                self._c.parser.feed_data(data)
        await asyncio.wait_for(read(), timeout)
        got = self._c.done[self._taken:self._taken + n]
        self._taken += len(got)
        return got

    async def closed_by_server(self, timeout: float = 10.0) -> bool:
        """True once the server closes the connection (reads until EOF, dropping data)."""
        async def read() -> None:
            while await self.reader.read(65536):
                pass
        try:
            await asyncio.wait_for(read(), timeout)
        except (ConnectionResetError, BrokenPipeError):
            pass
        return True

    async def request(self, method: str, path: str, *, json: Any = None, body: bytes | None = None,
                      headers: dict[str, str] | None = None, token: str | None = None) -> Response:
        self.send(build(method, path, json=json, body=body, headers=headers, token=token))
        got = await self.responses(1)
        assert got, f"no response to {method} {path}"
        return got[0]

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionResetError, BrokenPipeError):
            pass


def build(method: str, path: str, *, json: Any = None, body: bytes | None = None,
          headers: dict[str, str] | None = None, token: str | None = None) -> bytes:
    if json is not None:
        body = jsonlib.dumps(json).encode()
    h = {"Host": "test"}
    if body is not None:
        h["Content-Length"] = str(len(body))
        if json is not None:
            h["Content-Type"] = "application/json"
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    h.update(headers or {})
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n"
    return head.encode() + (body or b"")


class Server:
    """The daemon running in this test's event loop, on a free port."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.engine = app.engine
        self.port = app.port
        self.keys: dict[str, str] = {}

    async def request(self, method: str, path: str, **kw: Any) -> Response:
        return await Conn.once(self.port, method, path, **kw)

    async def admin(self, method: str, path: str, **kw: Any) -> Response:
        return await self.request(method, path, token=ADMIN, **kw)

    async def as_(self, dist: str, method: str, path: str, **kw: Any) -> Response:
        return await self.request(method, path, token=self.keys[dist], **kw)

    async def shop(self, codes: int = 10) -> None:
        """SKU g100 (9500, low stock at 3), supplier sup, tier gold (5% off), funded
        distributors acme (gold) and beta, and *codes* codes in stock — set up via the engine."""
        e = self.engine
        await e.create_sku("g100", "Game card 100", 10000, "CNY", 9500, low_stock_threshold=3)
        await e.create_supplier("sup", "Supplier")
        await e.create_tier("gold", discount_bps=500)
        for dist, tier in (("acme", "gold"), ("beta", None)):
            self.keys[dist] = (await e.create_distributor(dist, dist.title(), tier=tier)).api_key
            await e.topup(dist, 1_000_000, f"seed-{dist}")
        if codes:
            body = b"".join(b"CODE%012d\n" % i for i in range(codes))
            await e.import_codes(body, sku="g100", supplier="sup", unit_cost=9000, batch_id="b1")


async def start_server(redis_url: str, tmp_path: os.PathLike[str], **overrides: Any) -> Server:
    values: dict[str, Any] = dict(redis_url=redis_url, admin_token=ADMIN, header_timeout_s=5.0,
                                  body_timeout_s=5.0, keepalive_timeout_s=5.0, auth_cache_ttl_s=0.0)
    values.update(overrides)
    config = make_config(tmp_path, **values)
    engine = Engine(config, sweep=False)
    await engine.start()
    app = App(config, engine)
    await app.start("127.0.0.1", 0)
    return Server(app)


@pytest_asyncio.fixture
async def make_server(flushed_redis_url: str, tmp_path: os.PathLike[str]) -> AsyncIterator[Callable[..., Any]]:
    """``await make_server(**config overrides)`` -> a running :class:`Server`; stopped after the test."""
    started: list[Server] = []

    async def make(**overrides: Any) -> Server:
        s = await start_server(flushed_redis_url, tmp_path, **overrides)
        started.append(s)
        return s

    yield make
    for s in started:
        await s.app.shutdown(2.0)


@pytest_asyncio.fixture
async def server(make_server: Callable[..., Any]) -> Server:
    """The daemon with default limits and an admin token, on an empty Redis."""
    return await make_server()
