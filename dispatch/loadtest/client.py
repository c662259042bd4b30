"""A small, fast HTTP/1.1 client for load generation: a pool of keep-alive
connections (asyncio Protocols, httptools response parser), one request in
flight per connection, callbacks instead of tasks.

The pool never blocks the scheduler: :meth:`Pool.submit` writes to an idle
connection, opens a new one (up to ``max_connections``), or queues the request.
A request that waits or runs longer than ``timeout_s`` from its *intended* start
fails with ``timeout`` (its connection, if it had one, is closed: HTTP/1.1 cannot
abandon one answer and keep the connection).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httptools

__all__ = ["Request", "Pool", "request_bytes"]

_perf = time.perf_counter

#: ``on_done(request, status, body, error)``: status -1 and an error name
#: ("timeout", "connection_error", "bad_response") when no answer came.
Done = Callable[["Request", int, bytes, "str | None"], None]


class Request:
    """One request to send; ``data`` is the whole HTTP/1.1 request."""

    __slots__ = ("data", "intended", "sent", "on_done", "ctx")

    def __init__(self, data: bytes, intended: float, on_done: Done, ctx: Any = None) -> None:
        self.data = data
        self.intended = intended  # perf_counter() time the schedule meant it to start
        self.sent = 0.0
        self.on_done = on_done
        self.ctx = ctx


def request_bytes(method: str, target: str, host: str, body: bytes | None = None,
                  headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    if body is not None and not any(k.lower() == "content-type" for k in headers or ()):
        lines.append("Content-Type: application/json")
    if body is not None or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body or b'')}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


class _Conn(asyncio.Protocol):
    __slots__ = ("pool", "transport", "parser", "current", "body", "closed")

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.current: Request | None = None
        self.body: list[bytes] = []
        self.closed = False

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.pool.conns.add(self)
        self.pool._idle(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.fail("bad_response")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        req, self.current = self.current, None
        self.pool._lost(self)
        if req is not None:
            req.on_done(req, -1, b"", "connection_error")

    # httptools callbacks
    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        req, self.current = self.current, None
        parts = self.body
        if len(parts) == 1:
            body = parts[0]
            parts.clear()
        else:
            body = b"".join(parts)
            self.body = []
        parser = self.parser
        keep = parser.should_keep_alive()
        if req is not None:
            req.on_done(req, parser.get_status_code(), body, None)
        if not keep:
            self.close()
        elif not self.closed:
            pool = self.pool
            if pool.queue:
                self.send(pool.queue.popleft())
            else:
                pool.idle.append(self)

    # ours
    def send(self, req: Request) -> None:
        self.current = req
        req.sent = _perf()
        self.transport.write(req.data)  # type: ignore[union-attr]

    def fail(self, error: str) -> None:
        req, self.current = self.current, None
        self.close()
        if req is not None:
            req.on_done(req, -1, b"", error)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()


class Pool:
    """Keep-alive connections to one ``http://host:port``."""

    def __init__(self, url: str, *, max_connections: int = 64, timeout_s: float = 5.0) -> None:
        u = urlsplit(url)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"an http:// URL is needed, got {url!r}")
        self.host, self.port = u.hostname, u.port or 80
        self.host_header = u.netloc
        self.max_connections = max_connections
        self.timeout_s = timeout_s
        self.conns: set[_Conn] = set()
        self.idle: list[_Conn] = []
        self.queue: collections.deque[Request] = collections.deque()
        self.connecting = 0
        self._loop = asyncio.get_running_loop()
        self._sweeper = self._loop.call_later(0.05, self._sweep)
        self._closing = False

    @property
    def in_flight(self) -> int:
        return sum(1 for c in self.conns if c.current is not None) + len(self.queue)

    def submit(self, req: Request) -> None:
        idle = self.idle
        while idle:
            c = idle.pop()
            if not c.closed:
                c.send(req)
                return
        self.queue.append(req)
        if len(self.conns) + self.connecting < self.max_connections:
            self._open()

    async def request(self, method: str, target: str, body: bytes | None = None,
                      headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """One request, awaited (for seeding and verification); raises on no answer."""
        fut: asyncio.Future[tuple[int, bytes]] = self._loop.create_future()

        def done(req: Request, status: int, data: bytes, error: str | None) -> None:
            if fut.done():
                return
            if error is not None:
                fut.set_exception(ConnectionError(f"{method} {target}: {error}"))
            else:
                fut.set_result((status, data))

        self.submit(Request(request_bytes(method, target, self.host_header, body, headers), _perf(), done))
        return await fut

    async def close(self) -> None:
        self._closing = True
        self._sweeper.cancel()
        for c in list(self.conns):
            c.close()
        while self.queue:
            req = self.queue.popleft()
            req.on_done(req, -1, b"", "connection_error")
        await asyncio.sleep(0)

    # internals
    def _open(self) -> None:
        self.connecting += 1
        fut = self._loop.create_connection(lambda: _Conn(self), self.host, self.port)
        task = asyncio.ensure_future(fut)
        task.add_done_callback(self._opened)

    def _opened(self, task: asyncio.Future[Any]) -> None:
        self.connecting -= 1
        if task.cancelled() or task.exception() is not None:
            if not self.conns and self.connecting == 0:  # nothing will ever take the queue: fail it
                while self.queue:
                    req = self.queue.popleft()
                    req.on_done(req, -1, b"", "connection_error")
            return
        conn = task.result()[1]
        if self._closing:
            conn.close()

    def _idle(self, c: _Conn) -> None:
        if self.queue:
            c.send(self.queue.popleft())
        else:
            self.idle.append(c)

    def _lost(self, c: _Conn) -> None:
        self.conns.discard(c)
        if self.queue and not self._closing and len(self.conns) + self.connecting < self.max_connections:
            self._open()

    def _sweep(self) -> None:
        now = _perf()
        deadline = now - self.timeout_s
        q = self.queue
        while q and q[0].intended < deadline:
            req = q.popleft()
            req.on_done(req, -1, b"", "timeout")
        for c in list(self.conns):
            req = c.current
            if req is not None and req.intended < deadline:
                c.fail("timeout")
        if not self._closing:
            self._sweeper = self._loop.call_later(0.05, self._sweep)
